"""``privlora serve``: the :class:`PrivateServer` over HTTP (FastAPI + uvicorn), with TLS.

Routes (bodies are raw bytes, ``application/octet-stream``; errors are JSON ``{"error": ...,
"code": ...}``, the codes in ``core/wire.py``):

- ``GET  /v1/health``: artifact id, backend, open sessions (never needs a token; with accounts a
  caller without a valid token sees only that the server is up, see ``Hosting.health``);
- ``GET  /v1/models``: the hosted artifacts by name, with their ids, backends and adapters (any
  caller the server admits; no sessions or memory, see ``Hosting.models``);
- ``GET  /metrics``: Prometheus metrics (with accounts: an admin account's token);
- ``POST /v1/sessions``: body = the client's evaluation keys -> ``{"session": id}``;
- ``DELETE /v1/sessions/{id}``;
- ``POST /v1/sessions/{id}/rounds/{round}/{group}/{message}``: body = message ``message`` of the
  group's evaluation (0: the encrypted group input; later ones for backends of several messages)
  -> the encrypted reply;
- ``WS /v1/sessions/{id}/stream``: the same messages on one persistent WebSocket, a binary frame
  each way (round, group and message in a small header; the reply frame starts with the status).

With an accounts database every route but health takes ``Authorization: Bearer <token>``,
checked before a body is read (the stream: on its handshake, checked again for every frame, so a
revocation cuts it).

Status codes: 400 malformed ciphertext or keys, 401 no or unknown token, 403 token revoked or
query budget used up, 404 unknown or expired session, round or message, 409 a message out of
order or replayed, 413 body too large, 429 rate limit or too many requests in progress (with
``Retry-After``), 431 headers too large, 503 no room for another session, or shutting down.

Bodies are read with a size limit (413 beyond it). ``serve`` runs the backend work in the
evaluation process (``server/evaluator.py``), called from worker threads, so several sessions
are served at once and the event loop never waits for an evaluation. A bad request gets a 4xx
and changes nothing. On SIGTERM the server stops taking work, answers what is in flight (HTTP
requests and stream frames), then exits.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, ExitStack, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from privlora.core.wire import (API, HEARTBEAT, HEARTBEAT_SECONDS, REFUSALS, UVICORN_PROTOCOLS, HeadersTooLargeError,
                                RateLimitError, TooLargeError, read_stream_request, refusal_of, stream_reply)
from privlora.server.accounts import Account, AccountStore
from privlora.server.guard import ConnectionLimits, guarded_h11, header_bytes
from privlora.server.fingerprints import CLONE_ROWS, RECOMMENDED_STRENGTH, TOKENS_PER_EXCHANGE, FingerprintKey
from privlora.server.evaluator import Hosted, HostingProcess
from privlora.server.hosting import Hosting, HostingBase
from privlora.server.logs import configure_logging
from privlora.server.memory import release_large_buffers
from privlora.server.metrics import CONTENT_TYPE, STREAM_ROUTE, Metrics
from privlora.server.private import PrivateServer
from privlora.server.sessions import SessionLimits

log = logging.getLogger("privlora.server")


@dataclass(frozen=True)
class BodyLimits:
    keys: int = 256 * 1024**2  # evaluation keys (ckks: ~10 MB; concrete: 64 B)
    round: int = 256 * 1024**2  # one group's request (a long prompt's prefill has a ciphertext per token)


# A client pauses between rounds while it runs the public segments and decrypts; uvicorn's
# default of 5 s would close its connection under load (seen as "connection reset" in CI).
KEEP_ALIVE_SECONDS = 120
REFUSAL_PAUSE_SECONDS = 1.0  # before a 429 for too many requests in progress: its Retry-After
SHUTDOWN_GRACE_SECONDS = 60.0  # the longest a SIGTERM waits for in-flight work


class Drain:
    """Work in flight, and whether the server is shutting down (then new work gets a 503)."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0

    async def wait(self, timeout: float) -> int:
        """Stop taking work and wait for what is in flight; returns what was still running."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.in_flight


def refusal_body(exc: Exception) -> tuple[int, dict[str, str]]:
    """Status and JSON body for a refusal; our errors carry a message written for the client
    (never a payload), anything else is an internal error named by its type only."""
    refusal = refusal_of(exc)
    if refusal is None:
        log.error("internal error", extra={"event": "error", "kind": type(exc).__name__})
        return 500, {"error": f"internal server error ({type(exc).__name__})", "code": "internal"}
    return refusal.status, {"error": str(exc), "code": refusal.code}


_SHUTTING_DOWN = (503, {"error": "the server is shutting down; retry shortly", "code": "at_capacity"})


class Instrumented:
    """ASGI middleware: each HTTP request's route, status and time into the metrics, the count
    of work in flight for a graceful shutdown, and a 503 for new work once it has begun."""

    def __init__(self, app: ASGIApp, metrics: Metrics, drain: Drain, max_header_bytes: int) -> None:
        self.app, self.metrics, self.drain, self.max_header_bytes = app, metrics, drain, max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if header_bytes(scope) > self.max_header_bytes:
            status, body = refusal_body(HeadersTooLargeError(f"request headers over {self.max_header_bytes} bytes"))
            await JSONResponse(body, status_code=status)(scope, receive, send)
            return
        if self.drain.draining and not scope["path"].endswith("/health"):
            status, body = _SHUTTING_DOWN
            await JSONResponse(body, status_code=status, headers={"retry-after": "1"})(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def send_recording(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.drain.in_flight += 1
        try:
            await self.app(scope, receive, send_recording)
        finally:
            self.drain.in_flight -= 1
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.observe(route, scope["method"], status, time.perf_counter() - start)


@asynccontextmanager
async def in_progress(hosting: HostingBase, caller: str) -> AsyncIterator[None]:
    """One of ``caller``'s requests in progress (``FairQueue.request``). A caller at its maximum
    is refused only after the pause its Retry-After asks for, so that a client retrying at once
    costs the server a refusal a second, not as many as it can send (each a connection, a token
    check and an answer)."""
    with ExitStack() as held:
        try:
            held.enter_context(hosting.fair.request(caller))
        except RateLimitError:
            await asyncio.sleep(REFUSAL_PAUSE_SECONDS)
            raise
        yield


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLargeError("request body too large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLargeError("request body too large")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(hosted: HostingBase | PrivateServer, limits: BodyLimits = BodyLimits(),
               connections: ConnectionLimits = ConnectionLimits()) -> FastAPI:
    hosting = Hosting([hosted]) if isinstance(hosted, PrivateServer) else hosted
    app = FastAPI(title="privlora server", docs_url=None, redoc_url=None, openapi_url=None)
    metrics, drain = Metrics(hosting), Drain()
    app.state.drain = drain
    app.add_middleware(Instrumented, metrics=metrics, drain=drain, max_header_bytes=connections.max_header_bytes)

    async def refused(request: Request, exc: Exception) -> JSONResponse:
        status, body = refusal_body(exc)
        metrics.refusals.labels(body["code"]).inc()
        return JSONResponse(body, status_code=status, headers=refusal_headers(status))

    for kind in REFUSALS:
        app.add_exception_handler(kind, refused)
    app.add_exception_handler(Exception, refused)

    async def account(request: Request | WebSocket) -> Account | None:
        return await run_in_threadpool(hosting.account, request.headers.get("authorization"))

    @app.get(f"{API}/health")
    async def health(request: Request) -> dict:
        return await run_in_threadpool(hosting.health, request.headers.get("authorization"))

    @app.get(f"{API}/models")
    async def models(request: Request) -> dict:
        await account(request)
        return hosting.models()

    @app.get("/metrics")
    async def metrics_route(request: Request) -> Response:
        await run_in_threadpool(hosting.admin, request.headers.get("authorization"))
        return Response(await run_in_threadpool(metrics.render), media_type=CONTENT_TYPE)

    @app.post(f"{API}/sessions")
    async def open_session(request: Request) -> dict:
        caller = await account(request)  # before the body: a stranger's upload is never read
        async with in_progress(hosting, hosting.caller(caller, "new")):
            keys = await _read_body(request, limits.keys)
            artifact = request.query_params.get("artifact")
            return {"session": await run_in_threadpool(hosting.open_session, caller, artifact, keys)}

    @app.delete(f"{API}/sessions/{{session}}")
    async def close_session(session: str, request: Request) -> dict:
        await run_in_threadpool(hosting.close_session, await account(request), session)
        return {"closed": True}

    @app.post(f"{API}/sessions/{{session}}/rounds/{{round_name}}/{{index}}/{{message}}")
    async def evaluate(session: str, round_name: str, index: int, message: int, request: Request) -> Response:
        caller = await account(request)
        await run_in_threadpool(hosting.check_round, caller, session, round_name, index, message)
        async with in_progress(hosting, hosting.caller(caller, session)):
            payload = await _read_body(request, limits.round)
            reply = await run_in_threadpool(hosting.evaluate, caller, session, round_name, index, message, payload)
        return Response(reply, media_type="application/octet-stream")

    @app.websocket(f"{API}/sessions/{{session}}/stream")
    async def stream(socket: WebSocket, session: str) -> None:
        """The same messages as the round route, one binary frame each way on one connection. The
        handshake is refused (with the HTTP status of the refusal) for a missing or bad token,
        another's or an unknown session, or an account with all its requests in progress; an open
        stream counts as one of them. A frame larger than the round limit closes the stream (1009,
        "message too big"), a text frame too (1003), and so does a stream idle too long (1001)
        or a shutdown (1012, after answering the frame in flight). While a frame takes longer
        than a heartbeat period, heartbeat frames (status 102) tell the client the server lives."""
        authorization = socket.headers.get("authorization")
        async with AsyncExitStack() as held:
            try:
                if header_bytes(socket.scope) > connections.max_header_bytes:
                    raise HeadersTooLargeError("request headers too large")
                caller = await account(socket)
                await run_in_threadpool(hosting.check_session, caller, session)
                await held.enter_async_context(in_progress(hosting, hosting.caller(caller, session)))
            except Exception as exc:
                status, body = refusal_body(exc)
                metrics.refusals.labels(body["code"]).inc()
                await socket.send_denial_response(JSONResponse(body, status_code=status,
                                                               headers=refusal_headers(status)))
                return
            await _serve_stream(socket, partial(answer_frame, hosting, authorization, session), drain, metrics,
                                connections.stream_idle_seconds)

    return app


async def _serve_stream(socket: WebSocket, answer: Any, drain: Drain, metrics: Metrics, idle_seconds: float) -> None:
    await socket.accept()
    while not drain.draining:
        try:
            received = await asyncio.wait_for(socket.receive(), idle_seconds)
        except asyncio.TimeoutError:
            await socket.close(1001, "idle too long")
            return
        if received["type"] == "websocket.disconnect":
            return
        frame = received.get("bytes")
        if frame is None:
            await socket.close(1003, "binary frames only")
            return
        start = time.perf_counter()
        drain.in_flight += 1
        try:
            status, reply = await _with_heartbeats(socket, answer(frame))
        finally:
            drain.in_flight -= 1
        if status >= 400:
            metrics.refusals.labels(json.loads(reply)["code"]).inc()
        metrics.observe(STREAM_ROUTE, "FRAME", status, time.perf_counter() - start)
        try:
            await socket.send_bytes(stream_reply(status, reply))
        except (WebSocketDisconnect, RuntimeError):  # the client went away while its frame was evaluated
            return
    await socket.close(1012)


def refusal_headers(status: int) -> dict[str, str] | None:
    if status in (429, 503):
        return {"retry-after": f"{REFUSAL_PAUSE_SECONDS:g}"}
    if status == 401:
        return {"www-authenticate": "Bearer"}
    return None


async def _with_heartbeats(socket: WebSocket, work: Any) -> tuple[int, bytes]:
    """Await ``work``, sending a heartbeat frame every period it takes: a client waiting on a
    stream cannot otherwise tell a long evaluation from a server that died behind a proxy
    (Ray Serve's keeps the client's WebSocket open when a replica dies)."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=HEARTBEAT_SECONDS)
        if done:
            return task.result()
        await socket.send_bytes(stream_reply(HEARTBEAT, b""))


