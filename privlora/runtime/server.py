"""The server side of secure generation: the server bundle, sessions and private rounds.

:class:`PrivateServer` is transport-free: the HTTP app (``runtime/http.py``) wraps it, and the
in-process transport calls it directly, so both paths run the same code. It loads the server
bundle only. Each client session holds that client's evaluation keys, with an idle expiry and
a bound on the number of sessions and on their total key bytes.

Two modes:

- with an accounts database (``serve --accounts``), every session belongs to an account; the
  query budget counts rows per LoRA site across all the account's sessions and restarts (see
  ``runtime/accounts.py``), the rate limit is per account, and an account holds at most its
  quota of sessions: opening one more evicts its own oldest, never another account's;
- without, anyone may open sessions, each with its own budget and rate limit, and the least
  recently used session is evicted when the server is full.

Logs carry event names, session ids, account names, round names, sizes and timings: never
payloads, keys or plaintext.
"""

from __future__ import annotations

import logging
import resource
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from privlora import backends
from privlora.core.artifact import SERVER, ArtifactError, artifact_id, load_bundle, read_server_program
from privlora.core.types import GroupSpec, groups_from_rounds
from privlora.runtime.accounts import Account, AccountStore
from privlora.runtime.refusals import (AuthError, BudgetError, CapacityError, ForbiddenError, RateLimitError, RoundError,
                                       SessionError, UnknownArtifactError)

log = logging.getLogger("privlora.server")

SESSION_PREFIX = 12  # hex digits of the artifact id that start each of its session ids


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
            log.info("session expired", extra={"event": "expire", "session": _tag(session_id)})

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
            log.info("session evicted", extra={"event": "evict", "session": _tag(session_id), "account": owner})
        if self._over_capacity() and len(self._sessions) > 1:
            del self._sessions[new]
            log.info("server at capacity", extra={"event": "capacity", "account": owner})
            raise CapacityError(f"the server holds its maximum of sessions ({self.limits.max_sessions}) or of key "
                                "bytes; retry later")
        return evicted


LOCAL = SessionLimits(max_rows=None, rate=None)  # the embedded in-process server: the user's own


class PrivateServer:
    def __init__(self, artifact: str | Path, limits: SessionLimits = SessionLimits(),
                 accounts: AccountStore | None = None) -> None:
        bundle = load_bundle(artifact, SERVER)
        manifest = bundle.manifest
        self.artifact_id = artifact_id(artifact)
        self.name = manifest["adapter"]["name"]  # readable; the id is what names it exactly
        self.session_prefix = self.artifact_id[:SESSION_PREFIX] + "."  # a hosting server routes sessions by it
        self.backend_name = manifest["backend"]["name"]
        self.groups: dict[tuple[str, int], GroupSpec] = {(g.round, g.index): g for g in groups_from_rounds(manifest["rounds"])}
        self.backend = backends.load(self.backend_name).Server(read_server_program(bundle), list(self.groups.values()),
                                                               manifest["backend"]["parameters"])
        self.limits = limits
        self.accounts = accounts
        self.sessions = SessionTable(limits)
        self._account_buckets: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()
        log.info("loaded artifact", extra={"event": "load", "artifact": self.artifact_id[:16],
                                           "backend": self.backend_name, "groups": len(self.groups)})

    def describe(self) -> dict[str, Any]:
        """This artifact's entry in the health answer."""
        sessions = self.sessions.sessions()
        return {"artifact": self.artifact_id, "name": self.name, "backend": self.backend_name,
                "messages": self.backend.messages, "sessions": len(sessions), "groups": len(self.groups),
                "session_key_bytes": sum(s.key_bytes for s in sessions)}

    def info(self) -> dict[str, Any]:
        return Hosting([self]).info()

    def account(self, authorization: str | None) -> Account | None:
        """The account an ``Authorization: Bearer <token>`` header names; None without accounts.
        AuthError (401) when the header is missing or the token unknown, ForbiddenError (403) when
        it was revoked."""
        if self.accounts is None:
            return None
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("missing API token: send 'Authorization: Bearer <token>'")
        return self.accounts.authenticate(token.strip())

    def admin(self, authorization: str | None) -> None:
        """Admits an admin account (or anyone, without accounts): the routes that show every account."""
        account = self.account(authorization)
        if account is not None and not account.admin:
            raise ForbiddenError(f"account {account.name!r} is not an admin account")

    def new_session_id(self) -> str:
        return f"{self.session_prefix}{secrets.token_urlsafe(18)}"

    def open_session(self, evaluation_keys: bytes, account: Account | None = None) -> str:
        keys = self.backend.open_session(evaluation_keys)  # PayloadError on bad keys, before any state changes
        session_id = self.new_session_id()
        with self._lock:
            bucket = self._bucket(account)
        self.sessions.add(session_id, Session(keys, len(evaluation_keys), _owner(account), bucket),
                          account.limits.max_sessions if account else None)
        log.info("session opened", extra={"event": "open", "session": _tag(session_id), "account": _owner(account),
                                          "key_bytes": len(evaluation_keys)})
        return session_id

    def close_session(self, session_id: str, account: Account | None = None) -> None:
        self.sessions.remove(session_id, _owner(account))
        log.info("session closed", extra={"event": "close", "session": _tag(session_id)})

    def _bucket(self, account: Account | None) -> TokenBucket:
        if account is None:
            return TokenBucket(self.limits.rate, self.limits.burst)
        bucket = self._account_buckets.get(account.name)
        if bucket is None or (bucket.rate, bucket.burst) != (account.limits.rate, account.limits.burst):
            bucket = self._account_buckets[account.name] = TokenBucket(account.limits.rate, account.limits.burst)
        return bucket

    def _session(self, session_id: str, account: Account | None) -> Session:
        return self.sessions.get(session_id, _owner(account))

    def group(self, round_name: str, index: int, message: int = 0) -> GroupSpec:
        group = self.groups.get((round_name, index))
        if group is None:
            raise RoundError(f"no private group {round_name}/{index} in this artifact")
        if not 0 <= message < self.backend.messages:
            raise RoundError(f"no message {message} in {round_name}/{index}: the {self.backend_name} backend "
                             f"takes {self.backend.messages} per group")
        return group

    def _admit(self, session_id: str, session: Session, group: GroupSpec, rows: int, account: Account | None) -> None:
        """Rate limit (token bucket) and query budget; raises before any work is done."""
        with self._lock:
            if not session.bucket.take(time.monotonic()):
                log.info("rate limited", extra={"event": "rate_limit", "session": _tag(session_id), "account": session.owner})
                rate = session.bucket.rate
                raise RateLimitError(f"too many requests: at most {rate:g} per second per "
                                     f"{'account' if account else 'session'}")
            if account is None:
                if self.limits.max_rows is not None and session.rows + rows > self.limits.max_rows:
                    log.info("budget exhausted", extra={"event": "budget", "session": _tag(session_id)})
                    raise BudgetError(f"query budget exhausted: {session.rows} of {self.limits.max_rows} rows used; "
                                      "open a new session")
                session.rows += rows
                return
        assert self.accounts is not None
        try:
            self.accounts.charge(account, self.artifact_id, (site.module for site in group.sites), rows)
        except BudgetError:
            log.info("budget exhausted", extra={"event": "budget", "session": _tag(session_id), "account": account.name})
            raise

    def evaluate(self, session_id: str, round_name: str, index: int, message: int, payload: bytes,
                 account: Account | None = None) -> bytes:
        """One message of one group: parsed once (the rows it carries count against the budget
        before any work), then evaluated by the backend with the session's keys and state."""
        session = self._session(session_id, account)
        group = self.group(round_name, index, message)
        request = self.backend.parse(group, message, payload)
        self._admit(session_id, session, group, request.rows, account)
        start = time.perf_counter()
        reply = self.backend.evaluate(group, request, session.keys)
        session.rounds += 1
        log.debug("round", extra={"event": "round", "session": _tag(session_id), "round": group.key,
                                  "message_index": message, "bytes_in": len(payload), "bytes_out": len(reply),
                                  "ms": round(1000 * (time.perf_counter() - start), 2)})
        return reply


