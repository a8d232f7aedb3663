"""``ckks`` backend: the LoRA branch under CKKS (Microsoft SEAL via ``tenseal.sealapi``) with our
own hybrid-diagonal kernel.

Per row of x, one ciphertext goes up. The client scales the row to unit L2 norm (by ``c``) and
replicates it with period d_pad (a power of two), so that rotating the whole slot vector is a
cyclic rotation of x. The server, holding A (rank x d_in, all sites of the group stacked) and B
(d_out x rank, block diagonal) normalised so that |h| <= 1 and |u| <= 1:

1. ``z = sum_j rot(x, j) * D_j`` with ``D_j[i] = A[i mod R, (i + j) mod d_pad]`` (R = rank padded
   to a power of two), by baby-step giant-step (about 2 sqrt(R) rotations instead of R - 1), then
   rotate-and-sum over strides R, 2R, ..., d_pad/2 and rescale: every slot i now holds
   ``h[i mod R]`` -- the rank-R vector, replicated. All of this at the top level, where a key
   switch's noise is negligible against the scale;
2. per output ciphertext m: ``sum_j rot(h, j) * E_mj`` with ``E_mj[i] = B[m S + i, (i + j) mod R]``
   (S = slots), computed as ``sum_j rot(h * rot(E_mj, -j), j)``: the rotation comes after the
   product, at the output's scale, so its noise does not reach h;
3. PLL error: adds ``delta * e`` to every slot (``e`` discrete Gaussian, ``delta`` =
   2^-precision_bits of the worst-case output), then re-randomises with a fresh public-key
   encryption of zero, so the reply's mask is fresh and its noise is flooded.

The client decrypts, keeps the first d_out slots and multiplies by ``c * beta`` (beta: the
group's output normaliser). Rotation keys exist only for the steps above (1..R-1 and R..d_pad/2):
about 20 keys, the same for every layer. There is no ``k q`` lift: CKKS decrypts to a real
number, which has no integer representative to hide.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from tenseal import sealapi

from privlora.backends import seal
from privlora.backends.base import BackendBuild, GroupSpec, PayloadError, PendingStore, Request, Weights
from privlora.backends.common import OneMessage, block_diagonal, check_message, delta_of, frame, rows_of, unframe
from privlora.backends.pll import PLLError, SystemRandom, discrete_gaussian

NAME = "ckks"
# the only top-level keys client_params (client/crypto.json) may have; tests/compiler/test_leakscan.py checks
CLIENT_PARAMS: frozenset[str] = frozenset({"backend", "ckks", "flood", "steps", "groups"})


@dataclass(frozen=True)
class FloodParams:
    precision_bits: int = 20  # the error unit is 2^-precision_bits of the worst-case |output|
    sigma: float = 3.2  # standard deviation of e, in error units
    tail: float = 12.0  # e is cut at tail * sigma


@dataclass(frozen=True)
class Layout:
    """Where a group's vectors sit in the slots."""

    d_in: int
    d_pad: int  # period of the replicated input, a power of two
    rank: int
    r_pad: int  # period of the replicated rank vector, a power of two
    d_out: int
    slots: int

    @property
    def block(self) -> int:
        """Slots per row. Several rows share a ciphertext when one row's whole computation stays
        inside a power-of-two block: the outputs (d_out), plus the R - 1 positions the output
        rotations read past them, plus the d_pad - 1 the rotate-and-sum reads past those. The
        input is replicated across its block, so every position read holds the right value."""
        need = _power_of_two(self.d_out + self.r_pad - 1 + self.d_pad - 1)
        return need if need < self.slots else self.slots

    @property
    def rows_per_ciphertext(self) -> int:
        return self.slots // self.block

    @property
    def outputs(self) -> int:
        """Reply ciphertexts per input ciphertext."""
        return math.ceil(self.d_out / self.slots)

    @property
    def sum_steps(self) -> list[int]:
        return [self.r_pad << i for i in range(int(math.log2(self.d_pad // self.r_pad)))]

    @property
    def baby(self) -> int:
        """Baby steps of the first product (baby-step giant-step over the r_pad diagonals)."""
        return 1 << ((self.r_pad.bit_length() - 1 + 1) // 2)

    @property
    def giant(self) -> int:
        return max(self.r_pad // self.baby, 1)

    @property
    def steps(self) -> set[int]:
        return set(range(1, self.r_pad)) | set(range(1, self.baby)) | set(self.sum_steps)


def _power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def layout(group: GroupSpec, slots: int) -> Layout:
    rank = sum(site.rank for site in group.sites)
    d_pad, r_pad = _power_of_two(group.d_in), _power_of_two(rank)
    r_pad = min(max(r_pad, 1), d_pad)
    if d_pad > slots or rank > d_pad:
        raise PLLError(f"group {group.key}: d_in {group.d_in} (padded {d_pad}) and rank {rank} do not fit "
                       f"{slots} CKKS slots; use a larger poly_modulus_degree")
    return Layout(group.d_in, d_pad, rank, r_pad, group.d_out, slots)


def normalise(group: GroupSpec, weights: Weights) -> tuple[np.ndarray, np.ndarray, float]:
    """Stack the group's sites into one (A [rank, d_in], B [d_out, rank]) pair with the LoRA
    scaling folded in, scaled so that every input with ||x||_2 <= 1 gives |h| <= 1 and |u| <= 1
    (Cauchy-Schwarz: unit-norm rows of A; B's largest row norm times A's spectral norm); and
    beta, the factor the client multiplies u by. L2 bounds are far tighter than max-abs ones on
    real activations, whose few outlier channels would otherwise leave every other value tiny."""
    a = np.concatenate([np.asarray(weights[s.site_id][0], dtype=np.float64) for s in group.sites])
    b = block_diagonal([np.asarray(weights[s.site_id][1], dtype=np.float64) * s.scaling for s in group.sites])
    alpha = np.linalg.norm(a, axis=1)
    alpha = np.where(alpha > 0, alpha, 1.0)
    a = a / alpha[:, None]
    b = b * alpha[None, :]
    beta = float(np.linalg.norm(b, axis=1).max() * np.linalg.norm(a, ord=2)) or 1.0
    return a, b / beta, beta


def compile(groups: list[GroupSpec], weights: Weights, options: dict[str, Any]) -> BackendBuild:
    options = dict(options)
    unknown = set(options) - set(FloodParams.__dataclass_fields__) - set(seal.CKKSParameters.__dataclass_fields__)
    if unknown:
        raise PLLError(f"unknown ckks options {sorted(unknown)} (known: precision_bits, sigma, tail, "
                       "poly_modulus_degree, coeff_bits, scale_bits, a_scale_bits)")
    flood = FloodParams(**{k: options.pop(k) for k in list(options) if k in FloodParams.__dataclass_fields__})
    params = seal.CKKSParameters(**{k: tuple(v) if k == "coeff_bits" else v for k, v in options.items()})
    seal.context(params)  # validate the parameter set at compile time
    tensors: dict[str, np.ndarray] = {}
    client_groups: dict[str, Any] = {}
    steps: set[int] = set()
    for group in groups:
        steps |= layout(group, params.slots).steps
        a, b, beta = normalise(group, weights)
        tensors[f"{group.key}.a"], tensors[f"{group.key}.b"] = a, b
        client_groups[group.key] = {"beta": beta}
    public = {"ckks": dataclasses.asdict(params), "flood": dataclasses.asdict(flood), "steps": sorted(steps)}
    return BackendBuild(tensors, {"backend": NAME, **public, "groups": client_groups}, public)


def _parameters(params: dict[str, Any]) -> seal.CKKSParameters:
    ckks = dict(params["ckks"])
    ckks["coeff_bits"] = tuple(ckks["coeff_bits"])
    return seal.CKKSParameters(**ckks)


class Client(OneMessage):
    """Holds the secret key; uploads rotation keys and a public key once per session."""

    def __init__(self, params: dict[str, Any], secret_key: bytes | None = None) -> None:
        self.params = _parameters(params)
        self.steps = [int(s) for s in params["steps"]]
        self.betas = {key: float(g["beta"]) for key, g in params["groups"].items()}
        self.ctx = seal.context(self.params)
        self.keygen, self.encryptor, self.decryptor = seal.client_keys(self.ctx, secret_key)
        self.encoder = sealapi.CKKSEncoder(self.ctx)
        self.scale = 2.0**self.params.scale_bits
        self.layouts: dict[str, Layout] = {}

    def secret_key(self) -> bytes:
        """For the client's own key cache; never sent."""
        return seal.to_bytes(self.keygen.secret_key())

    def evaluation_keys(self) -> bytes:
        """Rotation keys for the compiled steps only, and a public key (for re-randomisation)."""
        galois = self.keygen.create_galois_keys(seal.galois_elements(self.steps, self.params.poly_modulus_degree))
        public = sealapi.PublicKey()
        self.keygen.create_public_key(public)
        return frame([seal.to_bytes(galois), seal.to_bytes(public)])

    def _layout(self, group: GroupSpec) -> Layout:
        if group.key not in self.layouts:
            self.layouts[group.key] = layout(group, self.params.slots)
        return self.layouts[group.key]

    def encrypt(self, group: GroupSpec, x: np.ndarray) -> tuple[bytes, tuple[np.ndarray, tuple[int, ...]]]:
        lay = self._layout(group)
        rows, leading = rows_of(x, group.d_in)
        scale = np.linalg.norm(rows, axis=1)  # unit-norm rows (see normalise); 0 for a zero row: decodes to 0
        rows = np.pad(rows / np.where(scale > 0, scale, 1.0)[:, None], ((0, 0), (0, lay.d_pad - lay.d_in)))
        blobs = []
        for start in range(0, len(rows), lay.rows_per_ciphertext):
            chunk = rows[start:start + lay.rows_per_ciphertext]
            slots = np.zeros((lay.rows_per_ciphertext, lay.block))
            slots[:len(chunk)] = np.tile(chunk, lay.block // lay.d_pad)
            plain = sealapi.Plaintext()
            self.encoder.encode(slots.reshape(-1).tolist(), self.ctx.first_parms_id(), self.scale, plain)
            blobs.append(seal.to_bytes(self.encryptor.encrypt_symmetric(plain)))  # seeded: half size
        return frame(blobs), (scale, leading)

    def _decrypt_slots(self, blob: bytes) -> np.ndarray:
        ct = seal.from_bytes(sealapi.Ciphertext, self.ctx, blob, "reply ciphertext")
        plain = sealapi.Plaintext()
        self.decryptor.decrypt(ct, plain)
        return np.asarray(self.encoder.decode_double(plain))

    def decrypt(self, group: GroupSpec, reply: bytes, state: tuple[np.ndarray, tuple[int, ...]]) -> np.ndarray:
        scale, leading = state
        lay = self._layout(group)
        inputs = math.ceil(len(scale) / lay.rows_per_ciphertext)
        blobs = unframe(reply, inputs * lay.outputs)
        values = [np.concatenate([self._decrypt_slots(b) for b in blobs[i * lay.outputs:(i + 1) * lay.outputs]])
                  for i in range(inputs)]
        u = np.stack([v.reshape(-1, lay.block)[:, :lay.d_out] if lay.rows_per_ciphertext > 1 else v[None, :lay.d_out]
                      for v in values]).reshape(-1, lay.d_out)[:len(scale)] if values else np.zeros((0, lay.d_out))
        return delta_of(u * scale[:, None] * self.betas[group.key], leading, group.d_out)


@dataclass
class Session:
    """A client's evaluation keys, held by the server for the session."""

    galois: Any
    encryptor: Any  # public-key encryptor, for the fresh encryptions of zero


class _Kernel:
    """One group's pre-encoded diagonals."""

    def __init__(self, lay: Layout, a: np.ndarray, b: np.ndarray, encode_at, a_scale: float, b_scale: float) -> None:
        self.layout = lay
        i = np.arange(lay.slots)
        a_pad = np.zeros((lay.r_pad, lay.d_pad))
        a_pad[:lay.rank, :lay.d_in] = a
        # D_j[i] = A[i mod R, (i + j) mod d_pad]; giant step g, baby step b: D_(gB+b) pre-rotated by -gB
        self.a_diagonals = [[encode_at(0, np.roll(a_pad[i % lay.r_pad, (i + g * lay.baby + b) % lay.d_pad], g * lay.baby),
                                       a_scale) for b in range(min(lay.baby, lay.r_pad))] for g in range(lay.giant)]
        b_pad = np.zeros((lay.outputs * lay.slots, lay.r_pad))  # zero past d_out: nothing leaks into the padding
        b_pad[:lay.d_out, :lay.rank] = b
        self.b_diagonals = [[encode_at(1, np.roll(b_pad[m * lay.slots + i % lay.block, (i + j) % lay.r_pad], j), b_scale)
                             for j in range(lay.r_pad)]
                            for m in range(lay.outputs)]


class Server(OneMessage):
    def __init__(self, tensors: dict[str, np.ndarray], groups: list[GroupSpec], params: dict[str, Any]) -> None:
        self.params = _parameters(params)
        self.flood = FloodParams(**params["flood"])
        self.ctx = seal.context(self.params)
        self.encoder = sealapi.CKKSEncoder(self.ctx)
        self.evaluator = sealapi.Evaluator(self.ctx)
        self.scale = 2.0**self.params.scale_bits
        levels = [self.ctx.first_context_data()]
        while levels[-1].next_context_data() is not None:
            levels.append(levels[-1].next_context_data())
        self.parms_ids = [level.parms_id() for level in levels]
        self.kernels = {g.key: _Kernel(layout(g, self.params.slots), tensors[f"{g.key}.a"], tensors[f"{g.key}.b"],
                                       self._encode, 2.0**self.params.a_scale_bits, 2.0**self.params.b_scale_bits)
                        for g in groups}
        self.rng = SystemRandom()

    def _encode(self, level: int, values: np.ndarray, scale: float | None = None) -> sealapi.Plaintext:
        plain = sealapi.Plaintext()
        self.encoder.encode(values.tolist(), self.parms_ids[level], scale or self.scale, plain)
        return plain

    def open_session(self, evaluation_keys: bytes, pending: PendingStore | None = None) -> Session:
        galois_bytes, public_bytes = unframe(evaluation_keys, 2)
        galois = seal.from_bytes(sealapi.GaloisKeys, self.ctx, galois_bytes, "rotation keys")
        public = seal.from_bytes(sealapi.PublicKey, self.ctx, public_bytes, "public key")
        return Session(galois, sealapi.Encryptor(self.ctx, public))

    def _load_input(self, blob: bytes) -> sealapi.Ciphertext:
        ct = seal.from_bytes(sealapi.Ciphertext, self.ctx, blob, "input ciphertext")
        if ct.size() != 2 or ct.parms_id() != self.parms_ids[0] or ct.scale != self.scale:
            raise PayloadError("input ciphertext has the wrong size, level or scale")
        return ct

    def _product(self, ct: sealapi.Ciphertext, plain: sealapi.Plaintext) -> sealapi.Ciphertext:
        out = sealapi.Ciphertext()
        self.evaluator.multiply_plain(ct, plain, out)
        return out

    def _rotated(self, ct: sealapi.Ciphertext, step: int, session: Session) -> sealapi.Ciphertext:
        out = sealapi.Ciphertext()
        self.evaluator.rotate_vector(ct, step, session.galois, out)
        return out

    def _row(self, kernel: _Kernel, x: sealapi.Ciphertext, session: Session) -> list[bytes]:
        ev, lay = self.evaluator, kernel.layout
        babies = [x] + [self._rotated(x, b, session) for b in range(1, min(lay.baby, lay.r_pad))]
        z = None
        for g, diagonals in enumerate(kernel.a_diagonals):
            part = self._product(babies[0], diagonals[0])
            for baby, diagonal in zip(babies[1:], diagonals[1:]):
                ev.add_inplace(part, self._product(baby, diagonal))
            if g:
                part = self._rotated(part, g * lay.baby, session)
            if z is None:
                z = part
            else:
                ev.add_inplace(z, part)
        for step in lay.sum_steps:
            ev.add_inplace(z, self._rotated(z, step, session))
        ev.rescale_to_next_inplace(z)
        outputs = []
        for diagonals in kernel.b_diagonals:
            out = self._product(z, diagonals[0])
            for j in range(1, lay.r_pad):  # rot(h * rot(E_j, -j), j) = rot(h, j) * E_j, rotated at the output's scale
                ev.add_inplace(out, self._rotated(self._product(z, diagonals[j]), j, session))
            outputs.append(out)
        return [self._finish(out, session) for out in outputs]

    def _finish(self, out: sealapi.Ciphertext, session: Session) -> bytes:
        """Both protections of a reply (docs/security.md), then its bytes."""
        self._add_error(out)
        self._rerandomise(out, session)
        return seal.to_bytes(out)

    def _add_error(self, out: sealapi.Ciphertext) -> None:
        """PLL error: ``delta * e`` in every slot, which floods the kernel's own noise (that noise
        depends on the weights)."""
        error = discrete_gaussian(self.rng, self.flood.sigma, math.ceil(self.flood.tail * self.flood.sigma),
                                  self.params.slots)
        self.evaluator.add_plain_inplace(out, self._encode(len(self.parms_ids) - 1,
                                                           error * 2.0**-self.flood.precision_bits, out.scale))

    def _rerandomise(self, out: sealapi.Ciphertext, session: Session) -> None:
        """A fresh public-key encryption of zero: without it the reply's mask (c1) would be a
        function of the client's own ciphertext and the weights only."""
        zero = sealapi.Ciphertext()
        session.encryptor.encrypt_zero(out.parms_id(), zero)
        zero.scale = out.scale
        self.evaluator.add_inplace(out, zero)

    def parse(self, group: GroupSpec, message: int, payload: bytes, session: Any = None) -> Request:
        check_message(message, self.messages)
        inputs = [self._load_input(blob) for blob in unframe(payload)]
        return Request(message, len(inputs) * self.kernels[group.key].layout.rows_per_ciphertext, inputs)

    def evaluate(self, group: GroupSpec, request: Request, session: Session) -> bytes:
        kernel = self.kernels[group.key]
        return frame([blob for x in request.data for blob in self._row(kernel, x, session)])
