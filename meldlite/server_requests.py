"""Checks of OpenAI request bodies for `meldlite.server`: every field known, every
value in range, messages well formed; the result is the prompt ids and sampling of
one request, or an `ApiError` that the server answers in OpenAI's error shape.

Fields meldlite does not implement (n > 1, penalties, logprobs, tools, ...) are
accepted only at their neutral values, so a client never gets an answer that
silently ignored what it asked for. llama.cpp's server extensions top_k, min_p and
repeat_penalty are accepted too."""

from dataclasses import dataclass

from meldlite.errors import MeldliteError, OptionError
from meldlite.options import Sampler
from meldlite.tokenizer.chat import prompt_ids

SAMPLING = ("temperature", "top_p", "seed", "top_k", "min_p", "repeat_penalty")
COMMON = ("model", "max_tokens", "stop", "stream", "stream_options", "user", *SAMPLING)
CHAT_ONLY = ("messages", "max_completion_tokens")
COMPLETION_ONLY = ("prompt",)
# fields accepted only at these values (meldlite does not implement the others)
NEUTRAL = {
    "n": (1,),
    "frequency_penalty": (0,),
    "presence_penalty": (0,),
    "logprobs": (False, None),
    "top_logprobs": (None, 0),
    "logit_bias": ({},),
    "tools": ([],),
    "tool_choice": ("none", "auto"),
    "parallel_tool_calls": (True, False),
    "response_format": ({"type": "text"},),
    "echo": (False,),
    "best_of": (1,),
    "suffix": ("",),
    "store": (False,),
}
ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP = 16


class ApiError(Exception):
    """A request the server refuses: HTTP status and OpenAI's error fields."""

    def __init__(self, status, message, kind="invalid_request_error", code=None, param=None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = (
            status,
            message,
            kind,
            code,
            param,
        )


@dataclass(frozen=True)
class Parsed:
    """One request, checked: prompt ids (P,), sampling, length, stop strings, streaming."""

    ids: list
    sampler: Sampler
    max_tokens: int
    stop: tuple
    stream: bool
    include_usage: bool


def parse_chat(body, model, name):
    """A /v1/chat/completions body -> Parsed (the messages through the chat template)."""
    check_fields(body, COMMON + CHAT_ONLY, name)
    messages = check_messages(body.get("messages"))
    try:
        text = model.chat_template.render(messages, add_generation_prompt=True)
    except MeldliteError as e:
        raise ApiError(400, str(e), param="messages") from None
    ids = prompt_ids(model.tokenizer, text)
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    return parsed(body, ids, limit, model, "messages")


def parse_completion(body, model, name):
    """A /v1/completions body -> Parsed (prompt: text or token ids, BOS per the vocabulary)."""
    check_fields(body, COMMON + COMPLETION_ONLY, name)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one prompt
    if isinstance(prompt, str):
        ids = model.tokenize(prompt, add_bos=True)
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        ids = list(prompt)
        if min(ids) < 0 or max(ids) >= model.cfg.n_vocab:
            raise ApiError(400, f"token ids must be in 0..{model.cfg.n_vocab - 1}", param="prompt")
    else:
        raise ApiError(400, "prompt must be text or a list of token ids", param="prompt")
    return parsed(body, ids, body.get("max_tokens"), model, "prompt")


def check_fields(body, known, name):
    """Refuse unknown fields, unimplemented values of known ones, and other models."""
    for key, value in body.items():
        if key in NEUTRAL:
            if value is not None and value not in NEUTRAL[key]:
                raise ApiError(400, f"{key}={json_text(value)} is not supported", param=key)
        elif key not in known:
            raise ApiError(400, f"unrecognized request argument supplied: {key}", param=key)
    model = body.get("model")
    if model is not None and model != name:
        raise ApiError(
            404, f"the model {model!r} does not exist; this server serves {name!r}",
            code="model_not_found", param="model",
        )  # fmt: skip


def check_messages(messages):
    """The chat messages as the template wants them: role and text content."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}] needs a role in {ROLES}", param="messages")
        unknown = set(m) - {"role", "content", "name", "tool_call_id", "tool_calls"}
        if unknown or m.get("tool_calls"):
            what = ", ".join(sorted(unknown)) or "tool_calls"
            raise ApiError(400, f"messages[{i}]: {what} is not supported", param="messages")
        out.append({**m, "content": message_text(m.get("content"), i)})
    return out


def message_text(content, i):
    """A message's content: text, or a list of text parts joined."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"messages[{i}].content must be text or text parts", param="messages")


def parsed(body, ids, max_tokens, model, field):
    """The fields every request shares, checked, around prompt ids (from `field`)."""
    if len(ids) > model.n_ctx:
        raise ApiError(
            400, f"the prompt has {len(ids)} tokens; this model's context holds {model.n_ctx}",
            code="context_length_exceeded", param=field,
        )  # fmt: skip
    if max_tokens is None:
        max_tokens = model.n_ctx  # until the end of generation or a full context
    elif not _is_int(max_tokens) or max_tokens < 1:
        raise ApiError(400, "max_tokens must be an integer >= 1", param="max_tokens")
    stream = body.get("stream") or False
    options = body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise ApiError(400, "stream must be true or false, stream_options an object")
    if set(options) - {"include_usage"}:
        raise ApiError(400, "stream_options may only have include_usage", param="stream_options")
    return Parsed(
        ids=ids,
        sampler=sampler(body),
        max_tokens=max_tokens,
        stop=stop_strings(body.get("stop")),
        stream=stream,
        include_usage=bool(options.get("include_usage")),
    )


def sampler(body):
    """The Sampler of a request: OpenAI's defaults (temperature 1, top_p 1), none of
    llama.cpp's filters unless asked for."""
    given = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0}
    given.update({k: body[k] for k in SAMPLING if body.get(k) is not None})
    if "temperature" in body and _is_number(given["temperature"]) and given["temperature"] > 2:
        raise ApiError(400, "temperature must be in [0, 2]", param="temperature")
    if "seed" in given and _is_int(given["seed"]):
        given["seed"] %= 1 << 64  # OpenAI allows negative seeds
    try:
        return Sampler(**given)
    except OptionError as e:
        raise ApiError(400, str(e)) from None


def stop_strings(stop):
    if stop is None:
        return ()
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "stop must be a non-empty string or a list of them", param="stop")
    if len(stop) > MAX_STOP:
        raise ApiError(400, f"stop takes at most {MAX_STOP} strings", param="stop")
    return tuple(stop)


def json_text(value):
    return repr(value) if not isinstance(value, (dict, list)) else type(value).__name__


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)
