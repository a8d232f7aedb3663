"""How a client reaches a privlora server: over HTTP (one request per message), or over one
persistent WebSocket per session (``stream``: a message is one binary frame each way), with TLS
when the URL is ``https``; in process through ``privlora.local``. All carry the same bytes and
report a refusal the same way (a :class:`TransportError` with the status and code of
``core/wire.py``); the server's routes are defined in ``server/http.py``."""

from __future__ import annotations

import json
import ssl
import time
from dataclasses import dataclass
from typing import Any, Protocol

from privlora.core.wire import API, HEARTBEAT, RECOVERABLE_CODES, STALL_SECONDS, read_stream_reply, stream_request
from privlora.errors import PrivloraError

TRANSPORTS = ("stream", "http")


class TransportError(PrivloraError):
    """The server refused a request (``status`` and ``code`` say why) or could not be reached
    (both None)."""

    exit_code = 1

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code

    @property
    def recoverable(self) -> bool:
        """A lost connection or session, a restarting or full server, a replay refused after a
        lost reply, a proxy in front of the server failing (Ray Serve's, when a replica dies):
        worth redoing the step (see ``SecureClient``). privlora's own errors carry a code."""
        infrastructure = self.code is None and self.status in (500, 502, 503, 504)  # a proxy's, not privlora's
        return self.status is None or self.code in RECOVERABLE_CODES or infrastructure


class Transport(Protocol):
    def info(self) -> dict[str, Any]: ...
    def models(self) -> list[dict[str, Any]]: ...  # the hosted artifacts, by the names the server gives them
    def open_session(self, evaluation_keys: bytes, artifact: str | None = None) -> str: ...
    def evaluate(self, session: str, round_name: str, index: int, message: int, payload: bytes) -> bytes: ...
    def close_session(self, session: str) -> None: ...
    def forget(self, session: str) -> None: ...  # drop local state of a session the server lost


TOKEN_HINT = "this server takes an API token: give it with --token or $PRIVLORA_TOKEN"


def unreachable(url: str, exc: Exception, what: str = "cannot reach") -> TransportError:
    """A connection that failed, said in one line: a certificate this client does not trust is a
    server reached, not a server down, and the fix is the CA certificate."""
    if "CERTIFICATE_VERIFY_FAILED" in str(exc):
        return TransportError(f"the privlora server at {url} was reached, but its TLS certificate is not trusted "
                              f"({exc}): pass its certificate or CA with --ca-cert PEM")
    return TransportError(f"{what} the privlora server at {url}: {exc}")


@dataclass(frozen=True)
class Credentials:
    """What a client presents to a remote server: an API token (servers with accounts) and the
    CA certificate to verify an ``https`` server against (default: the system's)."""

    token: str | None = None
    ca_cert: str | None = None

    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"} if self.token else {}

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca_cert)


def _refusal(body: bytes) -> tuple[str, str | None]:
    """The error message and code of a refusal's JSON body (or its text)."""
    text = body.decode("utf-8", "replace")
    try:
        refusal = json.loads(body)
        return str(refusal.get("error", text)), refusal.get("code")
    except (ValueError, AttributeError):
        return text, None


def refused(what: str, status: int, body: bytes, credentials: Credentials) -> TransportError:
    """The TransportError of a refusal: its status, message and code, and for a missing token, the fix."""
    message, code = _refusal(body)
    if code == "unauthenticated" and not credentials.token:  # the server's words are for raw HTTP
        return TransportError(f"the server refused {what} ({status}): {TOKEN_HINT}", status, code)
    return TransportError(f"server refused {what}: {status} {message}", status, code)


