"""An OpenAI-compatible HTTP API over one Model, as a Starlette app (`meldlite serve`
runs it with uvicorn): /v1/chat/completions and /v1/completions (whole or streamed
as server-sent events), /v1/models, /health.

Requests run through a `Scheduler` (continuous batching over the model's
`n_parallel` KV slots; more requests wait their turn). A client that goes away
mid-request has its work cancelled at once. Every bad request gets a 4xx answer in
OpenAI's error shape ({"error": {"message", "type", "param", "code"}}); the request
checks (fields, values, messages) are in `meldlite.server_requests`."""

import asyncio
import contextlib
import hmac
import json
import time
import uuid

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from meldlite.errors import ContextError, MeldliteError
from meldlite.scheduler import Scheduler
from meldlite.server_requests import ApiError, parse_chat, parse_completion

MAX_BODY_BYTES = 8 << 20  # a request body larger than this is refused (413)


def create_app(model, name, api_key=None, max_body_bytes=MAX_BODY_BYTES):
    """The Starlette app serving `model` under the model id `name`. api_key: when
    given, /v1/ requests need the header `Authorization: Bearer <api_key>`."""
    scheduler = Scheduler(model)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:
            scheduler.close()

    async def health(request):
        return JSONResponse({"status": "ok", **scheduler.stats()})

    async def models(request):
        _authorize(request, api_key)
        card = {"id": name, "object": "model", "created": created, "owned_by": "meldlite"}
        return JSONResponse({"object": "list", "data": [card]})

    async def chat_completions(request):
        _authorize(request, api_key)
        body = await _json_body(request, max_body_bytes)
        return await _complete(request, scheduler, name, parse_chat(body, model, name), True)

    async def completions(request):
        _authorize(request, api_key)
        body = await _json_body(request, max_body_bytes)
        return await _complete(request, scheduler, name, parse_completion(body, model, name), False)

    routes = [
        Route("/health", health),
        Route("/v1/models", models),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ]
    handlers = {ApiError: _api_error, HTTPException: _http_error, Exception: _server_error}
    return Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)


# --- errors in OpenAI's shape ---
def _error(status, message, kind="invalid_request_error", code=None, param=None):
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


async def _api_error(request, e):
    return _error(e.status, e.message, e.kind, e.code, e.param)


async def _http_error(request, e):
    return _error(e.status_code, f"{request.method} {request.url.path}: {e.detail}")


async def _server_error(request, e):
    return _error(500, f"internal error: {type(e).__name__}: {e}", "server_error")


def _authorize(request, api_key):
    if api_key is None:
        return
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
        raise ApiError(401, "Incorrect or missing API key", code="invalid_api_key")


async def _json_body(request, limit):
    """The request's JSON object, read up to `limit` bytes (413 beyond)."""
    size = request.headers.get("content-length", "")
    too_big = ApiError(413, f"the request body is larger than {limit} bytes")
    if size.isdigit() and int(size) > limit:
        raise too_big
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise too_big
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


# --- running a request ---
class _Events:
    """The scheduler's events of one request, handed to the event loop's queue."""

    def __init__(self):
        self.loop, self.queue = asyncio.get_running_loop(), asyncio.Queue()

    def __call__(self, kind, data):
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, data))

    async def get(self):
        return await self.queue.get()


def _submit(scheduler, parsed, events):
    try:
        return scheduler.submit(parsed.ids, parsed.sampler, parsed.max_tokens, parsed.stop, events)
    except ContextError as e:
        raise ApiError(400, str(e), code="context_length_exceeded", param="messages") from None
    except MeldliteError as e:
        raise ApiError(400, str(e)) from None


async def _complete(request, scheduler, name, parsed, chat):
    events = _Events()
    req = _submit(scheduler, parsed, events)
    head = {
        "id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24],
        "object": "chat.completion" if chat else "text_completion",
        "model": name,
    }

    def cancel():
        req.cancel()
        scheduler.wake()

    if parsed.stream:
        chunks = _chunks(events, head, chat, parsed.include_usage)
        return _Stream(chunks, cancel, media_type="text/event-stream")
    pieces = []
    try:
        while True:
            kind, data = await _next_event(request, events)
            if kind == "piece":
                pieces.append(data)
            elif kind == "error":
                raise ApiError(500, f"the model failed: {data}", "server_error")
            else:
                break
    finally:
        cancel()  # nothing, once done; a client gone or an error frees the slot
    text = "".join(pieces)
    choice = {"index": 0, "finish_reason": req.finish_reason}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice.update(text=text, logprobs=None)
    out = {**head, "created": int(time.time()), "choices": [choice], "usage": _usage(req)}
    return JSONResponse(out)


async def _next_event(request, events):
    """The next event, checking twice a second that the client is still there."""
    while True:
        try:
            return await asyncio.wait_for(events.get(), 0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                raise ApiError(499, "the client closed the request") from None


def _usage(req):
    u = req.usage
    out = {k: u[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    out["prompt_tokens_details"] = {"cached_tokens": u["cached_tokens"]}
    return out


async def _chunks(events, head, chat, with_usage):
    """Server-sent events of a streamed reply."""
    head = {**head, "object": head["object"] + ".chunk"} if chat else head

    def event(choices, **extra):
        data = {**head, "created": int(time.time()), "choices": choices, **extra}
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    def piece(text, finish=None):
        c = {"index": 0, "finish_reason": finish}
        if chat:
            c["delta"] = {"content": text} if text else {}
        else:
            c.update(text=text, logprobs=None)
        return [c]

    if chat:
        yield event([{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}])
    while True:
        kind, data = await events.get()
        if kind == "piece":
            yield event(piece(data))
        elif kind == "error":
            err = {"message": f"the model failed: {data}", "type": "server_error"}
            yield f"data: {json.dumps({'error': {**err, 'param': None, 'code': None}})}\n\n"
            break
        else:
            yield event(piece("", data.finish_reason))
            if with_usage:
                yield event([], usage=_usage(data))
            break
    yield "data: [DONE]\n\n"


class _Stream(StreamingResponse):
    """A streamed response that watches for the client leaving (whatever the ASGI
    server's spec version) and calls `on_close` when it ends, however it ends."""

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            async with anyio.create_task_group() as tasks:

                async def watch():
                    await self.listen_for_disconnect(receive)
                    tasks.cancel_scope.cancel()

                tasks.start_soon(watch)
                with contextlib.suppress(OSError):  # the client went away while we sent
                    await self.stream_response(send)
                tasks.cancel_scope.cancel()
        finally:
            self.on_close()
            with contextlib.suppress(Exception):
                await self.body_iterator.aclose()
