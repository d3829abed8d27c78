"""An OpenAI-compatible HTTP API over one Model, as a Starlette app (`meldlite serve`
runs it with uvicorn): /v1/chat/completions and /v1/completions (whole or streamed
as server-sent events), /v1/models, /health. One request computes at a time (the
model and its KV cache are one); requests wait for their turn."""

import json
import threading
import time
import uuid

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from meldlite.errors import MeldliteError, OptionError
from meldlite.options import Generation, Sampler


def create_app(model, name):
    """The Starlette app serving `model` under the model id `name`."""
    lock = threading.Lock()
    created = int(time.time())

    async def health(request):
        return JSONResponse({"status": "ok"})

    async def models(request):
        card = {"id": name, "object": "model", "created": created, "owned_by": "meldlite"}
        return JSONResponse({"object": "list", "data": [card]})

    async def chat_completions(request):
        return await _complete(request, model, name, lock, chat=True)

    async def completions(request):
        return await _complete(request, model, name, lock, chat=False)

    routes = [
        Route("/health", health),
        Route("/v1/models", models),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ]
    return Starlette(routes=routes)


def _error(status, message):
    body = {"error": {"message": message, "type": "invalid_request_error", "code": None}}
    return JSONResponse(body, status_code=status)


async def _complete(request, model, name, lock, chat):
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        return _error(400, "the request body is not JSON")
    if not isinstance(body, dict):
        return _error(400, "the request body must be a JSON object")
    try:
        reply = _reply(model, body, chat)
    except (MeldliteError, TypeError, ValueError) as e:
        return _error(400, str(e))
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    kind = "chat.completion" if chat else "text_completion"
    if body.get("stream"):
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        events = _events(reply, lock, rid, kind, name, chat, usage)
        return StreamingResponse(events, media_type="text/event-stream")
    text = await run_in_threadpool(_run, reply, lock)
    choice = {"index": 0, "finish_reason": reply.finish_reason}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice.update(text=text, logprobs=None)
    out = {"id": rid, "object": kind, "created": int(time.time()), "model": name}
    return JSONResponse({**out, "choices": [choice], "usage": _usage(reply)})


def _reply(model, body, chat):
    """The model's Reply for an OpenAI request body; OptionError on bad fields."""
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    max_tokens = Generation.max_tokens if max_tokens is None else max_tokens
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
        raise OptionError("max_tokens must be an integer")
    sampler = Sampler(
        temperature=_number(body, "temperature", 1.0),
        top_p=_number(body, "top_p", 1.0),
        top_k=0,
        min_p=0.0,
        repeat_penalty=1.0,
        seed=int(body["seed"]) if body.get("seed") is not None else Sampler.seed,
    )
    stop = body.get("stop") or ()
    if chat:
        messages = body.get("messages")
        return model.chat(messages, max_tokens=max_tokens, stop=stop, sampler=sampler)
    prompt = body.get("prompt")
    return model.complete(prompt, max_tokens=max_tokens, stop=stop, sampler=sampler)


def _number(body, key, default):
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OptionError(f"{key} must be a number")
    return float(value)


def _run(reply, lock):
    with lock:
        return "".join(reply)


def _usage(reply):
    u = reply.usage
    return {k: u[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}


def _events(reply, lock, rid, kind, name, chat, with_usage):
    """Server-sent events of a streamed reply (iterated in a worker thread)."""
    kind = kind + ".chunk" if chat else kind
    head = {"id": rid, "object": kind, "model": name}

    def event(choice, **extra):
        data = {**head, "created": int(time.time()), "choices": choice, **extra}
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    def piece(text, finish=None):
        c = {"index": 0, "finish_reason": finish}
        if chat:
            c["delta"] = {"content": text} if text else {}
        else:
            c.update(text=text, logprobs=None)
        return [c]

    with lock:
        if chat:
            yield event([{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}])
        for text in reply:
            yield event(piece(text))
        yield event(piece("", reply.finish_reason))
        if with_usage:
            yield event([], usage=_usage(reply))
        yield "data: [DONE]\n\n"