async def answer_frame(hosting: HostingBase, authorization: str | None, session: str, frame: bytes) -> tuple[int, bytes]:
    """A stream frame's status and reply: the evaluation, or the refusal the HTTP route would give
    (the token is checked again, so that a revocation cuts an open stream)."""
    try:
        round_name, index, message, payload = read_stream_request(frame)
    except ValueError as exc:
        return 400, json.dumps({"error": f"malformed stream frame: {exc}", "code": "malformed_payload"}).encode()
    try:
        caller = await run_in_threadpool(hosting.account, authorization)
        return 200, await run_in_threadpool(hosting.evaluate, caller, session, round_name, index, message, payload)
    except Exception as exc:
        status, body = refusal_body(exc)
        return status, json.dumps(body).encode()


class GracefulServer(uvicorn.Server):
    """uvicorn, except that a shutdown first lets the work in flight finish: uvicorn itself
    waits for HTTP requests but cuts WebSockets at once, which would drop a stream frame being
    evaluated."""

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain

    async def shutdown(self, sockets: Any = None) -> None:
        log.info("shutting down", extra={"event": "shutdown"})
        left = await self.drain.wait(SHUTDOWN_GRACE_SECONDS)
        if left:
            log.warning("shutdown grace period over", extra={"event": "shutdown", "kind": f"{left} in flight"})
        for connection in list(self.server_state.connections):
            if _idle_http(connection):
                connection.transport.abort()
        await super().shutdown(sockets)


