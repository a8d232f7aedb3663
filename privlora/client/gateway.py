"""``privlora gateway``: the OpenAI chat-completions API on the user's machine, with secure
generation behind it. Applications, SDKs and curl scripts that speak the OpenAI API talk to it
on loopback; the prompt is encrypted here before anything leaves the machine, and the adapter
stays on the privlora server (or, without ``--server``, in an in-process server).

Routes: ``GET /v1/models`` (each with its pads pool: rows ready, rows kept, being made);
``POST /v1/chat/completions`` (``stream`` as Server-Sent Events ending with ``data: [DONE]``,
with SSE comments ``: privlora pads|prefill DONE/TOTAL`` while the first token is awaited);
``GET /health``; ``GET /``, a chat page in the browser that uses the same API. ``max_tokens``
defaults to 256 and may be at most 1024, as for ``generate`` and ``chat``. Every answer carries
what it cost, measured, in a ``privlora`` object beside the OpenAI fields (in the response, or
in the stream's chunk with the ``finish_reason``), with what the server received for one group
of its last token beside the client's own x; it is logged in one line. A streamed answer whose
client goes away stops after its current token.
Errors are OpenAI error objects:
``{"error": {"message", "type", "param", "code"}}`` with 400 for bad parameters, 404 for an
unknown model, 413 when the conversation and ``max_tokens`` exceed the model's context, 429 when
too many requests wait, 502 when the privlora server refuses or cannot be reached.

One session per artifact is kept and reused; its answers run one at a time, and requests wait
in arrival order (asyncio's lock is first in, first out).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from importlib import resources
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from privlora.errors import PrivloraError
from privlora.client.assistant import Assistant, Reply
from privlora.client.generation import MAX_NEW_TOKENS, ContextLengthError, GenerationConfig, answer_length
from privlora.client.transports import TransportError

log = logging.getLogger("privlora.gateway")

ROLES = ("system", "user", "assistant")
MAX_STOPS = 4
MAX_WAITING = 32  # requests queued per model before 429
# The chat page: URL path -> (file in privlora/client/page, media type). No build step, nothing
# from another origin (the policy below forbids it), so the page works offline.
PAGE = {"/": ("index.html", "text/html; charset=utf-8"), "/chat.css": ("chat.css", "text/css; charset=utf-8"),
        "/chat.js": ("chat.js", "text/javascript; charset=utf-8")}
PAGE_HEADERS = {"content-security-policy": "default-src 'self'; frame-ancestors 'none'",
                "x-content-type-options": "nosniff", "referrer-policy": "no-referrer", "cache-control": "no-cache"}


class GatewayError(Exception):
    """A request refused with an OpenAI error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[dict[str, str]]
    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def _number(body: dict[str, Any], name: str, default: float | None, low: float, high: float | None = None,
            integer: bool = False, low_open: bool = False) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise GatewayError(400, f"'{name}' must be {'an integer' if integer else 'a number'}", name)
    if value < low or (low_open and value == low) or (high is not None and value > high):
        bounds = f"({low}, {high}]" if low_open else (f"[{low}, {high}]" if high is not None else f">= {low}")
        raise GatewayError(400, f"'{name}' must be in {bounds}, got {value}", name)
    return value


def _content(message: Any, index: int) -> dict[str, str]:
    """A message as {role, content}; content as a string or a list of text parts."""
    param = f"messages[{index}]"
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        raise GatewayError(400, f"{param} must be an object with a role of {', '.join(ROLES)}", param)
    content = message.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise GatewayError(400, f"{param}.content: only text parts are supported", param)
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise GatewayError(400, f"{param}.content must be a string or a list of text parts", param)
    return {"role": message["role"], "content": content}


def parse_chat_request(body: Any) -> ChatRequest:
    """The request's parameters, checked as OpenAI documents them (unknown fields are ignored,
    as OpenAI's own clients send some, such as ``user``)."""
    if not isinstance(body, dict):
        raise GatewayError(400, "the body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise GatewayError(400, "'model' is required", "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise GatewayError(400, "'messages' must be a non-empty list", "messages")
    if body.get("n", 1) != 1:
        raise GatewayError(400, "only n = 1 is supported", "n")
    stop = body.get("stop")
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
        raise GatewayError(400, f"'stop' must be a string or a list of at most {MAX_STOPS} non-empty strings", "stop")
    max_tokens = _number(body, "max_completion_tokens", None, 1, MAX_NEW_TOKENS, integer=True)
    max_tokens = _number(body, "max_tokens", max_tokens, 1, MAX_NEW_TOKENS, integer=True)
    stream_options = body.get("stream_options") or {}
    if not isinstance(body.get("stream", False), bool) or not isinstance(stream_options, dict):
        raise GatewayError(400, "'stream' must be a boolean and 'stream_options' an object", "stream")
    return ChatRequest(model=model, messages=[_content(m, i) for i, m in enumerate(messages)], max_tokens=max_tokens,
                       temperature=float(_number(body, "temperature", 1.0, 0.0, 2.0)),
                       top_p=float(_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)),
                       seed=_number(body, "seed", None, -2**63, 2**63 - 1, integer=True), stop=stops,
                       stream=bool(body.get("stream", False)),
                       include_usage=bool(stream_options.get("include_usage", False)))


