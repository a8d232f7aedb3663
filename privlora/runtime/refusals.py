"""Why a server refuses a request: one exception per reason, each with its HTTP status and a
stable machine-readable code. The HTTP routes, the WebSocket stream and the in-process transport
all answer a refusal from this one table, and clients decide from the code what they can recover
from (a lost session: yes; a used-up budget: no)."""

from __future__ import annotations

from dataclasses import dataclass

from privlora.backends.base import MessageOrderError, PayloadError
from privlora.errors import PrivloraError


class SessionError(PrivloraError):
    """The session id is unknown, has expired or was evicted (or belongs to another account)."""


class RoundError(PrivloraError):
    """The round or group named by a request does not exist in this artifact."""


class UnknownArtifactError(PrivloraError):
    """The server does not host the artifact a request names (or hosts several and none was named)."""


class RateLimitError(PrivloraError):
    """The session (or its account) sends requests faster than its rate limit."""


class BudgetError(PrivloraError):
    """The query budget is used up."""


class AuthError(PrivloraError):
    """No API token, or one the server does not know."""


class ForbiddenError(PrivloraError):
    """The API token was revoked, or its account lacks the right for this route."""


class CapacityError(PrivloraError):
    """The server holds as many sessions as it may, none of which the caller may evict."""


class TooLargeError(PrivloraError):
    """A request body is larger than the server accepts."""


@dataclass(frozen=True)
class Refusal:
    status: int
    code: str


REFUSALS: dict[type[Exception], Refusal] = {
    PayloadError: Refusal(400, "malformed_payload"),
    AuthError: Refusal(401, "unauthenticated"),
    ForbiddenError: Refusal(403, "forbidden"),
    BudgetError: Refusal(403, "budget_exhausted"),
    SessionError: Refusal(404, "unknown_session"),
    RoundError: Refusal(404, "unknown_round"),
    UnknownArtifactError: Refusal(404, "unknown_artifact"),
    MessageOrderError: Refusal(409, "message_order"),
    TooLargeError: Refusal(413, "too_large"),
    RateLimitError: Refusal(429, "rate_limited"),
    CapacityError: Refusal(503, "at_capacity"),
}

# Codes after which a client redoes the current step: after re-opening its session (same keys)
# when the server lost it; after waiting when the server is full or restarting; at once for a
# message refused as a replay (the reply to the first sending was lost with the connection).
RECOVERABLE_CODES = frozenset({"unknown_session", "at_capacity", "message_order"})


def refusal_of(exc: BaseException) -> Refusal | None:
    """The refusal ``exc`` stands for, or None for an unexpected error."""
    return REFUSALS.get(type(exc))