def _idle_http(connection: Any) -> bool:
    """An HTTP keep-alive connection between requests, with nothing left to send. Such a one is
    cut rather than closed at shutdown: closing a TLS connection waits up to 30 s for the
    client's close_notify, which an idle keep-alive client never sends. (uvicorn's HTTP
    protocols keep the current request cycle in ``cycle``; its WebSocket ones have none.)"""
    if not hasattr(connection, "cycle"):
        return False
    cycle = connection.cycle
    done = cycle is None or getattr(cycle, "response_complete", False)
    return done and connection.transport.get_write_buffer_size() == 0


@dataclass(frozen=True)
class TLS:
    cert: Path
    key: Path


def server_config(app: FastAPI, host: str, port: int, limits: BodyLimits = BodyLimits(),
                  connections: ConnectionLimits = ConnectionLimits(), tls: TLS | None = None) -> uvicorn.Config:
    """uvicorn's configuration for a privlora server: our protocols, with the connection guard."""
    # uvicorn's access log prints request paths (session ids); ours logs truncated ids only
    return uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                          **{**UVICORN_PROTOCOLS, "http": guarded_h11(connections)},
                          timeout_keep_alive=KEEP_ALIVE_SECONDS, ws_max_size=limits.round, ws_ping_interval=None,
                          ssl_certfile=str(tls.cert) if tls else None, ssl_keyfile=str(tls.key) if tls else None,
                          timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS)


