"""The Private Linear Layer (PLL) transform, as docs/pll.md defines it.

Integer domain: the client encodes each row of x with its own dynamic scale ``c`` into
``x_bits``-bit integers. The server holds A and B as per-channel symmetric ``w_bits``-bit
integers; A's per-row scales and the LoRA scaling are folded into B before B is quantised. For
every call the server returns

    y = x_hat A_hat^T B_hat^T + e + k q        e ~ discrete Gaussian(sigma), k uniform

The client reduces y mod q to the centred range and rescales by ``c * out_scale``.
The modulus q comes from a worst-case bound on the accumulator over *every* input the encoding
can produce, plus the error's tail bound. No input can wrap around, and a site whose bound does
not fit the largest modulus allowed is a compile-time :class:`PLLError`.

Randomness comes from the operating system's CSPRNG (``os.urandom``) unless a seeded
generator is passed (tests only).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from privlora.errors import PrivloraError

if TYPE_CHECKING:
    from privlora.core.types import GroupSpec


class PLLError(PrivloraError):
    """A site cannot be transformed with the requested parameters."""


@dataclass(frozen=True)
class PLLParams:
    x_bits: int = 8  # client-side input integers in [-(2^(x_bits-1)-1), 2^(x_bits-1)-1]
    w_bits: int = 8  # server-side weight integers, per-channel symmetric
    sigma: float = 3.2  # standard deviation of the discrete Gaussian error e (integer units)
    tail: float = 12.0  # e is cut at tail * sigma (mass beyond ~1e-32): the decoding bound
    lift_bits: int = 16  # k is uniform in [0, 2^lift_bits)
    max_modulus_bits: int = 44  # largest q the backend accepts; y must fit in int64

    def __post_init__(self) -> None:
        if not (2 <= self.x_bits <= 16 and 2 <= self.w_bits <= 16):
            raise PLLError("x_bits and w_bits must be between 2 and 16")
        if self.sigma < 0 or self.tail <= 0:
            raise PLLError("sigma must be >= 0 and tail > 0")
        if self.max_modulus_bits + self.lift_bits > 62:
            raise PLLError("max_modulus_bits + lift_bits must be at most 62 (int64 arithmetic)")

    @property
    def error_bound(self) -> int:
        return math.ceil(self.tail * self.sigma)


def pll_params(options: dict, backend: str) -> PLLParams:
    """PLLParams from a backend's compile options, with a clear error for an unknown option."""
    unknown = set(options) - set(PLLParams.__dataclass_fields__)
    if unknown:
        raise PLLError(f"unknown {backend} options {sorted(unknown)} (known: {', '.join(PLLParams.__dataclass_fields__)})")
    return PLLParams(**options)


class RandomSource(Protocol):
    def integers(self, low: int, high: int, size: int) -> np.ndarray: ...
    def random(self, size: int) -> np.ndarray: ...


