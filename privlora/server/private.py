"""One artifact's private rounds on the adapter owner's machine: its server bundle, its sessions
and the admission of every message (rate limit, then query budget, before any work).

:class:`PrivateServer` neither authenticates nor routes: :class:`~privlora.server.hosting.Hosting`
does both for every transport (HTTP, the stream, Ray replicas and the in-process pairing of
``privlora.local``) and hands it the caller's account. It loads the server bundle only. Each
client session holds that client's evaluation keys (see ``server/sessions.py`` for the rules).

Two modes:

- with an accounts database (``serve --accounts``), every session belongs to an account; the
  query budget counts rows per LoRA site across all the account's sessions and restarts (see
  ``server/accounts.py``), the rate limit is per account, and an account holds at most its
  quota of sessions: opening one more evicts its own oldest, never another account's;
- without, anyone may open sessions, each with its own budget and rate limit, and the least
  recently used session is evicted when the server is full.

Logs carry event names, session ids, account names, round names, sizes and timings: never
payloads, keys or plaintext.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from privlora import backends
from privlora.core.artifact import SERVER, adapter_key, artifact_id, load_bundle, read_server_program
from privlora.core.types import GroupSpec, groups_from_rounds
from privlora.core.wire import BudgetError, RateLimitError, RoundError
from privlora.backends.pll import Fingerprint
from privlora.server.accounts import Account, AccountStore
from privlora.server.fingerprints import FingerprintKey, account_fingerprint
from privlora.server.sessions import Session, SessionLimits, SessionTable, TokenBucket, session_tag

log = logging.getLogger("privlora.server")

SESSION_PREFIX = 12  # hex digits of the artifact id that start each of its session ids
NO_IDLE_WORK = {"zero_pool": 0}  # the backend parameters that turn background work off


def default_name(artifact: str | Path) -> str:
    """The name an artifact is served under unless given one: its directory's, as the operator
    typed it (a link keeps its own name), as the client's ``Assistant`` names it too."""
    return Path(artifact).absolute().name