class Hosting:
    """The artifacts one server process hosts (``privlora serve ART1 ART2 ...``), each with its own
    sessions, limits and budgets, sharing one accounts database. A session id starts with its
    artifact's id prefix, so a request naming a session reaches the right artifact."""

    def __init__(self, servers: list[PrivateServer]) -> None:
        self.servers = {server.artifact_id: server for server in servers}
        if len(self.servers) != len(servers):
            raise ArtifactError("the same artifact is named twice")
        self._by_prefix = {server.session_prefix: server for server in servers}
        if len(self._by_prefix) != len(servers):  # two ids sharing 12 hex digits: 2^-48
            raise ArtifactError("two artifacts share their id prefix")
        self.first = servers[0]
        self.accounts = self.first.accounts

    def artifact(self, artifact: str | None) -> PrivateServer:
        """The hosted artifact of this id (or unique id prefix); with one hosted, None names it."""
        if artifact is None:
            if len(self.servers) == 1:
                return self.first
            raise UnknownArtifactError(f"this server hosts {len(self.servers)} artifacts: name one (artifact=<id>)")
        matches = [server for artifact_id, server in self.servers.items() if artifact_id.startswith(artifact)]
        if len(matches) != 1 or not artifact:
            raise UnknownArtifactError(f"no artifact {artifact[:16]!r} on this server")
        return matches[0]

    def session(self, session_id: str) -> PrivateServer:
        server = self._by_prefix.get(session_id[:SESSION_PREFIX + 1])
        if server is None:
            raise SessionError("unknown or expired session")
        return server

    # The routes' work, the caller authenticated first (so that a stranger learns nothing of sessions).
    def open_session(self, authorization: str | None, artifact: str | None, evaluation_keys: bytes) -> str:
        account = self.first.account(authorization)
        return self.artifact(artifact).open_session(evaluation_keys, account)

    def close_session(self, authorization: str | None, session_id: str) -> None:
        account = self.first.account(authorization)
        self.session(session_id).close_session(session_id, account)

    def evaluate(self, authorization: str | None, session_id: str, round_name: str, index: int, message: int,
                 payload: bytes) -> bytes:
        account = self.first.account(authorization)
        return self.session(session_id).evaluate(session_id, round_name, index, message, payload, account)

    def info(self) -> dict[str, Any]:
        """The health answer: every hosted artifact, and with one, its fields at the top level too."""
        artifacts = [server.describe() for server in self.servers.values()]
        single = artifacts[0] if len(artifacts) == 1 else {}
        return {**single, "artifacts": artifacts, "accounts": self.accounts is not None,
                "sessions": sum(a["sessions"] for a in artifacts),
                "session_key_bytes": sum(a["session_key_bytes"] for a in artifacts),
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _tag(session_id: str) -> str:
    """A session's short name in logs: 8 characters of its random part, never the whole id."""
    return session_id.rpartition(".")[2][:8]


def _owner(account: Account | None) -> str | None:
    return None if account is None else account.name
