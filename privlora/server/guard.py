"""What a connection may cost the server before anyone knows who opened it: a cap on connections
(all together, sized from the process's file-descriptor limit, and per client address) and
deadlines for the request line and headers and for a body that stops arriving. uvicorn's own
keep-alive timeout only starts after a response, so without these a connection that never sends
a request stays open for good, and enough of them exhaust the descriptors (the accept loop then
logs an error per attempt and health stops answering).

A connection over a cap, or past a deadline, is cut (``transport.abort()``): it has sent nothing
that deserves an answer, and a cut frees its descriptor at once.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("privlora.server")

RESERVED_DESCRIPTORS = 64  # for the server's own files, the accounts database, logs and sockets
# A request refused before its body was read (no token, unknown session, too many in progress):
# so much more of the body is read and dropped, for so long, so that a client sending a small
# body still reads its refusal; then the connection is cut rather than the rest drained.
LINGER_BYTES = 1024**2
LINGER_SECONDS = 2.0


@dataclass(frozen=True)
class ConnectionLimits:
    header_seconds: float = 10.0  # from a request's first byte (or the connection's opening) to its last header
    body_idle_seconds: float = 30.0  # the longest a body may stop arriving
    stream_idle_seconds: float = 300.0  # the longest a stream may wait for its next frame
    max_header_bytes: int = 16 * 1024
    max_connections: int | None = None  # None: what the descriptor limit allows
    per_address: float = 0.5  # the share of max_connections one client address may hold


def descriptor_budget() -> int:
    """Connections the process can hold: its descriptor limit (raised to the hard limit) less a reserve."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return max(16, min(soft, 1 << 16) - RESERVED_DESCRIPTORS)


def guarded_h11(limits: ConnectionLimits) -> type[H11Protocol]:
    """uvicorn's h11 protocol with the caps and deadlines of ``limits``."""
    total = limits.max_connections or descriptor_budget()
    per_address = max(1, int(total * limits.per_address))

    class GuardedH11(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.waiting_since: float | None = time.monotonic()  # for a request's headers
            self.last_data = time.monotonic()
            self.linger: int | None = None  # bytes of an unread body still to drop before the cut
            address = self.client[0] if self.client else None
            if len(self.connections) > total or (
                    address is not None and
                    sum(1 for c in self.connections if c.client and c.client[0] == address) > per_address):
                log.warning("connection refused: too many open", extra={"event": "connections",
                                                                        "kind": f"{len(self.connections)} open"})
                transport.abort()
                return
            self.loop.call_later(1.0, self._watch)

        def data_received(self, data: bytes) -> None:
            if self.linger is not None:
                self.linger -= len(data)
                if self.linger < 0:
                    self.transport.abort()
                    return
            now = time.monotonic()
            self.last_data = now
            if self.waiting_since is None and not self._in_request():
                self.waiting_since = now  # the first byte of the next request on a kept-alive connection
            super().data_received(data)
            if self.linger is not None and self.conn.their_state is not h11.SEND_BODY:
                self.linger = None  # the refused body ended within the allowance: the connection lives on

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self.waiting_since = None  # kept alive: uvicorn's own timeout closes it if no request comes
            if self.conn.their_state is h11.SEND_BODY:  # answered before its body was read: a refusal
                self.linger = LINGER_BYTES
                self.loop.call_later(LINGER_SECONDS, self._end_linger, self.cycle)

        def _end_linger(self, refused: Any) -> None:
            if self.linger is not None and self.cycle is refused and not self.transport.is_closing():
                self.transport.abort()

        def _in_request(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

        def _watch(self) -> None:
            if self.transport.is_closing() or self.transport.get_protocol() is not self:  # closed, or a WebSocket now
                return
            now = time.monotonic()
            if self._in_request():
                self.waiting_since = None
                late = self.conn.their_state is h11.SEND_BODY and now - self.last_data > limits.body_idle_seconds
            else:
                late = self.waiting_since is not None and now - self.waiting_since > limits.header_seconds
            if late:
                log.info("connection cut: too slow", extra={"event": "connections", "kind": "deadline"})
                self.transport.abort()
                return
            self.loop.call_later(1.0, self._watch)

    return GuardedH11


def header_bytes(scope: dict[str, Any]) -> int:
    return sum(len(name) + len(value) for name, value in scope.get("headers", ()))