class PrivateServer:
    def __init__(self, artifact: str | Path, limits: SessionLimits = SessionLimits(),
                 accounts: AccountStore | None = None, idle_work: bool = True, name: str | None = None) -> None:
        """``idle_work`` False: no background work between requests (bfv's pool of encryptions of
        zero). In process with its own client, the server's idle time is the client's working time,
        and a thread filling the pool then slows the client's public segments (docs/benchmarks.md).
        ``name``: what health, the models list and the logs call it (default: its directory's)."""
        bundle = load_bundle(artifact, SERVER)
        manifest = bundle.manifest
        self.artifact_id = artifact_id(artifact)
        self.name = name or default_name(artifact)  # stable and readable; the id is what names it exactly
        self.adapter_name = manifest["adapter"]["name"]  # the adapter's directory at compile time: not unique
        self.base_name = Path(manifest["base"]["name"]).name  # without the compiling machine's path
        self.adapter_key = adapter_key(artifact)  # what the query budget is counted against
        self.session_prefix = self.artifact_id[:SESSION_PREFIX] + "."  # a hosting server routes sessions by it
        self.backend_name = manifest["backend"]["name"]
        self.groups: dict[tuple[str, int], GroupSpec] = {(g.round, g.index): g for g in groups_from_rounds(manifest["rounds"])}
        parameters = {**manifest["backend"]["parameters"], **({} if idle_work else NO_IDLE_WORK)}
        self.backend = backends.load(self.backend_name).Server(read_server_program(bundle), list(self.groups.values()),
                                                               parameters)
        self.limits = limits
        self.accounts = accounts
        self.fingerprint_key: FingerprintKey | None = None  # set when this server marks its accounts' answers
        if accounts is not None:
            accounts.adopt(self.artifact_id, self.adapter_key)
            key = accounts.fingerprint_key()
            if key.enabled and self.backend.fingerprints:
                self.fingerprint_key = key
        self.sessions = SessionTable(limits)
        self._account_buckets: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()
        log.info("loaded artifact", extra={"event": "load", "model": self.name, "artifact": self.artifact_id[:16],
                                           "backend": self.backend_name, "groups": len(self.groups),
                                           "fingerprints": self.fingerprint_key.strength if self.fingerprint_key else 0})

    def describe(self) -> dict[str, Any]:
        """This artifact's entry in the health answer."""
        sessions = self.sessions.sessions()
        return {"artifact": self.artifact_id, "name": self.name, "adapter": self.adapter_key, "backend": self.backend_name,
                "messages": self.backend.messages, "sessions": len(sessions), "groups": len(self.groups),
                "session_key_bytes": sum(s.key_bytes for s in sessions)}

    def model(self) -> dict[str, Any]:
        """This artifact's entry in the models list: what a caller needs to choose it, and nothing
        of other callers (no sessions, no memory), so that any account may read it."""
        return {"id": self.name, "object": "model", "artifact": self.artifact_id, "backend": self.backend_name,
                "adapter": self.adapter_name, "base": self.base_name, "groups": len(self.groups)}

    def new_session_id(self) -> str:
        return f"{self.session_prefix}{secrets.token_urlsafe(18)}"

    def _fingerprint(self, account: Account | None) -> dict[str, Fingerprint]:
        """The keyword that marks a session with its account's fingerprint, where this server marks."""
        if account is None or self.fingerprint_key is None:
            return {}
        sites = [site for group in self.groups.values() for site in group.sites]
        return {"fingerprint": account_fingerprint(self.fingerprint_key, account.name, sites)}

    def open_session(self, evaluation_keys: bytes, account: Account | None = None) -> str:
        # PayloadError on bad keys, before any state changes
        keys = self.backend.open_session(evaluation_keys, **self._fingerprint(account))
        session_id = self.new_session_id()
        with self._lock:
            bucket = self._bucket(account)
        self.sessions.add(session_id, Session(keys, len(evaluation_keys), _owner(account), bucket),
                          account.limits.max_sessions if account else None)
        log.info("session opened", extra={"event": "open", "model": self.name, "session": session_tag(session_id),
                                          "account": _owner(account), "key_bytes": len(evaluation_keys)})
        return session_id

    def close_session(self, session_id: str, account: Account | None = None) -> None:
        self.sessions.remove(session_id, _owner(account))
        log.info("session closed", extra={"event": "close", "model": self.name, "session": session_tag(session_id)})

    def _bucket(self, account: Account | None) -> TokenBucket:
        if account is None:
            return TokenBucket(self.limits.rate, self.limits.burst)
        bucket = self._account_buckets.get(account.name)
        if bucket is None or (bucket.rate, bucket.burst) != (account.limits.rate, account.limits.burst):
            bucket = self._account_buckets[account.name] = TokenBucket(account.limits.rate, account.limits.burst)
        return bucket

    def _session(self, session_id: str, account: Account | None) -> Session:
        return self.sessions.get(session_id, _owner(account))

    def check_session(self, session_id: str, account: Account | None) -> None:
        """SessionError unless the session is open and the account's (a request's first check)."""
        self._session(session_id, account)

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
                log.info("rate limited", extra={"event": "rate_limit", "session": session_tag(session_id), "account": session.owner})
                rate = session.bucket.rate
                raise RateLimitError(f"too many requests: at most {rate:g} per second per "
                                     f"{'account' if account else 'session'}")
            if account is None:
                if self.limits.max_rows is not None and session.rows + rows > self.limits.max_rows:
                    log.info("budget exhausted", extra={"event": "budget", "session": session_tag(session_id)})
                    raise BudgetError(f"query budget exhausted: {session.rows} of {self.limits.max_rows} rows used; "
                                      "open a new session")
                session.rows += rows
                return
        assert self.accounts is not None
        try:
            self.accounts.charge(account, self.adapter_key, (site.module for site in group.sites), rows)
        except BudgetError:
            log.info("budget exhausted", extra={"event": "budget", "session": session_tag(session_id), "account": account.name})
            raise

    def evaluate(self, session_id: str, round_name: str, index: int, message: int, payload: bytes,
                 account: Account | None = None) -> bytes:
        """One message of one group: parsed once (the rows it carries count against the budget
        before any work), then evaluated by the backend with the session's keys and state."""
        session = self._session(session_id, account)
        group = self.group(round_name, index, message)
        request = self.backend.parse(group, message, payload, session.keys)
        self._admit(session_id, session, group, request.rows, account)
        start = time.perf_counter()
        reply = self.backend.evaluate(group, request, session.keys)
        session.rounds += 1
        log.debug("round", extra={"event": "round", "session": session_tag(session_id), "round": group.key,
                                  "message_index": message, "bytes_in": len(payload), "bytes_out": len(reply),
                                  "ms": round(1000 * (time.perf_counter() - start), 2)})
        return reply



def _owner(account: Account | None) -> str | None:
    return None if account is None else account.name