class Model:
    """One artifact behind the gateway: its assistant, and the line of requests waiting for it."""

    def __init__(self, assistant: Assistant) -> None:
        self.assistant = assistant
        self.lock = asyncio.Lock()
        self.waiting = 0
        self.created = int(time.time())

    def describe(self) -> dict[str, Any]:
        return {"id": self.assistant.name, "object": "model", "created": self.created, "owned_by": "privlora",
                "artifact": self.assistant.artifact_id, "backend": self.assistant.client.backend_name,
                "context_length": self.assistant.context_length, "max_tokens": MAX_NEW_TOKENS,
                "pads": self.assistant.pads()}


def _chunk(completion: str, model: str, created: int, delta: dict[str, str], finish: str | None) -> dict[str, Any]:
    return {"id": completion, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}


def _usage(reply: Reply) -> dict[str, int]:
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": len(reply.tokens),
            "total_tokens": reply.prompt_tokens + len(reply.tokens)}


def _sse(payload: dict[str, Any] | str) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()


def _seconds(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def answer_line(model: str, reply: Reply, finish: str) -> str:
    """The log line of one answer: its size, speed and what privacy cost, online and offline."""
    report = reply.report()
    return (f"model={model} prompt_tokens={reply.prompt_tokens} completion_tokens={len(reply.tokens)} "
            f"finish={finish} first_token_s={_seconds(reply.first_token_s)} "
            f"tokens_per_s={_seconds(reply.tokens_per_second, 1)} online_s={_seconds(report['online']['seconds'])} "
            f"offline_s={_seconds(report['offline']['seconds'])}")


def page_files() -> dict[str, tuple[bytes, str]]:
    """The chat page's files as shipped in the package, by URL path."""
    folder = resources.files("privlora.client") / "page"
    return {path: ((folder / name).read_bytes(), media) for path, (name, media) in PAGE.items()}


def _failure(exc: Exception) -> GatewayError:
    """What the client of the gateway is told when secure generation fails."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, ContextLengthError):
        return GatewayError(413, str(exc), "messages", "context_length_exceeded")
    if isinstance(exc, TransportError):
        return GatewayError(502, f"the privlora server: {exc}", code="upstream_error", kind="api_error")
    if isinstance(exc, PrivloraError):
        return GatewayError(400, str(exc))
    return GatewayError(500, f"internal error ({type(exc).__name__})", kind="api_error")


def create_gateway(assistants: Sequence[Assistant]) -> FastAPI:
    models = {assistant.name: Model(assistant) for assistant in assistants}
    if len(models) != len(assistants):
        raise PrivloraError("two artifacts have the same name: give the gateway artifacts in directories of "
                            "different names")
    app = FastAPI(title="privlora gateway", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(GatewayError)
    async def refused(request: Request, exc: GatewayError) -> JSONResponse:
        log.info(f"refused status={exc.status} code={exc.code or exc.kind}: {exc}")
        return JSONResponse(exc.body(), status_code=exc.status)

    for path, (content, media) in page_files().items():
        app.add_api_route(path, _static(content, media), methods=["GET"], include_in_schema=False)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": [model.describe() for model in models.values()]}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model.describe() for model in models.values()]}

    def find(name: str) -> Model:
        """By name, or by artifact id (or a unique prefix of at least 8 hex digits)."""
        if name in models:
            return models[name]
        matches = [m for m in models.values() if len(name) >= 8 and m.assistant.artifact_id.startswith(name)]
        if len(matches) != 1:
            raise GatewayError(404, f"the model '{name}' does not exist (see GET /v1/models)", "model",
                               "model_not_found")
        return matches[0]

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            raise GatewayError(400, "the body is not valid JSON") from None
        chat = parse_chat_request(body)
        model = find(chat.model)
        assistant = model.assistant
        try:
            prompt = assistant.encode(chat.messages)
        except PrivloraError as exc:
            raise GatewayError(400, str(exc), "messages") from None
        max_tokens = answer_length(chat.max_tokens, len(prompt), assistant.context_length)
        if max_tokens < 1 or len(prompt) + max_tokens > assistant.context_length:
            raise GatewayError(413, f"the conversation is {len(prompt)} tokens and asks for up to {max_tokens} more: "
                               f"the model's context is {assistant.context_length}", "messages",
                               "context_length_exceeded")
        config = assistant.config(max_tokens, chat.temperature, chat.top_p, chat.seed)
        if model.waiting >= MAX_WAITING:
            raise GatewayError(429, f"{MAX_WAITING} requests are already waiting for this model; retry later",
                               code="queue_full", kind="rate_limit_error")
        completion, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        reply = Reply(prompt_tokens=len(prompt))
        if not chat.stream:
            async with _turn(model):
                try:
                    await run_in_threadpool(lambda: list(assistant.stream(prompt, config, reply, chat.stop)))
                except Exception as exc:
                    log.info(answer_line(assistant.name, reply, "error"))
                    raise _failure(exc) from None
            log.info(answer_line(assistant.name, reply, str(reply.finish_reason)))
            return JSONResponse({
                "id": completion, "object": "chat.completion", "created": created, "model": assistant.name,
                "system_fingerprint": assistant.artifact_id[:16],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                             "finish_reason": reply.finish_reason, "logprobs": None}],
                "usage": _usage(reply), "privlora": reply.report()})

        async def events() -> AsyncIterator[bytes]:
            outcome = "cancelled"  # unless the answer ends or fails: the client went away
            async with _turn(model):
                try:
                    yield _sse(_chunk(completion, assistant.name, created, {"role": "assistant", "content": ""},
                                      None))
                    try:
                        async for piece in _in_thread(partial(_answer, assistant, prompt, config, reply, chat.stop)):
                            if isinstance(piece, WaitReport):
                                yield piece.comment()
                                continue
                            yield _sse(_chunk(completion, assistant.name, created, {"content": piece}, None))
                    except Exception as exc:  # the status is sent already: the error goes in the stream
                        outcome = "error"
                        yield _sse(_failure(exc).body())
                        yield _sse("[DONE]")
                        return
                    outcome = str(reply.finish_reason)
                    last = _chunk(completion, assistant.name, created, {}, reply.finish_reason)
                    yield _sse({**last, "privlora": reply.report()})
                    if chat.include_usage:
                        yield _sse({"id": completion, "object": "chat.completion.chunk", "created": created,
                                    "model": assistant.name, "choices": [], "usage": _usage(reply)})
                    yield _sse("[DONE]")
                finally:
                    log.info(answer_line(assistant.name, reply, outcome))

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", "x-accel-buffering": "no"})

    return app


def _static(content: bytes, media: str) -> Callable[[], Awaitable[Response]]:
    """A route answering one of the page's files."""

    async def serve() -> Response:
        return Response(content, media_type=media, headers=PAGE_HEADERS)

    return serve


class _turn:
    """Wait in line for the model (first come, first served), then hold it for one answer."""

    def __init__(self, model: Model) -> None:
        self.model = model

    async def __aenter__(self) -> None:
        self.model.waiting += 1
        try:
            await self.model.lock.acquire()
        finally:
            self.model.waiting -= 1

    async def __aexit__(self, *exc: object) -> None:
        self.model.lock.release()


@dataclass(frozen=True)
class WaitReport:
    """How far the wait before the first token has gone: ``done`` of ``total`` groups, making pads
    on the spot or in the prompt's prefill. Sent as an SSE comment, which OpenAI's clients skip
    (the SSE format ignores comment lines) and the chat page reads."""

    phase: str  # "pads" or "prefill"
    done: int
    total: int

    def comment(self) -> bytes:
        return f": privlora {self.phase} {self.done}/{self.total}\n\n".encode()


def _answer(assistant: Assistant, prompt: list[int], config: GenerationConfig, reply: Reply, stop: Sequence[str],
            emit: Callable[[WaitReport], None]) -> Iterator[str]:
    """The answer's text, with the wait before its first token reported through ``emit``."""
    yield from assistant.stream(prompt, config, reply, stop,
                                on_wait=lambda phase, done, total: emit(WaitReport(phase, done, total)))


async def _in_thread(start: Callable[[Callable[[Any], None]], Iterator[Any]]) -> AsyncIterator[Any]:
    """Run a blocking generator in a worker thread and yield its items here as they come, with
    what it passes to its ``emit`` argument in between. If the consumer goes away (the HTTP client
    disconnected), the worker stops after its current item."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancelled = threading.Event()
    end = object()

    def emit(item: Any) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, item)

    pieces = start(emit)

    def produce() -> None:
        try:
            for piece in pieces:
                loop.call_soon_threadsafe(queue.put_nowait, piece)
                if cancelled.is_set():
                    break
            loop.call_soon_threadsafe(queue.put_nowait, end)
        except BaseException as exc:  # handed over to the consumer
            loop.call_soon_threadsafe(queue.put_nowait, exc)
        finally:
            pieces.close()

    worker = loop.run_in_executor(None, produce)
    try:
        while True:
            item = await queue.get()
            if item is end:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        cancelled.set()
        with anyio.CancelScope(shield=True):  # the model stays held until the worker has let it go
            await worker
