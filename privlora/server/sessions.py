"""The rules that bound a server's sessions, apart from any transport or backend: idle expiry,
a bound on their number and on their key bytes, each account's quota, own-only eviction and a
token-bucket rate limit. One server keeps one :class:`SessionTable`; Ray's replicas share one in
their session directory."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from privlora.core.wire import CapacityError, SessionError

log = logging.getLogger("privlora.server")


@dataclass(frozen=True)
class SessionLimits:
    idle_seconds: float = 3600.0  # a session unused this long is dropped
    max_sessions: int = 64
    max_key_bytes: int = 2 * 1024**3  # total evaluation-key bytes held for all sessions
    # Rows of x (queries of a LoRA map) a session may send in all. Extraction of a site's dW
    # needs about d_in rows (docs/security.md); a 100-token answer to a 50-token prompt uses 150
    # rows per group. None: no budget.
    max_rows: int | None = 1_000_000
    rate: float | None = 500.0  # requests per second per session, sustained; None: no limit
    burst: int = 1000  # requests a session may send at once before the rate applies


@dataclass
class TokenBucket:
    """A rate limit: ``rate`` requests per second sustained, ``burst`` at once."""

    rate: float | None
    burst: int
    allowance: float = 0.0
    refilled: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.allowance = float(self.burst)

    def take(self, now: float) -> bool:
        if self.rate is None:
            return True
        self.allowance = min(float(self.burst), self.allowance + (now - self.refilled) * self.rate)
        self.refilled = now
        if self.allowance < 1.0:
            return False
        self.allowance -= 1.0
        return True


@dataclass
class Session:
    """One client's session: its keys (the backend's session object, or the raw bytes in Ray's
    directory) and what the server's rules need to know of it."""

    keys: Any
    key_bytes: int
    owner: str | None  # the account's name; None without accounts
    bucket: TokenBucket | None = None  # the session's own rate limit, or its account's (shared)
    created: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    rounds: int = 0
    rows: int = 0  # without accounts: rows sent in this session, for the per-session budget


class SessionTable:
    """Sessions by id, and the rules that bound them: idle expiry, a bound on their number and on
    their key bytes, each account's quota. Only a session's owner may use or close it, and
    making room evicts least recently used sessions of the same owner only: without accounts
    every session has the same (no) owner, so any may go; with accounts, when the owner has
    nothing left to evict, the new session is refused (503) rather than another account's
    dropped. One server keeps one; Ray's replicas share one in the session directory."""

    def __init__(self, limits: SessionLimits) -> None:
        self.limits = limits
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()

    def sessions(self) -> list[Session]:
        with self._lock:
            return list(self._sessions.values())

    def add(self, session_id: str, session: Session, quota: int | None) -> list[str]:
        """Insert ``session``, making room as the rules say; the ids evicted to make it."""
        with self._lock:
            self._expire(time.monotonic())
            self._sessions[session_id] = session
            return self._make_room(session_id, session.owner, quota)

    def get(self, session_id: str, owner: str | None) -> Session:
        """The session, marked as just used; SessionError if unknown, expired or another's."""
        now = time.monotonic()
        with self._lock:
            self._expire(now)
            session = self._sessions.get(session_id)
            if session is None or session.owner != owner:  # another account's session: as if unknown
                raise SessionError("unknown or expired session")
            session.last_used = now
            self._sessions.move_to_end(session_id)
            return session

    def remove(self, session_id: str, owner: str | None) -> None:
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None or session.owner != owner:
                raise SessionError("unknown or expired session")
            del self._sessions[session_id]

    def _expire(self, now: float) -> None:
        for session_id in [s for s, v in self._sessions.items() if now - v.last_used > self.limits.idle_seconds]:
            del self._sessions[session_id]
            log.info("session expired", extra={"event": "expire", "session": session_tag(session_id)})

    def _over_capacity(self) -> bool:
        return (len(self._sessions) > self.limits.max_sessions or
                sum(s.key_bytes for s in self._sessions.values()) > self.limits.max_key_bytes)

    def _make_room(self, new: str, owner: str | None, quota: int | None) -> list[str]:
        own = [s for s, v in self._sessions.items() if v.owner == owner and s != new]
        evicted = []
        while own and (self._over_capacity() or (quota is not None and len(own) + 1 > quota)):
            session_id = own.pop(0)
            del self._sessions[session_id]
            evicted.append(session_id)
            log.info("session evicted", extra={"event": "evict", "session": session_tag(session_id), "account": owner})
        if self._over_capacity() and len(self._sessions) > 1:
            del self._sessions[new]
            log.info("server at capacity", extra={"event": "capacity", "account": owner})
            raise CapacityError(f"the server holds its maximum of sessions ({self.limits.max_sessions}) or of key "
                                "bytes; retry later")
        return evicted


LOCAL = SessionLimits(max_rows=None, rate=None)  # the embedded in-process server: the user's own



def session_tag(session_id: str) -> str:
    """A session's short name in logs: 8 characters of its random part, never the whole id."""
    return session_id.rpartition(".")[2][:8]


