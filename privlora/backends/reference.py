"""``reference`` backend: the private rounds in float, unencrypted, exactly as the model computes
them. The compiler's correctness reference (compiled logits within 1e-4 of the model); it protects
nothing, but the adapter weights still stay in the server bundle."""

from __future__ import annotations

from typing import Any

import numpy as np

from privlora.backends.base import BackendBuild, GroupSpec, PendingStore, Request, Weights
from privlora.backends.common import (KeylessClient, OneMessage, WireValues, check_message, delta_of, pack, refuse_keys,
                                      unpack)

NAME = "reference"
# the only top-level keys client_params (client/crypto.json) may have; tests/compiler/test_leakscan.py checks
CLIENT_PARAMS: frozenset[str] = frozenset({"backend"})


def compile(groups: list[GroupSpec], weights: Weights, options: dict[str, Any]) -> BackendBuild:
    tensors = {}
    for group in groups:
        for site in group.sites:
            a, b = weights[site.site_id]
            tensors[f"{site.site_id}.lora_A"] = a.astype(np.float32)
            tensors[f"{site.site_id}.lora_B"] = b.astype(np.float32)
    return BackendBuild(tensors, {"backend": NAME}, {})


class Client(KeylessClient):
    def __init__(self, params: dict[str, Any], secret_key: bytes | None = None) -> None:
        self.params = params

    def encrypt(self, group: GroupSpec, x: np.ndarray) -> tuple[bytes, tuple[int, ...]]:
        return pack(np.asarray(x, dtype=np.float32).reshape(-1, group.d_in)), tuple(np.shape(x)[:-1])

    def decrypt(self, group: GroupSpec, reply: bytes, leading: tuple[int, ...]) -> np.ndarray:
        return delta_of(unpack(reply, np.float32, group.d_out), leading, group.d_out)

    def wire_values(self, group: GroupSpec, request: bytes) -> WireValues:
        """The rows of x, in clear."""
        x = unpack(request, np.float32, group.d_in).ravel()
        bound = float(np.abs(x).max(initial=0.0)) or 1.0
        return WireValues(x, -bound, bound, "x in clear (float32)")


class Server(OneMessage):
    """Evaluates each site's ``scaling * B (A x)`` in float32, as the model's own Linear layers do."""

    def __init__(self, tensors: dict[str, np.ndarray], groups: list[GroupSpec], params: dict[str, Any]) -> None:
        self.sites = {group.key: [(tensors[f"{s.site_id}.lora_A"], tensors[f"{s.site_id}.lora_B"], np.float32(s.scaling))
                                  for s in group.sites] for group in groups}

    def open_session(self, evaluation_keys: bytes, pending: PendingStore | None = None) -> None:
        refuse_keys(evaluation_keys)

    def parse(self, group: GroupSpec, message: int, payload: bytes, session: Any = None) -> Request:
        check_message(message, self.messages)
        x = unpack(payload, np.float32, group.d_in)
        return Request(message, len(x), x)

    def evaluate(self, group: GroupSpec, request: Request, session: None = None) -> bytes:
        return pack(np.concatenate([((request.data @ a.T) @ b.T) * scaling for a, b, scaling in self.sites[group.key]],
                                   axis=-1))
