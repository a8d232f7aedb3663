"""``reference`` backend: the private rounds in float, unencrypted, exactly as the model computes
them. The compiler's correctness reference (compiled logits within 1e-4 of the model); it protects
nothing, but the adapter weights still stay in the server bundle."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from privlora.backends.base import BackendBuild, GroupSpec, KeylessClient, KeylessServer, pack, unpack
from privlora.compiler.ir import PrivateLinear

NAME = "reference"


def compile(groups: list[GroupSpec], weights: dict[int, tuple[np.ndarray, np.ndarray]],
            options: dict[str, Any]) -> BackendBuild:
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

    def encrypt(self, group: GroupSpec, x: Tensor) -> tuple[bytes, tuple[int, ...]]:
        return pack(x.reshape(-1, group.d_in).numpy().astype(np.float32)), tuple(x.shape[:-1])

    def decrypt(self, group: GroupSpec, reply: bytes, leading: tuple[int, ...]) -> Tensor:
        return torch.from_numpy(unpack(reply, np.float32, group.d_out)).reshape(*leading, group.d_out)


class Server(KeylessServer):
    """Evaluates each group with the compiler's own PrivateLinear, so the numbers are the model's."""

    def __init__(self, tensors: dict[str, np.ndarray], groups: list[GroupSpec], params: dict[str, Any]) -> None:
        self.plls = {
            group.key: PrivateLinear(list(group.sites),
                                     [torch.from_numpy(tensors[f"{s.site_id}.lora_A"]) for s in group.sites],
                                     [torch.from_numpy(tensors[f"{s.site_id}.lora_B"]) for s in group.sites])
            for group in groups
        }

    @torch.no_grad()
    def evaluate(self, group: GroupSpec, request: bytes, session: None = None) -> bytes:
        x = torch.from_numpy(unpack(request, np.float32, group.d_in))
        return pack(self.plls[group.key](x).numpy())
