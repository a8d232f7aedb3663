"""Building blocks the backends share: payload packing and framing, rows in and deltas out,
and the mixins of one-message and keyless backends."""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from privlora.backends.base import MessageOrderError, PayloadError
from privlora.core.types import GroupSpec


@dataclass(frozen=True)
class WireValues:
    """A group's first message as the server reads it: its numbers in order, the interval
    ``[low, high)`` they lie in, and what they are. The client shows them beside its own x."""

    values: np.ndarray
    low: float
    high: float
    meaning: str


def wire_values(client: Any, group: GroupSpec, request: bytes) -> WireValues:
    """The numbers in ``request``: a backend client that knows its message's layout reads them
    (``client.wire_values``); any other message is shown as the bytes it is (ciphertexts)."""
    read = getattr(client, "wire_values", None)
    if read is not None:
        return read(group, request)
    return WireValues(np.frombuffer(request, dtype=np.uint8), 0, 256, "the message's bytes (ciphertexts)")


class OneMessage:
    """``advance`` of the backends whose group evaluation is a single message, and no work ahead
    of time."""

    messages = 1
    replicable = True
    fingerprints = False

    def offline_seconds(self, session: Any) -> float:
        return 0.0

    def advance(self, group: GroupSpec, message: int, reply: bytes, state: Any) -> tuple[bytes, Any]:
        raise MessageOrderError("this backend evaluates a group in one message")


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
