"""``plain`` backend: the PLL integer protocol without encryption.

The client sends its encoded integer rows x_hat (in the clear: no privacy for the prompt). The
server answers ``x_hat A^T B^T + e + k q`` per site with fresh error and lift
(:mod:`privlora.backends.pll`). The client decodes with the per-channel output scales. It is the
reference the FHE backends are tested against: they must decrypt to the same distribution.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch import Tensor

from privlora.backends.base import BackendBuild, GroupSpec, KeylessClient, KeylessServer, PayloadError, pack, unpack
from privlora.backends.pll import PLLParams, QuantizedSite, decode, encode_input, quantize_group, respond

NAME = "plain"


def compile(groups: list[GroupSpec], weights: dict[int, tuple[np.ndarray, np.ndarray]],
            options: dict[str, Any]) -> BackendBuild:
    params = PLLParams(**options)
    tensors: dict[str, np.ndarray] = {}
    client_groups: dict[str, Any] = {}
    for group in groups:
        sites = quantize_group(group, weights, params)
        for spec, site in zip(group.sites, sites):
            tensors[f"{spec.site_id}.a_hat"] = site.a_hat.astype(np.int32)
            tensors[f"{spec.site_id}.b_hat"] = site.b_hat.astype(np.int32)
            tensors[f"{spec.site_id}.modulus"] = np.array([site.modulus], dtype=np.int64)
        client_groups[group.key] = {"modulus": sites[0].modulus,
                                    "out_scale": np.concatenate([s.out_scale for s in sites]).tolist()}
    public = dataclasses.asdict(params)
    return BackendBuild(tensors, {"backend": NAME, "pll": public, "groups": client_groups}, public)


class Client(KeylessClient):
    def __init__(self, params: dict[str, Any], secret_key: bytes | None = None) -> None:
        self.params = PLLParams(**params["pll"])
        self.groups = {key: (int(g["modulus"]), np.asarray(g["out_scale"])) for key, g in params["groups"].items()}

    def encrypt(self, group: GroupSpec, x: Tensor) -> tuple[bytes, tuple[np.ndarray, tuple[int, ...]]]:
        x_hat, scale = encode_input(x.reshape(-1, group.d_in).double().numpy(), self.params.x_bits)
        scale = np.where(np.abs(x_hat).max(axis=1, initial=0) > 0, scale, 0.0)  # a zero row decodes to 0
        return pack(x_hat), (scale, tuple(x.shape[:-1]))

    def decrypt(self, group: GroupSpec, reply: bytes, state: tuple[np.ndarray, tuple[int, ...]]) -> Tensor:
        scale, leading = state
        modulus, out_scale = self.groups[group.key]
        y = unpack(reply, np.int64, group.d_out)
        return torch.from_numpy(decode(y, modulus, scale, out_scale).astype(np.float32)).reshape(*leading, group.d_out)


class Server(KeylessServer):
    def __init__(self, tensors: dict[str, np.ndarray], groups: list[GroupSpec], params: dict[str, Any]) -> None:
        self.params = PLLParams(**params)
        self.sites = {group.key: [self._site(tensors, spec.site_id) for spec in group.sites] for group in groups}

    def _site(self, tensors: dict[str, np.ndarray], site_id: int) -> QuantizedSite:
        a_hat, b_hat = (tensors[f"{site_id}.{name}"].astype(np.int64) for name in ("a_hat", "b_hat"))
        return QuantizedSite(a_hat, b_hat, np.ones(b_hat.shape[0]), int(tensors[f"{site_id}.modulus"][0]), self.params)

    def evaluate(self, group: GroupSpec, request: bytes, session: None = None) -> bytes:
        x_hat = unpack(request, np.int64, group.d_in)
        limit = 2 ** (self.params.x_bits - 1) - 1
        if x_hat.size and np.abs(x_hat).max() > limit:  # larger inputs could wrap the modulus
            raise PayloadError(f"encoded inputs must lie in [-{limit}, {limit}]")
        return pack(np.concatenate([respond(site, x_hat) for site in self.sites[group.key]], axis=-1))
