"""The in-process pairing of a client and a server, for one user who is both (the embedded
default of ``privlora generate``, ``demo`` and ``bench``; tests): the only module that imports
both rooms. Every call goes through the server's one entry point,
:class:`~privlora.server.hosting.Hosting` (authentication, routing, refusals), exactly as a
request over HTTP does; only the bytes skip the network."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from privlora.client.secure import SecureClient
from privlora.client.transports import TransportError
from privlora.core.wire import refusal_of
from privlora.server.hosting import Hosting
from privlora.server.private import PrivateServer
from privlora.server.sessions import LOCAL


class InProcessTransport:
    """Direct calls into a :class:`Hosting` (a lone :class:`PrivateServer` is hosted alone); with
    a token, as that token's account (the server's accounts database decides its limits)."""

    def __init__(self, hosted: Hosting | PrivateServer, token: str | None = None) -> None:
        self.hosting = hosted if isinstance(hosted, Hosting) else Hosting([hosted])
        self.authorization = f"Bearer {token}" if token else None

    def info(self) -> dict[str, Any]:
        return self.hosting.health(self.authorization)

    def models(self) -> list[dict[str, Any]]:
        return self._call(lambda account: self.hosting.models())["data"]

    def _call(self, method: Callable[..., Any], *args: Any) -> Any:
        try:
            return method(self.hosting.account(self.authorization), *args)
        except Exception as exc:
            refusal = refusal_of(exc)
            if refusal is None:
                raise
            raise TransportError(f"server refused: {refusal.status} {exc}", refusal.status, refusal.code) from exc

    def open_session(self, evaluation_keys: bytes, artifact: str | None = None) -> str:
        return self._call(self.hosting.open_session, artifact, evaluation_keys)

    def evaluate(self, session: str, round_name: str, index: int, message: int, payload: bytes) -> bytes:
        return self._call(self.hosting.evaluate, session, round_name, index, message, payload)

    def close_session(self, session: str) -> None:
        self._call(self.hosting.close_session, session)

    def forget(self, session: str) -> None:
        pass


def local_transport(artifact: str | Path) -> InProcessTransport:
    """An in-process server of ``artifact`` for its own user: no accounts, no budget, no rate
    limit, and no background work competing with the client for the same cores."""
    return InProcessTransport(PrivateServer(artifact, LOCAL, idle_work=False))


def open_local(artifact: str | Path, cache_keys: bool = False) -> SecureClient:
    """Client and an in-process server on one artifact (the embedded default; tests)."""
    return SecureClient(artifact, local_transport(artifact), cache_keys=cache_keys)
