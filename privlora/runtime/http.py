"""``privlora serve``: the :class:`PrivateServer` over HTTP (FastAPI + uvicorn).

Routes (bodies are raw bytes, ``application/octet-stream``; errors are JSON ``{"error": ...}``):

- ``GET  /v1/health``: artifact id, backend, open sessions;
- ``POST /v1/sessions``: body = the client's evaluation keys -> ``{"session": id}``;
- ``DELETE /v1/sessions/{id}``;
- ``POST /v1/sessions/{id}/rounds/{round}/{group}/{message}``: body = message ``message`` of the
  group's evaluation (0: the encrypted group input; later ones for backends of several messages)
  -> the encrypted reply;
- ``WS /v1/sessions/{id}/stream``: the same messages on one persistent WebSocket, a binary frame
  each way (round, group and message in a small header; the reply frame starts with the status).

Status codes: 400 malformed ciphertext or keys, 403 query budget used up, 404 unknown or
expired session, round or message, 409 a message out of order or replayed, 413 body too large,
429 rate limit (with ``Retry-After``).

Bodies are read with a size limit (413 beyond it). The backend work runs in a worker thread, so
several sessions are served at once. A bad request gets a 4xx and changes nothing.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from privlora.backends.base import MessageOrderError, PayloadError
from privlora.runtime.server import (BudgetError, PrivateServer, RateLimitError, RoundError, SessionError,
                                     SessionLimits)
from privlora.runtime.transport import API, read_stream_request, stream_reply

log = logging.getLogger("privlora.server")


@dataclass(frozen=True)
class BodyLimits:
    keys: int = 256 * 1024**2  # evaluation keys (ckks: ~10 MB; concrete: 64 B)
    round: int = 256 * 1024**2  # one group's request (a long prompt's prefill has a ciphertext per token)


# A client pauses between rounds while it runs the public segments and decrypts; uvicorn's
# default of 5 s would close its connection under load (seen as "connection reset" in CI).
KEEP_ALIVE_SECONDS = 120


class _TooLarge(Exception):
    pass


REFUSALS: dict[type[Exception], int] = {PayloadError: 400, BudgetError: 403, SessionError: 404, RoundError: 404,
                                        MessageOrderError: 409, RateLimitError: 429}


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _TooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(server: PrivateServer, limits: BodyLimits = BodyLimits()) -> FastAPI:
    app = FastAPI(title="privlora server", docs_url=None, redoc_url=None, openapi_url=None)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(_TooLarge)
    async def too_large(request: Request, exc: _TooLarge) -> JSONResponse:
        return error(413, "request body too large")

    async def refused(request: Request, exc: Exception) -> JSONResponse:
        """Our own errors carry a message written for the client (never a payload)."""
        status = REFUSALS[type(exc)]
        headers = {"retry-after": "1"} if status == 429 else None
        return JSONResponse({"error": str(exc)}, status_code=status, headers=headers)

    for kind in REFUSALS:
        app.add_exception_handler(kind, refused)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:  # never echo payloads
        log.error("internal error", extra={"event": "error", "kind": type(exc).__name__})
        return error(500, f"internal server error ({type(exc).__name__})")

    @app.get(f"{API}/health")
    async def health() -> dict:
        return {"status": "ok", **server.info()}

    @app.post(f"{API}/sessions")
    async def open_session(request: Request) -> dict:
        keys = await _read_body(request, limits.keys)
        return {"session": await run_in_threadpool(server.open_session, keys)}

    @app.delete(f"{API}/sessions/{{session}}")
    async def close_session(session: str) -> dict:
        server.close_session(session)
        return {"closed": True}

    @app.post(f"{API}/sessions/{{session}}/rounds/{{round_name}}/{{index}}/{{message}}")
    async def evaluate(session: str, round_name: str, index: int, message: int, request: Request) -> Response:
        payload = await _read_body(request, limits.round)
        reply = await run_in_threadpool(server.evaluate, session, round_name, index, message, payload)
        return Response(reply, media_type="application/octet-stream")

    @app.websocket(f"{API}/sessions/{{session}}/stream")
    async def stream(socket: WebSocket, session: str) -> None:
        """The same messages as the round route, one binary frame each way on one connection. A
        frame larger than the round limit closes the connection (1009, "message too big")."""
        await socket.accept()
        try:
            while True:
                frame = await socket.receive_bytes()
                await socket.send_bytes(await answer_frame(server, session, frame))
        except WebSocketDisconnect:
            return

    return app


async def answer_frame(server: PrivateServer, session: str, frame: bytes) -> bytes:
    """A stream frame's reply: the evaluation, or the refusal the HTTP route would give."""
    try:
        round_name, index, message, payload = read_stream_request(frame)
        reply = await run_in_threadpool(server.evaluate, session, round_name, index, message, payload)
        return stream_reply(200, reply)
    except ValueError as exc:
        return stream_reply(400, json.dumps({"error": f"malformed stream frame: {exc}"}).encode())
    except tuple(REFUSALS) as exc:
        return stream_reply(REFUSALS[type(exc)], json.dumps({"error": str(exc)}).encode())
    except Exception as exc:  # never echo payloads
        log.error("internal error", extra={"event": "error", "kind": type(exc).__name__})
        return stream_reply(500, json.dumps({"error": f"internal server error ({type(exc).__name__})"}).encode())


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, message and the structured fields we attach."""

    FIELDS = ("event", "session", "artifact", "backend", "groups", "key_bytes", "round", "message_index",
              "bytes_in", "bytes_out", "ms", "kind")

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": round(record.created, 3), "level": record.levelname.lower(), "message": record.getMessage()}
        entry.update({k: getattr(record, k) for k in self.FIELDS if hasattr(record, k)})
        return json.dumps(entry)


def configure_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter())
    logger = logging.getLogger("privlora")
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False


def serve(artifact: str, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          limits: SessionLimits = SessionLimits()) -> None:
    import uvicorn

    configure_logging(log_level)
    server = PrivateServer(artifact, limits)
    # uvicorn's access log prints request paths (session ids); ours logs truncated ids only
    uvicorn.run(create_app(server), host=host, port=port, log_level="warning", access_log=False,
                timeout_keep_alive=KEEP_ALIVE_SECONDS, ws_max_size=BodyLimits().round, ws_ping_interval=None)
