"""Continuous batching: several requests decoded by one model at once.

The model's KV cache holds `n_parallel` sequences (slots). A worker thread runs the
model in steps; each step is one forward pass (`Model._eval_seqs`) over every active
request's next token and, within PROMPT_STEP tokens (and n_batch), chunks of the
prompts still being read in arrival order, so running replies never wait for more than
a chunk of someone's prompt, earlier requests get their first token first, and every
active request advances one token per step (fair turns). Requests beyond the slots wait in
arrival order. A request admitted to a slot reuses the KV cache of the longest common
prefix any free slot holds (a follow-up chat turn does not re-read its history).

Callbacks run in the worker thread: `on_event("piece", text)` for each piece of
reply text, then `on_event("done", request)` (read `finish_reason` and `usage`) or
`on_event("error", exception)`. `Request.cancel()` (a client went away) frees the
slot before the next step.
"""

import collections
import itertools
import threading

import numpy as np

from meldlite import sampling
from meldlite.chat import Decoding, usage
from meldlite.errors import ContextError, OptionError

PROMPT_STEP = 128  # prompt tokens per step at most: bounds the pause of running replies
_arrivals = itertools.count()


class Request:
    """One request: prompt ids, sampling, and its reply's state while it runs."""

    def __init__(self, ids, params, max_tokens, stop, tokenizer, on_event):
        self.ids, self.params, self.on_event = ids, params, on_event
        self.rng = np.random.default_rng(params.seed)
        self.text = Decoding(tokenizer, stop, max_tokens)
        self.slot, self.fed, self.reused, self.next_token = None, 0, 0, None
        self.cancelled, self.finish_reason, self.usage = False, None, None
        self.arrival = next(_arrivals)

    def cancel(self):
        """Stop this request (from any thread): its slot is freed before the next step."""
        self.cancelled = True