class SystemRandom:
    """Uniform integers and floats from ``os.urandom`` (a CSPRNG), vectorised."""

    def integers(self, low: int, high: int, size: int) -> np.ndarray:
        """Exactly uniform on [low, high): words past the last whole multiple of the span are
        rejected, so there is no modulo bias (the mask t must be uniform)."""
        span = high - low
        if span <= 0 or span > 2**62:
            raise ValueError("integers() needs 0 < high - low <= 2^62")
        if span & (span - 1) == 0:  # a power of two: the low bits of a uniform word are uniform
            words = np.frombuffer(os.urandom(8 * size), dtype=np.uint64)
            return (words & np.uint64(span - 1)).astype(np.int64) + low
        limit = np.uint64((2**64 // span) * span - 1)
        accepted = np.empty(0, dtype=np.uint64)
        while accepted.size < size:
            words = np.frombuffer(os.urandom(8 * (size - accepted.size + 8)), dtype=np.uint64)
            accepted = np.concatenate((accepted, words[words <= limit]))
        return (accepted[:size] % np.uint64(span)).astype(np.int64) + low

    def random(self, size: int) -> np.ndarray:
        words = np.frombuffer(os.urandom(8 * size), dtype=np.uint64)
        return (words >> np.uint64(11)).astype(np.float64) * 2.0**-53


@dataclass(frozen=True)
class QuantizedSite:
    """A site's private integer weights and its public decoding data."""

    a_hat: np.ndarray  # int64 [r, d_in]     private
    b_hat: np.ndarray  # int64 [d_out, r]    private
    out_scale: np.ndarray  # float64 [d_out]  given to the client to rescale its result
    modulus: int  # q
    params: PLLParams


def _symmetric(matrix: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-row symmetric quantisation: integers and one scale per row (zero rows get scale 1)."""
    limit = 2 ** (bits - 1) - 1
    peak = np.abs(matrix).max(axis=1)
    scale = np.where(peak > 0, peak / limit, 1.0)
    return np.rint(matrix / scale[:, None]).astype(np.int64), scale


def accumulator_bound(a_hat: np.ndarray, b_hat: np.ndarray, x_bits: int, error_bound: int) -> int:
    """Largest |x_hat A^T B^T + e| over every encodable x_hat, including the error carried through
    B by the masked-intermediate variant (so one modulus serves both protocols)."""
    x_max = 2 ** (x_bits - 1) - 1
    inner = x_max * np.abs(a_hat).sum(axis=1) + error_bound  # per rank component
    return int((np.abs(b_hat) * inner[None, :]).sum(axis=1).max()) + error_bound


def quantize_site(lora_A: np.ndarray, lora_B: np.ndarray, scaling: float, params: PLLParams) -> QuantizedSite:
    """Quantise one LoRA site and choose its modulus; PLLError if the bound does not fit."""
    a_hat, a_scale = _symmetric(np.asarray(lora_A, dtype=np.float64), params.w_bits)
    folded = np.asarray(lora_B, dtype=np.float64) * a_scale[None, :] * scaling
    b_hat, out_scale = _symmetric(folded, params.w_bits)
    bound = accumulator_bound(a_hat, b_hat, params.x_bits, params.error_bound)
    bits = (2 * bound + 1).bit_length()
    if bits > params.max_modulus_bits:
        raise PLLError(f"the accumulator can reach {bound} (needs a {bits}-bit modulus), more than the "
                       f"{params.max_modulus_bits} bits allowed: lower x_bits/w_bits or raise max_modulus_bits")
    return QuantizedSite(a_hat, b_hat, out_scale, 2**bits, params)


def quantize_group(group: "GroupSpec", weights: dict[int, tuple[np.ndarray, np.ndarray]],
                   params: PLLParams) -> list[QuantizedSite]:
    """Quantised sites of a group, all under the group's largest modulus (one reply vector)."""
    sites = [quantize_site(*weights[site.site_id], site.scaling, params) for site in group.sites]
    modulus = max(site.modulus for site in sites)
    return [dataclasses.replace(site, modulus=modulus) for site in sites]


def encode_input(x: np.ndarray, x_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Client side: rows of x as x_bits-bit integers and their scales ``c`` (x ~= c * x_hat)."""
    return _symmetric(np.asarray(x, dtype=np.float64), x_bits)


LARGE_SIGMA = 64.0  # above this, a rounded continuous Gaussian is used (see discrete_gaussian)


@functools.lru_cache(maxsize=16)
def _cumulative_table(sigma: float, bound: int) -> tuple[np.ndarray, np.ndarray]:
    support = np.arange(-bound, bound + 1, dtype=np.int64)
    weights = np.exp(-(support.astype(np.float64) ** 2) / (2 * sigma**2))
    return support, np.cumsum(weights) / weights.sum()


def discrete_gaussian(rng: RandomSource, sigma: float, bound: int, size: int) -> np.ndarray:
    """Samples of the discrete Gaussian on [-bound, bound]. Up to ``LARGE_SIGMA``: by inversion,
    one 53-bit uniform per sample looked up in the cumulative table (each probability exact to
    about 2^-53). Above it the table would be huge (24 M entries at sigma 10^6), and a rounded
    continuous Gaussian (Box-Muller on the same uniforms) is statistically indistinguishable
    from the discrete one at such widths; it is cut at the same bound."""
    if sigma == 0 or size == 0:
        return np.zeros(size, dtype=np.int64)
    if sigma > LARGE_SIGMA:
        u1, u2 = rng.random(size), rng.random(size)
        normal = np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * np.pi * u2)  # log1p(-u): u may be 0, never 1
        return np.clip(np.rint(sigma * normal), -bound, bound).astype(np.int64)
    support, cumulative = _cumulative_table(float(sigma), int(bound))
    index = np.searchsorted(cumulative, rng.random(size), side="right")
    return support[np.minimum(index, support.size - 1)]


def _noise_and_lift(site: QuantizedSite, shape: tuple[int, ...], rng: RandomSource) -> np.ndarray:
    size = int(np.prod(shape))
    error = discrete_gaussian(rng, site.params.sigma, site.params.error_bound, size)
    lift = rng.integers(0, 2**site.params.lift_bits, size) * site.modulus
    return (error + lift).reshape(shape)


def respond(site: QuantizedSite, x_hat: np.ndarray, rng: RandomSource | None = None) -> np.ndarray:
    """Server side, one round: ``x_hat A^T B^T + e + k q`` with fresh e and k."""
    rng = rng or SystemRandom()
    accumulator = (x_hat @ site.a_hat.T) @ site.b_hat.T
    return accumulator + _noise_and_lift(site, accumulator.shape, rng)


def centred(y: np.ndarray, modulus: int) -> np.ndarray:
    """y mod q in [-(q/2), q/2)."""
    return (y + modulus // 2) % modulus - modulus // 2


def decode(y: np.ndarray, modulus: int, c: np.ndarray, out_scale: np.ndarray) -> np.ndarray:
    """Client side: the LoRA delta ``scaling * B A x`` (float) from the server's reply, given the
    modulus and output scales from the client bundle and the row scales ``c`` it encoded with."""
    return centred(y, modulus).astype(np.float64) * c[:, None] * out_scale[None, :]


def masked_intermediate(site: QuantizedSite, x_hat: np.ndarray,
                        rng: RandomSource | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Server side, first of two rounds for protocols that let the client decrypt the rank-r
    vector: ``z = x_hat A^T + t + e1 mod q`` with a fresh uniform mask t. The server keeps t."""
    rng = rng or SystemRandom()
    inner = x_hat @ site.a_hat.T
    mask = rng.integers(0, site.modulus, inner.size).reshape(inner.shape)
    error = discrete_gaussian(rng, site.params.sigma, site.params.error_bound, inner.size).reshape(inner.shape)
    return (inner + mask + error) % site.modulus, mask


def finish_masked(site: QuantizedSite, z: np.ndarray, mask: np.ndarray, rng: RandomSource | None = None) -> np.ndarray:
    """Server side, second round: remove t, apply B, add fresh e2 and k q."""
    rng = rng or SystemRandom()
    inner = centred(z - mask, site.modulus)
    accumulator = inner @ site.b_hat.T
    return accumulator + _noise_and_lift(site, accumulator.shape, rng)


@dataclass(frozen=True)
class SiteMark:
    """One site's share of an account's fingerprint: a secret direction ``g`` [d_out] added, at
    ``strength`` times the column's own size, to column ``column`` of the site's B_hat. The served
    map gains the rank-1 term ``diag(out_scale) dB A_hat``, which a clone fitted on the account's
    answers learns with the rest."""

    column: int
    direction: np.ndarray  # float64 [d_out], standard normal


@dataclass(frozen=True)
class Fingerprint:
    """An account's marks by site module; ``tag`` names it (a server keeps encodings per tag)."""

    tag: str
    strength: float
    marks: dict[str, SiteMark]


MARK_TRIES = 8  # halvings of a mark that would not fit the modulus before it is left out


def mark_offset(a_hat: np.ndarray, b_hat: np.ndarray, mark: SiteMark, strength: float, params: PLLParams,
                modulus: int) -> np.ndarray:
    """The integer offset [d_out, r] that a mark adds to one site's B_hat: the direction scaled to
    the column's root mean square, kept inside the weights' range, and halved until the worst case
    still fits the modulus (so a marked answer is as exact as an unmarked one)."""
    column = b_hat[:, mark.column].astype(np.float64)
    size = strength * float(np.sqrt(np.mean(column**2)))
    limit = 2 ** (params.w_bits - 1) - 1
    for _ in range(MARK_TRIES):
        offset = np.zeros_like(b_hat)
        offset[:, mark.column] = np.clip(np.rint(column + size * mark.direction), -limit, limit) - column
        if 2 * accumulator_bound(a_hat, b_hat + offset, params.x_bits, params.error_bound) + 1 < modulus:
            return offset
        size /= 2
    return np.zeros_like(b_hat)
