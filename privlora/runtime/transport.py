"""How a client reaches a :class:`~privlora.runtime.server.PrivateServer`: in process, or over
HTTP. Both carry the same bytes; the HTTP routes are defined in ``runtime/http.py``."""

from __future__ import annotations

from typing import Any, Protocol

from privlora.errors import PrivloraError
from privlora.runtime.server import PrivateServer

API = "/v1"


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
