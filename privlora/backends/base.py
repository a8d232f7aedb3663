"""The small interface every private-round backend implements.

A backend module provides:

- ``NAME``;
- ``compile(groups, weights, options) -> BackendBuild``: from the PLL groups of every round and
  their float LoRA weights, build the server's private program (tensors for the server bundle)
  and the client's parameters (JSON for the client bundle);
- ``Client(client_params)`` with ``encrypt(group, x) -> (request bytes, state)`` and
  ``decrypt(group, reply bytes, state) -> delta``;
- ``Server(server_tensors, groups)`` with ``evaluate(group, request bytes) -> reply bytes``.

Requests and replies are bytes so that every backend can use the same transport. Key
generation and per-session evaluation keys come with the FHE backends; ``reference`` and
``plain`` need none.
"""

from __future__ import annotations

import io
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
