"""What crosses the wire, shared by both machines: the routes' prefix, the stream's frame format
and heartbeat, and why a server refuses a request.

Refusals are one exception per reason, each with its HTTP status and a stable machine-readable
code. The HTTP routes, the WebSocket stream and the in-process transport all answer a refusal
from this one table, and clients decide from the code what they can recover from (a lost
session: yes; a used-up budget: no). Backends raise the payload and message-order refusals, so
those classes live here, below the backends."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from privlora.errors import PrivloraError

API = "/v1"

# While a frame is being evaluated, the server sends a heartbeat frame (this status, no body)
# every HEARTBEAT_SECONDS; a client that hears nothing for STALL_SECONDS takes the connection
# for dead and sends the message again on a new one.
HEARTBEAT = 102
HEARTBEAT_SECONDS = 5.0
STALL_SECONDS = 20.0

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


def read_stream_reply(frame: bytes) -> tuple[int, bytes]:
    """(HTTP status, body) of a reply frame; ValueError when shorter than its header."""
    if len(frame) < _REPLY_HEAD.size:
        raise ValueError("a reply frame is shorter than its header")
    (status,) = _REPLY_HEAD.unpack_from(frame)
    return status, frame[_REPLY_HEAD.size:]


class BackendError(PrivloraError):
    """A backend refused its input: parameters, keys, requests or replies."""


class PayloadError(BackendError):
    """A request, reply or key is malformed (wrong format, dtype, shape or level)."""


class MessageOrderError(BackendError):
    """A message of a multi-message round arrived out of order, or was replayed."""



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


class HeadersTooLargeError(PrivloraError):
    """The request's headers are larger than the server reads."""


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
    HeadersTooLargeError: Refusal(431, "headers_too_large"),
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


# The same uvicorn protocol implementations for the server and the gateway, whichever extras are
# installed (Ray Serve's uvicorn[standard] brings httptools and uvloop), so that behaviour and
# figures do not depend on the install role.
UVICORN_PROTOCOLS: dict[str, str] = {"http": "h11", "loop": "asyncio", "ws": "websockets"}
