"""The contract every private-round backend implements, and the helpers they share.

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
session. Requests, replies and keys are bytes so that every backend uses the same transports.
Every failure a backend reports is a :class:`BackendError`.
"""

from __future__ import annotations

import io
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from privlora.core.types import GroupSpec
from privlora.errors import PrivloraError


class BackendError(PrivloraError):
    """A backend refused its input: parameters, keys, requests or replies."""


class PayloadError(BackendError):
    """A request, reply or key is malformed (wrong format, dtype, shape or level)."""


class MessageOrderError(BackendError):
    """A message of a multi-message round arrived out of order, or was replayed."""


Weights = Mapping[int, tuple[np.ndarray, np.ndarray]]  # site id -> (lora_A [r, d_in], lora_B [d_out, r])


@dataclass(frozen=True)
class BackendBuild:
    server_tensors: dict[str, np.ndarray]  # private: the server bundle only
    client_params: dict[str, Any]  # the client bundle (client/crypto.json)
    public_params: dict[str, Any]  # the manifest's backend parameters
    messages: int = 1  # client -> server messages per group evaluation


@dataclass(frozen=True)
class Request:
    """A request parsed once: what the budget counts and what the evaluation reads."""

    message: int
    rows: int  # rows of x this request carries (0 for the later messages of a group)
    data: Any  # the backend's parsed payload (arrays, ciphertexts)


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


class BackendServer(Protocol):
    messages: int

    def open_session(self, evaluation_keys: bytes) -> Any:
        """The per-client state (keys, one-time masks); PayloadError on bad keys."""

    def parse(self, group: GroupSpec, message: int, payload: bytes) -> Request:
        """Validate and parse a request; PayloadError when malformed."""

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


class OneMessage:
    """``advance`` of the backends whose group evaluation is a single message, and no work ahead
    of time."""

    messages = 1

    def offline_seconds(self, session: Any) -> float:
        return 0.0

    def advance(self, group: GroupSpec, message: int, reply: bytes, state: Any) -> tuple[bytes, Any]:
        raise MessageOrderError("this backend evaluates a group in one message")


@dataclass
class ExchangeCost:
    """Where a group evaluation's time and bytes went, summed over its messages."""

    encrypt_s: float = 0.0  # message 0 and the client's work between messages
    server_s: float = 0.0  # the transport and the server, as the client waits for them
    decrypt_s: float = 0.0
    bytes_up: float = 0
    bytes_down: float = 0
    messages: float = 0


def exchange(client: BackendClient, group: GroupSpec, x: np.ndarray, send: Callable[[int, bytes], bytes],
             cost: ExchangeCost | None = None) -> np.ndarray:
    """One group through all of its messages: encrypt, then ``send(message, request) -> reply``
    and the next message until the last reply, then decrypt. ``cost`` accumulates the timings."""
    cost = cost if cost is not None else ExchangeCost()
    t0 = time.perf_counter()
    request, state = client.encrypt(group, x)
    cost.encrypt_s += time.perf_counter() - t0
    for message in range(client.messages):
        t1 = time.perf_counter()
        reply = send(message, request)
        t2 = time.perf_counter()
        cost.server_s += t2 - t1
        cost.bytes_up += len(request)
        cost.bytes_down += len(reply)
        cost.messages += 1
        if message + 1 < client.messages:
            request, state = client.advance(group, message, reply, state)
            cost.encrypt_s += time.perf_counter() - t2
    t3 = time.perf_counter()
    delta = client.decrypt(group, reply, state)
    cost.decrypt_s += time.perf_counter() - t3
    return delta


def local_send(server: BackendServer, group: GroupSpec, session: Any) -> Callable[[int, bytes], bytes]:
    """``send`` for :func:`exchange` straight to a backend server in this process (tests, benchmarks)."""
    return lambda message, payload: server.evaluate(group, server.parse(group, message, payload), session)


def check_message(message: int, messages: int) -> None:
    if not 0 <= message < messages:
        raise MessageOrderError(f"message {message} does not exist: this backend takes {messages} per group")


class KeylessClient(OneMessage):
    """Key methods of the backends that encrypt nothing (``reference``, ``plain``)."""

    def evaluation_keys(self) -> bytes:
        return b""

    def secret_key(self) -> bytes:
        return b""


def refuse_keys(evaluation_keys: bytes) -> None:
    """A keyless backend takes no key material: anything sent is refused, not ignored."""
    if evaluation_keys:
        raise PayloadError("this backend takes no evaluation keys")


def block_diagonal(blocks: list[np.ndarray]) -> np.ndarray:
    """The blocks on the diagonal, zeros elsewhere: a fused group's B maps each site's rank
    components to that site's outputs only."""
    rows, cols = sum(b.shape[0] for b in blocks), sum(b.shape[1] for b in blocks)
    out = np.zeros((rows, cols), dtype=np.result_type(*blocks))
    row = col = 0
    for block in blocks:
        out[row:row + block.shape[0], col:col + block.shape[1]] = block
        row, col = row + block.shape[0], col + block.shape[1]
    return out


def rows_of(x: np.ndarray, d_in: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """``x`` as float64 rows ``[n, d_in]`` and its leading shape, to restore on the delta."""
    x = np.asarray(x)
    return x.reshape(-1, d_in).astype(np.float64), tuple(x.shape[:-1])


def delta_of(values: np.ndarray, leading: tuple[int, ...], d_out: int) -> np.ndarray:
    """A decrypted delta in the shape and dtype the public segments take."""
    return np.ascontiguousarray(values, dtype=np.float32).reshape(*leading, d_out)


def pack(array: np.ndarray) -> bytes:
    """An array as .npy bytes (dtype and shape included, no pickle)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def unpack(payload: bytes, dtype: np.dtype, columns: int) -> np.ndarray:
    """Parse .npy bytes, insisting on a 2-D array of ``dtype`` with ``columns`` columns."""
    try:
        array = np.load(io.BytesIO(payload), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise PayloadError(f"malformed payload: {exc}") from None
    if array.dtype != dtype or array.ndim != 2 or array.shape[1] != columns:
        raise PayloadError(f"expected a {np.dtype(dtype).name} array with {columns} columns, "
                           f"got {array.dtype.name} {array.shape}")
    return array


_FRAME_MAGIC = b"PLF1"


def frame(blobs: list[bytes]) -> bytes:
    """Several byte strings as one payload: magic, count, then (length, bytes) for each."""
    parts = [_FRAME_MAGIC, struct.pack("<I", len(blobs))]
    for blob in blobs:
        parts += [struct.pack("<Q", len(blob)), blob]
    return b"".join(parts)


def unframe(payload: bytes, count: int | None = None) -> list[bytes]:
    """Split a :func:`frame` payload, checking its structure (and the count when given)."""
    view = memoryview(payload)
    if len(view) < 8 or bytes(view[:4]) != _FRAME_MAGIC:
        raise PayloadError("malformed payload: not a privlora frame")
    (n,) = struct.unpack_from("<I", view, 4)
    if count is not None and n != count:
        raise PayloadError(f"expected {count} parts, got {n}")
    blobs, offset = [], 8
    for _ in range(n):
        if offset + 8 > len(view):
            raise PayloadError("malformed payload: truncated")
        (length,) = struct.unpack_from("<Q", view, offset)
        offset += 8
        if offset + length > len(view):
            raise PayloadError("malformed payload: truncated")
        blobs.append(bytes(view[offset:offset + length]))
        offset += length
    if offset != len(view):
        raise PayloadError("malformed payload: trailing bytes")
    return blobs
