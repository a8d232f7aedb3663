"""The small interface every private-round backend implements.

A backend module provides:

- ``NAME``;
- ``compile(groups, weights, options) -> BackendBuild``: from the PLL groups of every round and
  their float LoRA weights, build the server's private program (tensors for the server bundle)
  and the client's parameters (JSON for the client bundle);
- ``Client(client_params, secret_key=None)``: generates (or reloads) the client's keys.
  ``evaluation_keys() -> bytes`` is what the server needs for a session (uploaded once; one set
  for every layer); ``secret_key() -> bytes`` is for the client's own key cache and never sent;
  ``encrypt(group, x) -> (request bytes, state)`` and ``decrypt(group, reply bytes, state) -> delta``;
- ``Server(server_tensors, groups, public_params)`` with ``open_session(evaluation_keys) ->
  session``, ``evaluate(group, request bytes, session) -> reply bytes`` and ``rows(group,
  request bytes) -> int`` (how many rows of x a request carries, for the query budget).

Requests, replies and keys are bytes so that every backend can use the same transport. A
malformed one raises :class:`PayloadError`.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from privlora.compiler.ir import PLLSite
from privlora.errors import PrivloraError


class PayloadError(PrivloraError):
    """A request or reply is malformed (wrong format, dtype or shape)."""


@dataclass(frozen=True)
class GroupSpec:
    """One PLL group of a round: one input tensor in, the sites' deltas concatenated out."""

    round: str
    index: int
    input: int
    output: int
    sites: tuple[PLLSite, ...]

    @property
    def key(self) -> str:
        return f"{self.round}/{self.index}"

    @property
    def d_in(self) -> int:
        return self.sites[0].d_in

    @property
    def d_out(self) -> int:
        return sum(site.d_out for site in self.sites)


@dataclass(frozen=True)
class BackendBuild:
    server_tensors: dict[str, np.ndarray]  # private: the server bundle only
    client_params: dict[str, Any]  # the client bundle (client/crypto.json)
    public_params: dict[str, Any]  # the manifest's backend parameters


class KeylessClient:
    """Key methods of the backends that encrypt nothing (``reference``, ``plain``)."""

    def evaluation_keys(self) -> bytes:
        return b""

    def secret_key(self) -> bytes:
        return b""


class KeylessServer:
    """Session and row counting of the backends whose requests are .npy arrays of rows."""

    def open_session(self, evaluation_keys: bytes) -> None:
        if evaluation_keys:
            raise PayloadError("this backend takes no evaluation keys")
        return None

    def rows(self, group: GroupSpec, request: bytes) -> int:
        """Rows of the request, from the .npy header only."""
        stream = io.BytesIO(request)
        try:
            version = np.lib.format.read_magic(stream)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, _ = read_header(stream)
        except (ValueError, OSError, EOFError) as exc:
            raise PayloadError(f"malformed payload: {exc}") from None
        if len(shape) != 2:
            raise PayloadError(f"expected a 2-D array, got shape {shape}")
        return int(shape[0])


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


def groups_from_rounds(rounds: list[dict[str, Any]]) -> list[GroupSpec]:
    """GroupSpecs from the manifest's ``rounds`` entries."""
    return [GroupSpec(spec["name"], index, group["input"], group["output"],
                      tuple(PLLSite(**site) for site in group["sites"]))
            for spec in rounds for index, group in enumerate(spec["plls"])]


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
