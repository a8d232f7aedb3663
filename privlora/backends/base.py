"""The contract every private-round backend implements, and the helpers they share.

This module is the contract only: the shared building blocks a backend may use live beside it
(``common.py``: payload packing, framing, one-message and keyless mixins), and so does the driver
that runs a group through its messages (``exchange.py``).

A backend is three typed parts (:class:`BackendModule`):

- a compile step ``compile(groups, weights, options) -> BackendBuild``: from the PLL groups of
  every round and their float LoRA weights, the server's private program (tensors for the server
  bundle), the client's parameters (JSON for the client bundle), the public parameters (the
  manifest) and how many messages one group's evaluation takes;
- a :class:`BackendClient`: generates or reloads the client's keys, encrypts a group's input
  (message 0), turns the reply to message m into message m + 1 (backends of more than one
  message), and decrypts the last reply;
- a :class:`BackendServer`: opens a session from the client's evaluation keys, parses a request
  once (:class:`Request`: the rows it carries, for the query budget, and the parsed ciphertexts),
  and evaluates it.

A round of the plan is evaluated group by group; each group takes ``messages`` client -> server
-> client exchanges. One-message backends (``ckks``, ``concrete``, ``reference``) answer message 0
with the result; a two-message backend (``plain`` with ``protocol=masked``) answers message 0
with a masked intermediate and message 1 with the result, and keeps its one-time state in the
session's :class:`PendingStore` (a dict in one process; Ray's replicas share one through their
session directory, so message 1 may reach another replica than its message 0). Requests,
replies and keys are bytes so that every backend uses the same transports. Every failure a
backend reports is a :class:`BackendError` (defined with the wire's refusals, ``core/wire.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

import numpy as np

from privlora.core.types import GroupSpec
from privlora.core.wire import BackendError, MessageOrderError, PayloadError

__all__ = ["BackendBuild", "BackendClient", "BackendError", "BackendModule", "BackendServer", "CompileStep",
           "MessageOrderError", "PayloadError", "PendingStore", "Preprocessing", "Request", "Weights"]


Weights = Mapping[int, tuple[np.ndarray, np.ndarray]]  # site id -> (lora_A [r, d_in], lora_B [d_out, r])


@dataclass(frozen=True)
class BackendBuild:
    server_tensors: dict[str, np.ndarray]  # private: the server bundle only
    client_params: dict[str, Any]  # the client bundle (client/crypto.json)
    public_params: dict[str, Any]  # the manifest's backend parameters
    messages: int = 1  # client -> server messages per group evaluation


Payload = TypeVar("Payload")


@dataclass(frozen=True)
class Request(Generic[Payload]):
    """A request parsed once: what the budget counts and what the evaluation reads."""

    message: int
    rows: int  # rows of x this request carries (0 for the later messages of a group)
    data: Payload  # the backend's parsed payload, its own type (arrays, ciphertexts)


class PendingStore(Protocol):
    """What a session keeps from one message of a group for a later one (a one-time mask), by
    (group key, exchange id): written once, taken once. A dict is one; Ray's session directory
    is another, shared by every replica."""

    def __setitem__(self, key: tuple[str, int], value: Any) -> None: ...

    def __contains__(self, key: object) -> bool: ...

    def pop(self, key: tuple[str, int], default: Any = None) -> Any: ...


class BackendClient(Protocol):
    messages: int

    def evaluation_keys(self) -> bytes:
        """What the server needs for a session: uploaded once, one set for every layer."""

    def secret_key(self) -> bytes:
        """For the client's own key cache; never sent."""

    def encrypt(self, group: GroupSpec, x: np.ndarray) -> tuple[bytes, Any]:
        """Message 0 for ``x`` (``[..., d_in]``) and the state the later steps need."""

    def advance(self, group: GroupSpec, message: int, reply: bytes, state: Any) -> tuple[bytes, Any]:
        """Message ``message + 1`` from the server's reply to ``message``."""

    def decrypt(self, group: GroupSpec, reply: bytes, state: Any) -> np.ndarray:
        """The group's delta (``[..., d_out]``, float32) from the reply to the last message."""


Send = Callable[[int, bytes], bytes]  # message index, request -> reply


@runtime_checkable
class Preprocessing(Protocol):
    """A client whose backend answers online from pads made ahead of time (``pads``). It makes
    them through the same ``send`` as an evaluation (its offline messages), and drops them when
    the session they belong to is lost."""

    def ready(self, group: GroupSpec) -> int:
        """Pads ready for the group's online rows."""

    def prepare(self, group: GroupSpec, rows: int, send: Send, cost: Any = None) -> None:
        """Make ``rows`` more pads for the group; ``cost`` (an ExchangeCost) accumulates the timings."""

    def forget_pads(self) -> None:
        """Drop every pad (a new session cannot use them)."""

    def pooled_bytes(self) -> int:
        """Client memory the pads hold."""


class BackendServer(Protocol):
    messages: int  # message indices it accepts per group (online and offline)
    replicable: bool  # all its session state is the keys and the PendingStore: Ray replicas may share it
    fingerprints: bool  # open_session takes an account's Fingerprint (bfv, pads): see server/fingerprints.py

    def open_session(self, evaluation_keys: bytes, pending: PendingStore | None = None) -> Any:
        """The per-client state (keys; one-time masks in ``pending``, a new dict when None);
        PayloadError on bad keys. A backend with ``fingerprints`` also takes ``fingerprint=``."""

    def parse(self, group: GroupSpec, message: int, payload: bytes, session: Any = None) -> Request:
        """Validate and parse a request; PayloadError when malformed. With the session, what its
        state refuses (a message without its predecessor, too many unused pads) is refused before
        the payload's ciphertexts are read."""

    def evaluate(self, group: GroupSpec, request: Request, session: Any) -> bytes:
        """The reply to a parsed request."""

    def offline_seconds(self, session: Any) -> float:
        """Work done ahead of time for this session's replies so far (reported, never hidden)."""


class CompileStep(Protocol):
    def __call__(self, groups: list[GroupSpec], weights: Weights, options: dict[str, Any]) -> BackendBuild: ...


class BackendModule(Protocol):
    """What ``privlora.backends.load(name)`` returns: one module per backend."""

    NAME: str
    compile: CompileStep

    def Client(self, params: dict[str, Any], secret_key: bytes | None = None) -> BackendClient: ...  # noqa: N802

    def Server(self, tensors: dict[str, np.ndarray], groups: list[GroupSpec],  # noqa: N802
               params: dict[str, Any]) -> BackendServer: ...
