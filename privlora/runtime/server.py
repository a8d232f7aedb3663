"""The server side of secure generation: the server bundle, sessions and private rounds.

:class:`PrivateServer` is transport-free: the HTTP app (``runtime/http.py``) wraps it, and the
in-process transport calls it directly, so both paths run the same code. It loads the server
bundle only. Each client session holds that client's evaluation keys, with an idle expiry and
a bound on the number of sessions and on their total key bytes (least recently used first out).
Each session also has a query budget (rows of x sent) and a request rate limit. Logs carry event names, session ids, round names, sizes and timings: never payloads, keys or
plaintext.
"""

from __future__ import annotations

import logging
import resource
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privlora import backends
from privlora.core.artifact import SERVER, artifact_id, load_bundle, read_server_program
from privlora.core.types import GroupSpec, groups_from_rounds
from privlora.errors import PrivloraError

log = logging.getLogger("privlora.server")


class SessionError(PrivloraError):
    """The session id is unknown or has expired."""


class RoundError(PrivloraError):
    """The round or group named by a request does not exist in this artifact."""


class RateLimitError(PrivloraError):
    """The session sends requests faster than its rate limit."""


class BudgetError(PrivloraError):
    """The session has used up its query budget."""


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
class Session:
    keys: Any  # the backend's session object
    key_bytes: int
    created: float
    last_used: float
    rounds: int = 0
    rows: int = 0
    allowance: float = 0.0  # token bucket for the rate limit
    refilled: float = 0.0


LOCAL = SessionLimits(max_rows=None, rate=None)  # the embedded in-process server: the user's own


class PrivateServer:
    def __init__(self, artifact: str | Path, limits: SessionLimits = SessionLimits()) -> None:
        bundle = load_bundle(artifact, SERVER)
        manifest = bundle.manifest
        self.artifact_id = artifact_id(artifact)
        self.backend_name = manifest["backend"]["name"]
        self.groups: dict[tuple[str, int], GroupSpec] = {(g.round, g.index): g for g in groups_from_rounds(manifest["rounds"])}
        self.backend = backends.load(self.backend_name).Server(read_server_program(bundle), list(self.groups.values()),
                                                               manifest["backend"]["parameters"])
        self.limits = limits
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()
        log.info("loaded artifact", extra={"event": "load", "artifact": self.artifact_id[:16],
                                           "backend": self.backend_name, "groups": len(self.groups)})

    def info(self) -> dict[str, Any]:
        return {"artifact": self.artifact_id, "backend": self.backend_name, "messages": self.backend.messages,
                "sessions": len(self._sessions),
                "groups": len(self.groups), "session_key_bytes": sum(s.key_bytes for s in self._sessions.values()),
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}

    def open_session(self, evaluation_keys: bytes) -> str:
        keys = self.backend.open_session(evaluation_keys)  # PayloadError on bad keys, before any state changes
        session_id = secrets.token_urlsafe(18)
        now = time.monotonic()
        with self._lock:
            self._expire(now)
            self._sessions[session_id] = Session(keys, len(evaluation_keys), now, now,
                                                 allowance=float(self.limits.burst), refilled=now)
            self._evict()
        log.info("session opened", extra={"event": "open", "session": session_id[:8], "key_bytes": len(evaluation_keys)})
        return session_id

    def close_session(self, session_id: str) -> None:
        with self._lock:
            if self._sessions.pop(session_id, None) is None:
                raise SessionError("unknown or expired session")
        log.info("session closed", extra={"event": "close", "session": session_id[:8]})

    def _expire(self, now: float) -> None:
        for session_id in [s for s, v in self._sessions.items() if now - v.last_used > self.limits.idle_seconds]:
            del self._sessions[session_id]
            log.info("session expired", extra={"event": "expire", "session": session_id[:8]})

    def _evict(self) -> None:
        """Least recently used out until both bounds hold (the newest session always stays)."""
        while len(self._sessions) > 1 and (len(self._sessions) > self.limits.max_sessions or
                                           sum(s.key_bytes for s in self._sessions.values()) > self.limits.max_key_bytes):
            session_id, _ = self._sessions.popitem(last=False)
            log.info("session evicted", extra={"event": "evict", "session": session_id[:8]})

    def _session(self, session_id: str) -> Session:
        now = time.monotonic()
        with self._lock:
            self._expire(now)
            session = self._sessions.get(session_id)
            if session is None:
                raise SessionError("unknown or expired session")
            session.last_used = now
            self._sessions.move_to_end(session_id)
            return session

    def group(self, round_name: str, index: int, message: int = 0) -> GroupSpec:
        group = self.groups.get((round_name, index))
        if group is None:
            raise RoundError(f"no private group {round_name}/{index} in this artifact")
        if not 0 <= message < self.backend.messages:
            raise RoundError(f"no message {message} in {round_name}/{index}: the {self.backend_name} backend "
                             f"takes {self.backend.messages} per group")
        return group

    def _admit(self, session_id: str, session: Session, rows: int) -> None:
        """Rate limit (token bucket) and query budget; raises before any work is done."""
        with self._lock:
            now = time.monotonic()
            session.allowance = min(float(self.limits.burst),
                                    session.allowance + (now - session.refilled) * (self.limits.rate or 0.0))
            session.refilled = now
            if self.limits.rate is not None and session.allowance < 1.0:
                log.info("rate limited", extra={"event": "rate_limit", "session": session_id[:8]})
                raise RateLimitError(f"too many requests: at most {self.limits.rate:g} per second per session")
            if self.limits.max_rows is not None and session.rows + rows > self.limits.max_rows:
                log.info("budget exhausted", extra={"event": "budget", "session": session_id[:8]})
                raise BudgetError(f"query budget exhausted: {session.rows} of {self.limits.max_rows} rows used; "
                                  "open a new session")
            session.allowance -= 1.0
            session.rows += rows

    def evaluate(self, session_id: str, round_name: str, index: int, message: int, payload: bytes) -> bytes:
        """One message of one group: parsed once (the rows it carries count against the budget
        before any work), then evaluated by the backend with the session's keys and state."""
        session = self._session(session_id)
        group = self.group(round_name, index, message)
        request = self.backend.parse(group, message, payload)
        self._admit(session_id, session, request.rows)
        start = time.perf_counter()
        reply = self.backend.evaluate(group, request, session.keys)
        session.rounds += 1
        log.debug("round", extra={"event": "round", "session": session_id[:8], "round": group.key,
                                  "message_index": message, "bytes_in": len(payload), "bytes_out": len(reply),
                                  "ms": round(1000 * (time.perf_counter() - start), 2)})
        return reply