class Scheduler:
    """Runs submitted requests on `model` (whose cache has the slots) in a worker thread."""

    def __init__(self, model):
        self.model = model
        self.n_slots = model.cache.n_seq
        self.slots = [None] * self.n_slots  # the Request running in each slot
        self.waiting = collections.deque()
        self.cv = threading.Condition()
        self.closed = False
        self.steps = 0
        self.thread = threading.Thread(target=self._run, name="meldlite-scheduler", daemon=True)
        self.thread.start()

    def submit(self, ids, params, max_tokens, stop, on_event):
        """Queue a request for prompt `ids`; ContextError when it cannot fit the context."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)  # (P,)
        n_vocab = self.model.cfg.n_vocab
        if ids.size and (ids.min() < 0 or ids.max() >= n_vocab):
            raise OptionError(f"token ids must be in 0..{n_vocab - 1}")
        if not len(ids):
            raise OptionError("the prompt has no tokens")
        if len(ids) > self.model.n_ctx:
            raise ContextError(
                f"the prompt has {len(ids)} tokens; the context holds {self.model.n_ctx}"
            )
        req = Request(ids, params, max_tokens, stop, self.model.tokenizer, on_event)
        with self.cv:
            if self.closed:
                raise OptionError("the server is shutting down")
            self.waiting.append(req)
            self.cv.notify()
        return req

    def wake(self):
        """Let the worker notice a cancelled request at once."""
        with self.cv:
            self.cv.notify()

    def stats(self):
        with self.cv:
            active = sum(r is not None for r in self.slots)
            return {"slots": self.n_slots, "active": active, "waiting": len(self.waiting)}

    def close(self, timeout=30.0):
        """Stop the worker; requests still queued or running end with an error."""
        with self.cv:
            self.closed = True
            self.cv.notify()
        self.thread.join(timeout)

    # --- the worker ---
    def _run(self):
        while True:
            with self.cv:
                while not self.closed and not self._ready():
                    self.cv.wait()
                if self.closed:
                    self._fail_all(OptionError("the server is shutting down"))
                    return
                batch = self._batch()
            self._step(batch)

    def _ready(self):
        """Drop cancelled requests, admit waiting ones; True when a step has work."""
        for j, req in enumerate(self.slots):
            if req is not None and req.cancelled:
                self.slots[j] = None
        kept = [r for r in self.waiting if not r.cancelled]
        self.waiting.clear()
        self.waiting.extend(kept)
        while self.waiting and None in self.slots:
            self._admit(self.waiting.popleft())
        return any(r is not None for r in self.slots)

    def _admit(self, req):
        """Put req in the free slot whose cached tokens share the longest prefix with it."""
        cache = self.model.cache
        free = [j for j, r in enumerate(self.slots) if r is None]
        best = max(free, key=lambda j: _common(cache.seq(j).tokens, req.ids))
        seq = cache.seq(best)
        n = _common(seq.tokens, req.ids)
        if not seq.rewind(n):
            seq.reset()
            n = 0
        req.slot, req.fed, req.reused = best, n, n
        self.slots[best] = req

    def _batch(self):
        """[(request, tokens)] of this step: every decoding request's next token, then
        prompt chunks in arrival order while the step has room (PROMPT_STEP tokens)."""
        running = [r for r in self.slots if r is not None]
        batch = [(r, [r.next_token]) for r in running if r.next_token is not None]
        room = min(PROMPT_STEP, self.model.n_batch)
        reading = sorted((r for r in running if r.next_token is None), key=lambda r: r.arrival)
        for req in reading:
            if room <= 0:
                break
            chunk = req.ids[req.fed : req.fed + room]
            batch.append((req, chunk))
            room -= len(chunk)
        return batch

    def _step(self, batch):
        cache = self.model.cache
        tokens = np.concatenate([np.asarray(t, np.int64) for _, t in batch])  # (T,)
        seqs = [(req.slot, len(t)) for req, t in batch]
        try:
            logits = self.model._eval_seqs(tokens, seqs)  # (S, V)
        except Exception as e:  # the model failed (a peer lost for good, ...): end these
            with self.cv:
                for req, _ in batch:
                    cache.seq(req.slot).reset()
                    self._end(req, e)
            return
        self.steps += 1
        with self.cv:
            for (req, toks), row in zip(batch, logits):
                seq = cache.seq(req.slot)
                seq.tokens.extend(int(t) for t in toks)
                if req.next_token is None:
                    req.fed += len(toks)
                    if req.fed < len(req.ids):
                        continue  # more of the prompt to read
                self._advance(req, seq, row)

    def _advance(self, req, seq, logits):
        """Sample req's next token from logits (V,) and send its text."""
        if req.cancelled:
            self.slots[req.slot] = None
            return
        token = sampling.sample(logits, req.params, req.rng, seq.tokens)
        text = req.text.push(token, room=self.model.n_ctx - seq.n_past)
        if text:
            _tell(req, "piece", text)
        if req.text.finish_reason is None:
            req.next_token = token
            return
        req.finish_reason = req.text.finish_reason
        req.usage = usage(len(req.ids), req.text.n_out, req.reused)
        self._end(req, None)

    def _end(self, req, error):
        if req.slot is not None and self.slots[req.slot] is req:
            self.slots[req.slot] = None
        _tell(req, "error" if error else "done", error or req)

    def _fail_all(self, error):
        for req in [*self.waiting, *self.slots]:
            if req is not None:
                self._end(req, error)
        self.waiting.clear()


def _tell(req, kind, data):
    """req.on_event(kind, data); a listener that fails (its client is gone) cancels it."""
    try:
        req.on_event(kind, data)
    except Exception:
        req.cancel()


def _common(a, b):
    """Length of the common prefix of a and b, at most len(b) - 1 (one prompt token is
    always fed, to give the logits of the first reply token)."""
    n, limit = 0, min(len(a), len(b) - 1)
    while n < limit and a[n] == b[n]:
        n += 1
    return n