def what_accounts_rebuild(key: FingerprintKey) -> str:
    """The start-up line that tells the owner what a budget does not stop (docs/security.md)."""
    marks = (f"fingerprints on (strength {key.strength:g}): a clone names its account (privlora attack trace)"
             if key.enabled else "fingerprints off: a clone names no account (privlora accounts fingerprints "
                                 f"--strength {RECOMMENDED_STRENGTH:g} to mark them)")
    return (f"an account's ordinary chats rebuild the adapter's function after about {CLONE_ROWS} rows per LoRA site "
            f"(about {CLONE_ROWS // TOKENS_PER_EXCHANGE} question-and-answer exchanges), well within a default budget; "
            + marks)


def serve(hosted: dict[str, str], listener: socket.socket, log_level: str = "info",
          limits: SessionLimits = SessionLimits(), accounts: str | Path | None = None, tls: TLS | None = None) -> None:
    """Serve each artifact of ``hosted`` (by the name it is served under) on ``listener``, a socket
    bound by the caller before anything slow, so that a port in use is said at once and in one line."""
    configure_logging(log_level)
    release_large_buffers()
    store = AccountStore(accounts) if accounts is not None else None
    hosting = HostingProcess(Hosted(hosted, limits, str(accounts) if accounts is not None else None, log_level), store)
    if store is None:
        log.warning("accounts off: anyone who can reach this port may open sessions, with a query budget per "
                    "session (serve --accounts DB to require API tokens)", extra={"event": "accounts"})
    else:
        log.info(f"accounts on: {len(store.usage())} in {store.path}", extra={"event": "accounts"})
        log.warning(what_accounts_rebuild(store.fingerprint_key()), extra={"event": "accounts"})
    app = create_app(hosting)
    host, port = listener.getsockname()[:2]
    try:
        GracefulServer(server_config(app, host, port, tls=tls), app.state.drain).run(sockets=[listener])
    finally:
        hosting.close()
