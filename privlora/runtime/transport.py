"""How a client reaches a :class:`~privlora.runtime.server.PrivateServer`: in process, over HTTP
(one request per message), or over one persistent WebSocket per session (``stream``: a message
is one binary frame each way). All carry the same bytes; the routes are defined in
``runtime/http.py``."""

from __future__ import annotations

import json
import struct
from typing import TYPE_CHECKING, Any, Protocol

from privlora.errors import PrivloraError

if TYPE_CHECKING:  # the CLI reads this module's names at start-up: no server import there
    from privlora.runtime.server import PrivateServer

API = "/v1"
TRANSPORTS = ("stream", "http")

# A stream frame: the round name's length, the round name, the group index and the message index,
# then the payload; a reply frame: the HTTP status code, then the reply (or a JSON error).
_REQUEST_HEAD, _REPLY_HEAD = struct.Struct("<HII"), struct.Struct("<H")


def stream_request(round_name: str, index: int, message: int, payload: bytes) -> bytes:
    name = round_name.encode()
    return _REQUEST_HEAD.pack(len(name), index, message) + name + payload


def read_stream_request(frame: bytes) -> tuple[str, int, int, bytes]:
    """(round name, group index, message index, payload); ValueError when malformed."""
    if len(frame) < _REQUEST_HEAD.size:
        raise ValueError("a stream frame is shorter than its header")
    length, index, message = _REQUEST_HEAD.unpack_from(frame)
    end = _REQUEST_HEAD.size + length
    if len(frame) < end:
        raise ValueError("a stream frame is shorter than its round name")
    return frame[_REQUEST_HEAD.size:end].decode("utf-8", errors="replace"), index, message, frame[end:]


def stream_reply(status: int, body: bytes) -> bytes:
    return _REPLY_HEAD.pack(status) + body


class TransportError(PrivloraError):
    """The server refused a request or could not be reached."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class Transport(Protocol):
    def info(self) -> dict[str, Any]: ...
    def open_session(self, evaluation_keys: bytes) -> str: ...
    def evaluate(self, session: str, round_name: str, index: int, message: int, payload: bytes) -> bytes: ...
    def close_session(self, session: str) -> None: ...


class InProcessTransport:
    """Direct calls: the embedded default when ``privlora generate`` gets no ``--server``."""

    def __init__(self, server: PrivateServer) -> None:
        self.server = server

    def info(self) -> dict[str, Any]:
        return self.server.info()

    def open_session(self, evaluation_keys: bytes) -> str:
        return self.server.open_session(evaluation_keys)

    def evaluate(self, session: str, round_name: str, index: int, message: int, payload: bytes) -> bytes:
        return self.server.evaluate(session, round_name, index, message, payload)

    def close_session(self, session: str) -> None:
        self.server.close_session(session)


class HttpTransport:
    """Binary bodies (``application/octet-stream``) over one keep-alive connection."""

    def __init__(self, url: str, timeout: float = 600.0) -> None:
        import httpx

        self.url = url.rstrip("/")
        self.timeout = timeout
        self.client = httpx.Client(base_url=self.url + API, timeout=timeout)

    def _request(self, method: str, path: str, content: bytes | None = None):
        import httpx

        headers = {"content-type": "application/octet-stream"} if content is not None else None
        for attempt in range(2):
            try:
                response = self.client.request(method, path, content=content, headers=headers)
                break
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
                # A kept-alive connection the server closed as we reused it. Every request here may
                # be sent again: a round is answered afresh, a key upload opens another session.
                if attempt:
                    raise TransportError(f"cannot reach the privlora server at {self.url}: {exc}") from None
            except httpx.HTTPError as exc:
                raise TransportError(f"cannot reach the privlora server at {self.url}: {exc}") from None
        if response.status_code >= 400:
            try:
                message = response.json().get("error", response.text)
            except ValueError:
                message = response.text
            raise TransportError(f"server refused {method} {path}: {response.status_code} {message}", response.status_code)
        return response

    def info(self) -> dict[str, Any]:
        return self._request("GET", "/health").json()

    def open_session(self, evaluation_keys: bytes) -> str:
        return self._request("POST", "/sessions", evaluation_keys).json()["session"]

    def evaluate(self, session: str, round_name: str, index: int, message: int, payload: bytes) -> bytes:
        return self._request("POST", f"/sessions/{session}/rounds/{round_name}/{index}/{message}", payload).content

    def close_session(self, session: str) -> None:
        self._request("DELETE", f"/sessions/{session}")


class StreamTransport(HttpTransport):
    """HTTP for health and sessions, and one persistent WebSocket per session for the messages:
    no HTTP request to parse per message. Measured on loopback, a message over HTTP costs about
    2 ms more than in process, a fifth of a bfv decode step; over the stream, about 1 ms
    (docs/benchmarks.md)."""

    def __init__(self, url: str, timeout: float = 600.0) -> None:
        super().__init__(url, timeout)
        self.ws_url = "ws" + self.url.removeprefix("http") + API
        self.sockets: dict[str, Any] = {}

    def _socket(self, session: str):
        from websockets.sync.client import connect

        if session not in self.sockets:
            try:
                self.sockets[session] = connect(f"{self.ws_url}/sessions/{session}/stream", max_size=None,
                                                open_timeout=self.timeout, compression=None)
            except Exception as exc:  # the websockets client raises several kinds for a refused handshake
                raise TransportError(f"cannot open a stream to the privlora server at {self.url}: {exc}") from None
        return self.sockets[session]

    def evaluate(self, session: str, round_name: str, index: int, message: int, payload: bytes) -> bytes:
        from websockets.exceptions import ConnectionClosed

        for attempt in range(2):
            socket = self._socket(session)
            try:
                socket.send(stream_request(round_name, index, message, payload))
                frame = socket.recv(timeout=self.timeout)
                break
            except ConnectionClosed as exc:
                self.sockets.pop(session, None)
                if exc.rcvd is not None and exc.rcvd.code == 1009:
                    raise TransportError("server refused the message: 413 request body too large", 413) from None
                if attempt:  # one retry on a fresh connection: every message may be sent again
                    raise TransportError(f"the stream to {self.url} closed: {exc}") from None
        (status,) = _REPLY_HEAD.unpack_from(frame)
        body = frame[_REPLY_HEAD.size:]
        if status >= 400:
            message_text = json.loads(body).get("error", "") if body else ""
            raise TransportError(f"server refused round {round_name}/{index}/{message}: {status} {message_text}",
                                 status)
        return body

    def close_session(self, session: str) -> None:
        socket = self.sockets.pop(session, None)
        if socket is not None:
            socket.close()
        super().close_session(session)


def http_transport(url: str, kind: str = "stream") -> HttpTransport:
    """The client side of ``privlora serve`` at ``url``: ``stream`` (default) or ``http``."""
    return StreamTransport(url) if kind == "stream" else HttpTransport(url)
