"""``plain`` backend: the PLL integer protocol without encryption.

The client sends its encoded integer rows x_hat (in the clear: no privacy for the prompt). The
server answers ``x_hat A^T B^T + e + k q`` per site with fresh error and lift
(:mod:`privlora.backends.pll`). The client decodes with the per-channel output scales. It is the
reference the FHE backends are tested against: they must decrypt to the same distribution.

Option ``protocol``: ``direct`` (default, one message per group) or ``masked``, the two-message
protocol with the masked rank-r intermediate: message 0 returns ``z = x_hat A^T + t + e1 mod q``
(t uniform, kept by the server for exactly one message 1 of this session), the client sends z
back (an FHE backend would re-encrypt it), message 1 returns ``(z - t) B^T + e2 + k q``. A message
1 without its message 0, or sent twice, is refused.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from privlora.backends.base import (BackendBuild, GroupSpec, MessageOrderError, PayloadError, PendingStore, Request,
                                    Weights)
from privlora.backends.common import (KeylessClient, OneMessage, WireValues, check_message, delta_of, pack, refuse_keys,
                                      rows_of, unpack)
from privlora.backends.pll import (PLLError, PLLParams, QuantizedSite, decode, encode_input, finish_masked,
                                   masked_intermediate, pll_params, quantize_group, respond)

NAME = "plain"
# the only top-level keys client_params (client/crypto.json) may have; tests/compiler/test_leakscan.py checks
CLIENT_PARAMS: frozenset[str] = frozenset({"backend", "pll", "protocol", "groups"})
PROTOCOLS = {"direct": 1, "masked": 2}  # protocol -> messages per group


def compile(groups: list[GroupSpec], weights: Weights, options: dict[str, Any]) -> BackendBuild:
    options = dict(options)
    protocol = options.pop("protocol", "direct")
    if protocol not in PROTOCOLS:
        raise PLLError(f"unknown plain protocol {protocol!r} (known: {', '.join(PROTOCOLS)})")
    params = pll_params(options, NAME)
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
    public = {"pll": dataclasses.asdict(params), "protocol": protocol}
    return BackendBuild(tensors, {"backend": NAME, **public, "groups": client_groups}, public, PROTOCOLS[protocol])


def _protocol(params: dict[str, Any]) -> str:
    return params.get("protocol", "direct")


class Client(KeylessClient):
    def __init__(self, params: dict[str, Any], secret_key: bytes | None = None) -> None:
        self.params = PLLParams(**params["pll"])
        self.messages = PROTOCOLS[_protocol(params)]
        self.groups = {key: (int(g["modulus"]), np.asarray(g["out_scale"])) for key, g in params["groups"].items()}

    def encrypt(self, group: GroupSpec, x: np.ndarray) -> tuple[bytes, tuple[np.ndarray, tuple[int, ...]]]:
        rows, leading = rows_of(x, group.d_in)
        x_hat, scale = encode_input(rows, self.params.x_bits)
        scale = np.where(np.abs(x_hat).max(axis=1, initial=0) > 0, scale, 0.0)  # a zero row decodes to 0
        return pack(x_hat), (scale, leading)

    def wire_values(self, group: GroupSpec, request: bytes) -> WireValues:
        """The quantized rows of x, in clear."""
        bound = 2 ** (self.params.x_bits - 1)
        return WireValues(unpack(request, np.int64, group.d_in).ravel(), -bound, bound,
                          f"x in clear ({self.params.x_bits}-bit integers)")

    def advance(self, group: GroupSpec, message: int, reply: bytes, state: Any) -> tuple[bytes, Any]:
        if self.messages == 1:
            return OneMessage.advance(self, group, message, reply, state)
        z = unpack(reply, np.int64, group.rank)  # uniformly random to us: t hides A x_hat
        return pack(z), state

    def decrypt(self, group: GroupSpec, reply: bytes, state: tuple[np.ndarray, tuple[int, ...]]) -> np.ndarray:
        scale, leading = state
        modulus, out_scale = self.groups[group.key]
        y = unpack(reply, np.int64, group.d_out)
        if len(y) != len(scale):
            raise PayloadError(f"the reply has {len(y)} rows, the request had {len(scale)}")
        return delta_of(decode(y, modulus, scale, out_scale), leading, group.d_out)


@dataclass
class Session:
    """One client's pending masks: t of each group's message 0, until its message 1 (one exchange
    per group at a time: its id is 0)."""

    pending: PendingStore = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def keep(self, key: str, masks: list[np.ndarray]) -> None:
        with self.lock:
            self.pending[(key, 0)] = masks

    def take(self, key: str) -> list[np.ndarray]:
        with self.lock:
            masks = self.pending.pop((key, 0), None)
        if masks is None:
            raise MessageOrderError(f"message 1 of {key} without a pending message 0 (out of order or replayed)")
        return masks


class Server:
    replicable = True
    fingerprints = False

    def __init__(self, tensors: dict[str, np.ndarray], groups: list[GroupSpec], params: dict[str, Any]) -> None:
        self.params = PLLParams(**params["pll"])
        self.messages = PROTOCOLS[_protocol(params)]
        self.sites = {group.key: [self._site(tensors, spec.site_id) for spec in group.sites] for group in groups}

    def _site(self, tensors: dict[str, np.ndarray], site_id: int) -> QuantizedSite:
        a_hat, b_hat = (tensors[f"{site_id}.{name}"].astype(np.int64) for name in ("a_hat", "b_hat"))
        return QuantizedSite(a_hat, b_hat, np.ones(b_hat.shape[0]), int(tensors[f"{site_id}.modulus"][0]), self.params)

    def open_session(self, evaluation_keys: bytes, pending: PendingStore | None = None) -> Session:
        refuse_keys(evaluation_keys)
        return Session({} if pending is None else pending)

    def offline_seconds(self, session: Session) -> float:
        return 0.0

    def parse(self, group: GroupSpec, message: int, payload: bytes, session: Any = None) -> Request:
        check_message(message, self.messages)
        if message == 0:
            x_hat = unpack(payload, np.int64, group.d_in)
            limit = 2 ** (self.params.x_bits - 1) - 1
            if x_hat.size and np.abs(x_hat).max() > limit:  # larger inputs could wrap the modulus
                raise PayloadError(f"encoded inputs must lie in [-{limit}, {limit}]")
            return Request(message, len(x_hat), x_hat)
        z = unpack(payload, np.int64, group.rank)
        modulus = self.sites[group.key][0].modulus
        if z.size and (z.min() < 0 or z.max() >= modulus):
            raise PayloadError(f"masked intermediates must lie in [0, {modulus})")
        return Request(message, 0, z)

    def evaluate(self, group: GroupSpec, request: Request, session: Session) -> bytes:
        sites = self.sites[group.key]
        if self.messages == 1:
            return pack(np.concatenate([respond(site, request.data) for site in sites], axis=-1))
        if request.message == 0:
            masked = [masked_intermediate(site, request.data) for site in sites]
            session.keep(group.key, [mask for _, mask in masked])
            return pack(np.concatenate([z for z, _ in masked], axis=-1))
        masks = session.take(group.key)
        if len(request.data) != len(masks[0]):
            raise PayloadError(f"message 1 has {len(request.data)} rows, message 0 had {len(masks[0])}")
        bounds = np.cumsum([0] + [site.a_hat.shape[0] for site in sites])
        return pack(np.concatenate([finish_masked(site, request.data[:, lo:hi], mask)
                                    for site, mask, lo, hi in zip(sites, masks, bounds[:-1], bounds[1:])], axis=-1))
