"""The one entry point of a privlora server: authentication, artifact routing and the caller's
refusals, for every transport (the HTTP routes, the WebSocket stream, Ray Serve replicas and the
in-process pairing of ``privlora.local``), so that every path runs the same code. It calls
down into each hosted :class:`~privlora.server.private.PrivateServer`; they never call back."""

from __future__ import annotations

import resource
from typing import Any

from privlora.core.artifact import ArtifactError
from privlora.core.wire import AuthError, ForbiddenError, SessionError, UnknownArtifactError
from privlora.server.accounts import Account, AccountStore
from privlora.server.fairness import FairLimits, FairQueue
from privlora.server.private import SESSION_PREFIX, PrivateServer

# What only an operator sees in the health answer: other callers' comings and goings.
OPERATOR_FIELDS = frozenset({"sessions", "session_key_bytes", "requests_in_progress", "requests_waiting",
                             "peak_rss_bytes", "replica"})


class HostingBase:
    """What every hosting does before it touches an artifact: who the caller is (the accounts
    database), how many of its requests are in progress (``fair.request``), and what it may see of
    the server. :class:`Hosting` serves the artifacts in this process; the evaluation process of
    ``server/evaluator.py`` serves them in a child process with the same methods."""

    def __init__(self, accounts: AccountStore | None, adapter_keys: list[str], models: list[dict[str, Any]],
                 fair: FairLimits) -> None:
        self.accounts = accounts
        self.adapter_keys = adapter_keys  # the hosted adapters' keys, what budgets are counted against
        self._models = models
        self.fair = FairQueue(fair)

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

    def models(self) -> dict[str, Any]:
        """The hosted models by the names they are served under, the same for every account: what
        it needs to choose one, nothing of other callers (no sessions, no memory)."""
        return {"object": "list", "data": self._models}

    def caller(self, account: Account | None, session_id: str) -> str:
        """Whose fair share a request draws on: its account's, or without accounts its session's."""
        return f"account:{account.name}" if account is not None else f"session:{session_id}"

    def health(self, authorization: str | None) -> dict[str, Any]:
        """The health answer, as much as the caller may see: a stranger (no valid token on a server
        with accounts) learns only that the server is up; an account, the hosted artifacts; an
        admin (or anyone, without accounts), the sessions and memory too."""
        try:
            account = self.account(authorization)
        except (AuthError, ForbiddenError):
            return {"status": "ok", "accounts": True}
        info = self.info()
        if account is not None and not account.admin:
            info = {key: value for key, value in info.items() if key not in OPERATOR_FIELDS}
            info["artifacts"] = [{key: value for key, value in entry.items() if key not in OPERATOR_FIELDS}
                                 for entry in info["artifacts"]]
        return {"status": "ok", **info}

    def info(self) -> dict[str, Any]:
        raise NotImplementedError


class Hosting(HostingBase):
    """The artifacts one server process hosts (``privlora serve ART1 ART2 ...``), each under a name
    of its own, with its own sessions, limits and budgets, sharing one accounts database. A session id starts with its
    artifact's id prefix, so a request naming a session reaches the right artifact."""

    def __init__(self, servers: list[PrivateServer], fair: FairLimits = FairLimits()) -> None:
        self.servers = {server.artifact_id: server for server in servers}
        if len(self.servers) != len(servers):
            raise ArtifactError("the same artifact is named twice")
        self._by_prefix = {server.session_prefix: server for server in servers}
        if len(self._by_prefix) != len(servers):  # two ids sharing 12 hex digits: 2^-48
            raise ArtifactError("two artifacts share their id prefix")
        if len({server.name for server in servers}) != len(servers):
            raise ArtifactError("two hosted artifacts have the same name: give each its own")
        self.first = servers[0]
        if any(server.accounts is not self.first.accounts for server in servers):
            raise ArtifactError("the hosted artifacts must share one accounts database (or none)")
        super().__init__(self.first.accounts, sorted({server.adapter_key for server in servers}),
                         [server.model() for server in servers], fair)

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

    # The routes' work, for a caller authenticated first (so that a stranger learns nothing of
    # sessions, and sends no body before its token is checked).
    def open_session(self, account: Account | None, artifact: str | None, evaluation_keys: bytes) -> str:
        return self.artifact(artifact).open_session(evaluation_keys, account)

    def close_session(self, account: Account | None, session_id: str) -> None:
        self.session(session_id).close_session(session_id, account)

    def check_session(self, account: Account | None, session_id: str) -> None:
        """Refuse an unknown, expired or another's session (before a body or a stream is taken)."""
        self.session(session_id).check_session(session_id, account)

    def check_round(self, account: Account | None, session_id: str, round_name: str, index: int, message: int) -> None:
        """Refuse a message to an unknown session, group or message before its body is read."""
        server = self.session(session_id)
        server.check_session(session_id, account)
        server.group(round_name, index, message)

    def evaluate(self, account: Account | None, session_id: str, round_name: str, index: int, message: int,
                 payload: bytes) -> bytes:
        server = self.session(session_id)
        with self.fair.turn(self.caller(account, session_id)):
            return server.evaluate(session_id, round_name, index, message, payload, account)

    def info(self) -> dict[str, Any]:
        """Everything health shows an operator: every hosted artifact, and with one, its fields at
        the top level too."""
        artifacts = [server.describe() for server in self.servers.values()]
        single = artifacts[0] if len(artifacts) == 1 else {}
        return {**single, "artifacts": artifacts, "accounts": self.accounts is not None,
                "sessions": sum(a["sessions"] for a in artifacts),
                "session_key_bytes": sum(a["session_key_bytes"] for a in artifacts),
                "requests_in_progress": self.fair.in_progress(), "requests_waiting": self.fair.waiting(),
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