class HttpTransport:
    """Binary bodies (``application/octet-stream``) over one keep-alive connection."""

    def __init__(self, url: str, credentials: Credentials = Credentials(), timeout: float = 600.0) -> None:
        import httpx

        self.url = url.rstrip("/")
        self.timeout = timeout
        self.credentials = credentials
        verify = credentials.ssl_context() if self.url.startswith("https") else True
        self.client = httpx.Client(base_url=self.url + API, timeout=timeout, headers=credentials.headers(),
                                   verify=verify)

    def _request(self, method: str, path: str, content: bytes | None = None, params: dict[str, str] | None = None):
        import httpx

        headers = {"content-type": "application/octet-stream"} if content is not None else None
        for attempt in range(2):
            try:
                response = self.client.request(method, path, content=content, headers=headers, params=params)
                break
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
                # A kept-alive connection the server closed as we reused it. Every request here may
                # be sent again: a round is answered afresh, a key upload opens another session.
                if attempt:
                    raise unreachable(self.url, exc) from None
            except httpx.HTTPError as exc:
                raise unreachable(self.url, exc) from None
        if response.status_code >= 400:
            raise refused(f"{method} {path}", response.status_code, response.content, self.credentials)
        return response

    def info(self) -> dict[str, Any]:
        return self._request("GET", "/health").json()

    def models(self) -> list[dict[str, Any]]:
        return self._request("GET", "/models").json()["data"]

    def open_session(self, evaluation_keys: bytes, artifact: str | None = None) -> str:
        """A session on ``artifact`` (its id), which a server hosting several needs."""
        params = {"artifact": artifact} if artifact else None
        return self._request("POST", "/sessions", evaluation_keys, params).json()["session"]

    def evaluate(self, session: str, round_name: str, index: int, message: int, payload: bytes) -> bytes:
        return self._request("POST", f"/sessions/{session}/rounds/{round_name}/{index}/{message}", payload).content

    def close_session(self, session: str) -> None:
        self._request("DELETE", f"/sessions/{session}")

    def forget(self, session: str) -> None:
        pass


class StreamTransport(HttpTransport):
    """HTTP for health and sessions, and one persistent WebSocket per session for the messages:
    no HTTP request to parse per message, so a message costs about what it costs in process
    (docs/benchmarks.md)."""

    def __init__(self, url: str, credentials: Credentials = Credentials(), timeout: float = 600.0) -> None:
        super().__init__(url, credentials, timeout)
        self.ws_url = "ws" + self.url.removeprefix("http") + API
        self.sockets: dict[str, Any] = {}
        self.reconnects = 0  # messages sent again on a new connection

    def _socket(self, session: str):
        from websockets.exceptions import InvalidStatus
        from websockets.sync.client import connect

        if session not in self.sockets:
            try:
                secure = self.ws_url.startswith("wss")
                self.sockets[session] = connect(f"{self.ws_url}/sessions/{session}/stream", max_size=None,
                                                open_timeout=self.timeout, compression=None,
                                                additional_headers=self.credentials.headers(),
                                                ssl=self.credentials.ssl_context() if secure else None)
            except InvalidStatus as exc:  # the handshake refused, with the refusal's status and body
                raise refused("the stream", exc.response.status_code, exc.response.body or b"",
                              self.credentials) from None
            except Exception as exc:  # the websockets client raises several kinds for a failed handshake
                raise unreachable(self.url, exc, "cannot open a stream to") from None
        return self.sockets[session]

    def evaluate(self, session: str, round_name: str, index: int, message: int, payload: bytes) -> bytes:
        from websockets.exceptions import ConnectionClosed

        for attempt in range(2):
            socket = self._socket(session)
            try:
                socket.send(stream_request(round_name, index, message, payload))
                frame = self._reply(socket)
                break
            except (ConnectionClosed, OSError) as exc:  # TimeoutError included: a stalled connection
                self.forget(session)
                self.reconnects += 1
                if isinstance(exc, ConnectionClosed) and exc.rcvd is not None and exc.rcvd.code == 1009:
                    raise TransportError("server refused the message: 413 request body too large", 413,
                                         "too_large") from None
                if attempt:  # one retry on a fresh connection: every message may be sent again
                    raise TransportError(f"the stream to {self.url} closed: {exc}") from None
        status, body = read_stream_reply(frame)
        if status >= 400:
            refusal = json.loads(body) if body else {}
            raise TransportError(f"server refused round {round_name}/{index}/{message}: {status} "
                                 f"{refusal.get('error', '')}", status, refusal.get("code"))
        return body

    def _reply(self, socket: Any) -> bytes:
        """The reply frame, skipping heartbeats; TimeoutError when the server falls silent."""
        deadline = time.monotonic() + self.timeout
        while True:
            frame = socket.recv(timeout=min(STALL_SECONDS, max(deadline - time.monotonic(), 0.0)))
            if read_stream_reply(frame)[0] != HEARTBEAT:
                return frame

    def forget(self, session: str) -> None:
        socket = self.sockets.pop(session, None)
        if socket is not None:
            socket.close()

    def close_session(self, session: str) -> None:
        self.forget(session)
        super().close_session(session)


def http_transport(url: str, kind: str = "stream", credentials: Credentials = Credentials()) -> HttpTransport:
    """The client side of ``privlora serve`` at ``url``: ``stream`` (default) or ``http``."""
    return (StreamTransport if kind == "stream" else HttpTransport)(url, credentials)
