"""Chat on a loaded model: messages rendered by the model's chat template
(`tokenizer.chat`), prompt ids that reuse the KV cache of the longest common prefix
with what the cache already holds, and a reply streamed as text pieces that ends
at an end-of-generation token, a stop string, max_tokens or a full context."""

import codecs

import numpy as np

from meldlite import sampling
from meldlite.errors import OptionError


class Reply:
    """A reply to prompt `ids` (the rendered chat, or a raw prompt's tokens).
    Iterate for the reply's text pieces. Afterwards: `text`, `finish_reason`
    ("stop": an end-of-generation token or a stop string; "length": max_tokens or
    the context is full) and `usage` (prompt_tokens, completion_tokens,
    total_tokens, and cached_tokens: prompt tokens whose KV was reused)."""

    def __init__(self, model, ids, params, max_tokens, stop):
        if max_tokens < 0:
            raise OptionError("max_tokens must be >= 0")
        stop = [stop] if isinstance(stop, str) else list(stop or ())
        if any(not isinstance(s, str) or not s for s in stop):
            raise OptionError("stop strings must be non-empty text")
        self.model, self.params, self.max_tokens, self.stop = model, params, max_tokens, stop
        self.ids = model._check_ids(ids)
        if not len(self.ids):
            raise OptionError("the prompt has no tokens")
        self.text, self.finish_reason, self.usage = "", None, None

    def __iter__(self):
        m, cache = self.model, self.model.cache
        reused = _reuse_prefix(cache, self.ids)
        logits = m._eval(self.ids[reused:], all_logits=False)[-1]  # (V,)
        cache.tokens = list(self.ids)
        rng = np.random.default_rng(self.params.seed)
        text = Decoding(m.tokenizer, self.stop, self.max_tokens)
        while True:
            token = sampling.sample(logits, self.params, rng, cache.tokens)
            out = text.push(token, room=m.n_ctx - cache.n_past)
            if out:
                self.text += out
                yield out
            if text.finish_reason is not None:
                break
            logits = m._eval([token], all_logits=False)[-1]  # (V,)
            cache.tokens.append(token)
        self.finish_reason = text.finish_reason
        self.usage = usage(len(self.ids), text.n_out, reused)


class Decoding:
    """The text of a reply, token by token: incremental UTF-8, stop strings held back
    until decided, and why the reply ended. `push(token, room)` returns the text that
    is safe to send; afterwards `finish_reason` is None while the reply goes on, "stop"
    (an end-of-generation token or a stop string) or "length" (max_tokens, or no room
    left in the context for the next token: `room` = positions still free)."""

    def __init__(self, tokenizer, stop, max_tokens):
        self.tokenizer, self.stop, self.max_tokens = tokenizer, stop, max_tokens
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.held, self.n_out, self.finish_reason = "", 0, None
        if max_tokens == 0:
            self.finish_reason = "length"

    def push(self, token, room):
        """Take one sampled token; room: context positions free before it is fed."""
        if self.finish_reason is not None:
            return ""
        if self.tokenizer.is_eog(token):  # what was held for a stop string is text
            self.finish_reason = "stop"
            out, self.held = self.held + self.decoder.decode(b"", final=True), ""
            return out
        self.n_out += 1
        self.held += self.decoder.decode(self.tokenizer.token_to_piece(token))
        self.held, out, stopped = _split_stop(self.held, self.stop)
        if stopped:
            self.finish_reason = "stop"
        elif self.n_out >= self.max_tokens or room <= 0:
            self.finish_reason = "length"
            out += self.held + self.decoder.decode(b"", final=True)
            self.held = ""
        return out


def usage(n_prompt, n_out, reused):
    """OpenAI's usage fields, with the prompt tokens whose KV was reused."""
    return {
        "prompt_tokens": n_prompt,
        "completion_tokens": n_out,
        "total_tokens": n_prompt + n_out,
        "cached_tokens": reused,
    }


def _reuse_prefix(cache, ids):
    """Rewind the cache to its longest common prefix with ids (at most len(ids) - 1,
    so one token is left to give logits); start over when it cannot. Returns the
    number of positions kept."""
    if len(cache.tokens) != cache.n_past:
        cache.reset()  # filled by someone who did not record the ids
    n = 0
    limit = min(len(cache.tokens), len(ids) - 1)
    while n < limit and cache.tokens[n] == ids[n]:
        n += 1
    if not cache.rewind(n):
        cache.reset()
        n = 0
    return n


def _split_stop(held, stops):
    """(text still held back, text safe to emit, stopped?): text up to a stop string
    is emitted and the rest dropped; the longest tail that could begin a stop string
    is held back until the next piece decides."""
    cut = min((i for i in (held.find(s) for s in stops) if i >= 0), default=-1)
    if cut >= 0:
        return "", held[:cut], True
    keep = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(held)), keep, -1):
            if held.endswith(s[:n]):
                keep = n
                break
    return held[len(held) - keep :], held[: len(held) - keep], False
