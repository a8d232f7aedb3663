"""``bfv`` backend: the masked Private Linear Layer on coefficient-encoded BFV (Microsoft SEAL via
``tenseal.sealapi``), two messages per group.

Coefficient encoding (the technique of Cheetah): a matrix product needs no rotation. Rows of x
are polynomial coefficients, rows of a weight matrix are plaintext polynomials in reversed order,
and every inner product lands on a known coefficient of one ciphertext-plaintext product. A block
of ``tb`` rows, ``db`` inputs and ``ob`` outputs fills one ring element (``tb * db * ob <= N``);
:func:`choose_layout` picks the block per shape with a cost model, so the rows of a prompt share
ciphertexts.

Per group, with integers mod a power of two p (the PLL of docs/pll.md):

- message 0: the client sends ``x_hat`` (rows quantised to ``x_bits``); the server multiplies by
  ``A_hat`` (pre-encoded in NTT form), adds a fresh uniform mask to **every** coefficient (``t`` at
  the output positions, which it keeps for exactly one message 1 of this session and exchange; the other
  coefficients carry cross terms of the product and are hidden for good), re-randomises with a
  fresh public-key encryption of zero and switches to the smallest modulus. The client decrypts
  ``h' = A_hat x_hat + t mod p``: uniformly random to it.
- message 1: the client encrypts ``h'``; the server multiplies by ``B_hat`` and adds
  ``-B_hat t + e`` at the output positions (``e`` the PLL error) and fresh uniform values elsewhere,
  re-randomises and switches. The client decrypts ``y = B_hat A_hat x_hat + e mod p`` exactly,
  centres it and rescales.

Both messages carry the row count and an exchange id the client draws at random for the group's
exchange: ``t`` is kept under (group, exchange). A message 0 sent again after a lost connection
may still be evaluated after its resend; without the id, the stale one could overwrite the ``t``
the resend's message 1 needs, and the answer would come back wrong (the fault soak found it).
At most PENDING_PER_GROUP exchanges wait per group and session; older ones are dropped.

``p`` is sized by the compiler from the actual weights' worst case over every encodable input
plus the error's tail (:func:`privlora.backends.pll.quantize_group`): no input can wrap it.

Option ``privacy``: ``fast`` (N = 4096, moduli 60 | 29 | 20 bits, 109 in all, SEAL's 128-bit
bound: the reply is switched to the 60-bit prime, then re-randomised) or ``rigorous`` (N = 8192,
60 | 44, 43 | 20: re-randomised
*before* the switch drops 87 bits, so the switch's fresh rounding noise hides the part of the
ciphertext noise that depends on the weights). docs/security.md says what each gives.
"""

from __future__ import annotations

import collections
import dataclasses
import secrets
import struct
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tenseal import sealapi

from privlora.backends import seal
from privlora.core.turns import pause_point
from privlora.backends.seal import IdleFiller, ZeroPool
from privlora.backends.bfv_layout import Layout, message_layout
from privlora.backends.base import (BackendBuild, GroupSpec, MessageOrderError, PayloadError, PendingStore, Request,
                                    Weights)
from privlora.backends.common import block_diagonal, check_message, delta_of, frame, rows_of, unframe
from privlora.backends.pll import (Fingerprint, PLLError, PLLParams, SystemRandom, decode, discrete_gaussian, encode_input,
                                   mark_offset, pll_params, quantize_group)

NAME = "bfv"
MESSAGES = 2
# 16-bit rows and 10-bit weights: relative error 1.2e-3 (median) on real SmolLM2 activations, p up
# to 2^45; 46 bits is the widest p whose replies decrypt exactly at the 60-bit reply prime.
DEFAULTS = {"x_bits": 16, "w_bits": 10, "max_modulus_bits": 46}
MAX_ROWS = 1 << 16  # rows one request may declare
# Encryptions of zero a session keeps ready: a SmolLM2 decode step (30 groups) uses 120 at most.
ZERO_POOL = 128
# Bytes of encoded weights kept across requests (a decode step's and a few prompt lengths' block
# shapes); least recently used shapes go first, and a shape larger than this is encoded per request.
ENCODED_BYTES = 256 * 1024**2
PENDING_PER_GROUP = 4  # message 0s awaiting their message 1, per group and session
_HEADER = struct.Struct("<IQ")  # rows, exchange id


Encoded = list[list[sealapi.Plaintext | None]]  # weight polynomials per out block and in block, NTT form


@dataclass(frozen=True)
class BFVParameters:
    poly_modulus_degree: int
    coeff_bits: tuple[int, ...]  # reply prime | primes dropped before the reply | special prime


PRIVACY = {
    "fast": BFVParameters(4096, (60, 29, 20)),  # the switch drops 29 bits
    "rigorous": BFVParameters(8192, (60, 44, 43, 20)),  # the switch drops 87 bits
}


def context(params: BFVParameters, plain_modulus: int) -> sealapi.SEALContext:
    parms = sealapi.EncryptionParameters(sealapi.SCHEME_TYPE.BFV)
    parms.set_poly_modulus_degree(params.poly_modulus_degree)
    parms.set_coeff_modulus(sealapi.CoeffModulus.Create(params.poly_modulus_degree, list(params.coeff_bits)))
    parms.set_plain_modulus(plain_modulus)
    ctx = sealapi.SEALContext(parms, True, sealapi.SEC_LEVEL_TYPE.TC128)
    if not ctx.parameters_set():
        raise PLLError(f"invalid BFV parameters: {ctx.parameters_error_message()}")
    return ctx


def _stack(group: GroupSpec, weights: Weights, params: PLLParams) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The group's sites as one A_hat [rank, d_in], block-diagonal B_hat [d_out, rank], output
    scales and modulus."""
    sites = quantize_group(group, weights, params)
    a = np.concatenate([s.a_hat for s in sites])
    b = block_diagonal([s.b_hat for s in sites])
    return a, b, np.concatenate([s.out_scale for s in sites]), sites[0].modulus


def _widest_fit(groups: list[GroupSpec], weights: Weights, options: dict[str, Any],
                fixed: bool) -> tuple[PLLParams, dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, int]]]:
    """Quantise every group; unless x_bits was given, narrow the rows one bit at a time (16 down
    to 8) until every group's worst case fits the largest p allowed."""
    def attempt(x_bits: int) -> tuple[PLLParams, dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, int]]]:
        params = pll_params({**options, "x_bits": x_bits}, NAME)
        return params, {group.key: _stack(group, weights, params) for group in groups}

    widths = [options["x_bits"]] if fixed else list(range(options["x_bits"], 7, -1))
    for x_bits in widths[:-1]:
        try:
            return attempt(x_bits)
        except PLLError:
            continue
    return attempt(widths[-1])  # the narrowest: if even it does not fit, its error is the answer


def compile(groups: list[GroupSpec], weights: Weights, options: dict[str, Any]) -> BackendBuild:
    options = dict(options)
    privacy = options.pop("privacy", "fast")
    if privacy not in PRIVACY:
        raise PLLError(f"unknown bfv privacy {privacy!r} (known: {', '.join(PRIVACY)})")
    params, stacked = _widest_fit(groups, weights, {**DEFAULTS, **options}, "x_bits" in options)
    modulus = max((m for *_, m in stacked.values()), default=2)
    context(PRIVACY[privacy], modulus)  # validate the parameter set at compile time
    tensors: dict[str, np.ndarray] = {}
    for key, (a, b, _, _) in stacked.items():
        tensors[f"{key}.a_hat"], tensors[f"{key}.b_hat"] = a.astype(np.int32), b.astype(np.int32)
    public = {"pll": dataclasses.asdict(params), "privacy": privacy, "plain_modulus": modulus}
    client_groups = {key: {"out_scale": scale.tolist()} for key, (_, _, scale, _) in stacked.items()}
    return BackendBuild(tensors, {"backend": NAME, **public, "groups": client_groups}, public, MESSAGES)


CLIENT_PARAMS = frozenset({"backend", "pll", "privacy", "plain_modulus", "groups"})


@dataclass
class ClientState:
    scale: np.ndarray  # each row's quantisation scale c (0 for a zero row)
    leading: tuple[int, ...]
    exchange: int = field(default_factory=lambda: secrets.randbits(64))  # names t on the server

    @property
    def rows(self) -> int:
        return len(self.scale)


class Client:
    """Holds the secret key; its evaluation keys are a public key (for the server's encryptions of zero)."""

    messages = MESSAGES

    def __init__(self, params: dict[str, Any], secret_key: bytes | None = None) -> None:
        self.pll = PLLParams(**params["pll"])
        self.bfv = PRIVACY[params["privacy"]]
        self.modulus = int(params["plain_modulus"])
        self.out_scales = {key: np.asarray(g["out_scale"]) for key, g in params["groups"].items()}
        self.ctx = context(self.bfv, self.modulus)
        self.keygen, self.encryptor, self.decryptor = seal.client_keys(self.ctx, secret_key)

    def secret_key(self) -> bytes:
        return seal.to_bytes(self.keygen.secret_key())

    def evaluation_keys(self) -> bytes:
        public = sealapi.PublicKey()
        self.keygen.create_public_key(public)
        return frame([seal.to_bytes(public)])

    def _layout(self, group: GroupSpec, message: int, rows: int) -> Layout:
        return message_layout(group, message, rows, self.bfv.poly_modulus_degree)

    def _send(self, layout: Layout, values: np.ndarray, exchange: int) -> bytes:
        """Encrypt ``values`` [rows, d_in] (mod p) in the layout's input polynomials (seeded: half size)."""
        polys = layout.encode(values).reshape(-1, layout.degree)
        blobs = [seal.to_bytes(self.encryptor.encrypt_symmetric(seal.plaintext(self.ctx, poly))) for poly in polys]
        return frame([_HEADER.pack(layout.rows, exchange), *blobs])

    def _receive(self, layout: Layout, reply: bytes) -> np.ndarray:
        """The ``[rows, d_out]`` outputs (mod p) of a reply."""
        blobs = unframe(reply, layout.output_ciphertexts)
        values = np.empty((len(blobs), layout.tb * layout.ob), dtype=np.uint64)
        for index, blob in enumerate(blobs):
            ct = seal.from_bytes(sealapi.Ciphertext, self.ctx, blob, "reply ciphertext")
            plain = sealapi.Plaintext()
            self.decryptor.decrypt(ct, plain)
            values[index] = seal.coefficients(plain, layout.outputs, layout.degree)
        return layout.gather(values.reshape(layout.row_blocks, layout.out_blocks, layout.tb * layout.ob))

    def encrypt(self, group: GroupSpec, x: np.ndarray) -> tuple[bytes, ClientState]:
        rows, leading = rows_of(x, group.d_in)
        x_hat, scale = encode_input(rows, self.pll.x_bits)
        scale = np.where(np.abs(x_hat).max(axis=1, initial=0) > 0, scale, 0.0)  # a zero row decodes to 0
        layout, state = self._layout(group, 0, len(rows)), ClientState(scale, leading)
        return self._send(layout, np.mod(x_hat, self.modulus).astype(np.uint64), state.exchange), state

    def advance(self, group: GroupSpec, message: int, reply: bytes, state: ClientState) -> tuple[bytes, ClientState]:
        check_message(message + 1, self.messages)
        masked = self._receive(self._layout(group, 0, state.rows), reply)  # h' = A x + t: uniform
        return self._send(self._layout(group, 1, state.rows), masked, state.exchange), state

    def decrypt(self, group: GroupSpec, reply: bytes, state: ClientState) -> np.ndarray:
        y = self._receive(self._layout(group, 1, state.rows), reply).astype(np.int64)
        return delta_of(decode(y, self.modulus, state.scale, self.out_scales[group.key]), state.leading, group.d_out)


@dataclass(frozen=True)
class Payload:
    """A parsed message: its packing, the exchange id that pairs a message 1 with its message 0,
    and the input ciphertexts."""

    layout: Layout
    exchange: int
    inputs: list[sealapi.Ciphertext]


@dataclass(eq=False)  # sessions are compared by identity (and kept in a WeakSet)
class Session:
    """A client's public key (as a pool of encryptions of zero), and the masks t of its groups
    between message 0 and message 1."""

    zeros: ZeroPool
    pending: PendingStore = field(default_factory=dict)  # (group, exchange) -> (rows, mask)
    fingerprint: str = ""  # the tag of the account's marks ("" for none)
    marked: dict[str, np.ndarray] = field(default_factory=dict)  # group key -> this session's B_hat, when marked
    waiting: dict[str, collections.deque] = field(default_factory=dict)  # each group's exchanges, oldest first
    lock: threading.Lock = field(default_factory=threading.Lock)

    def keep(self, key: str, exchange: int, rows: int, mask: np.ndarray) -> None:
        with self.lock:
            self.pending[(key, exchange)] = (rows, mask)
            waiting = self.waiting.setdefault(key, collections.deque())
            waiting.append(exchange)
            while len(waiting) > PENDING_PER_GROUP:
                self.pending.pop((key, waiting.popleft()), None)

    def expect(self, key: str, exchange: int) -> None:
        """Refuse a message 1 that has no pending message 0, before its ciphertexts are read
        (:meth:`take` checks again, atomically, when it is evaluated)."""
        with self.lock:
            pending = (key, exchange) in self.pending
        if not pending:
            raise _out_of_order(key)

    def take(self, key: str, exchange: int, rows: int) -> np.ndarray:
        """The mask of this exchange's message 0, once: a replayed or early message 1 finds none."""
        with self.lock:
            pending = self.pending.pop((key, exchange), None)
        if pending is None:
            raise _out_of_order(key)
        if pending[0] != rows:
            raise PayloadError(f"message 1 of {key} declares {rows} rows, its message 0 had {pending[0]}")
        return pending[1]


def _out_of_order(key: str) -> MessageOrderError:
    return MessageOrderError(f"message 1 of {key} without a pending message 0 (out of order or replayed)")


class Server:
    messages = MESSAGES
    replicable = True
    fingerprints = True
    max_rows = MAX_ROWS  # rows one request may declare, refused before any ciphertext is read

    def __init__(self, tensors: dict[str, np.ndarray], groups: list[GroupSpec], params: dict[str, Any]) -> None:
        self.pll = PLLParams(**params["pll"])
        self.bfv = PRIVACY[params["privacy"]]
        self.modulus = int(params["plain_modulus"])
        self.ctx = context(self.bfv, self.modulus)
        self.evaluator = sealapi.Evaluator(self.ctx)
        self.first, self.last = self.ctx.first_parms_id(), self.ctx.last_parms_id()
        self.matrices = {g.key: (tensors[f"{g.key}.a_hat"].astype(np.int64), tensors[f"{g.key}.b_hat"].astype(np.int64))
                         for g in groups}
        self.group_specs = {g.key: g for g in groups}
        self.rng = SystemRandom()
        self.zero_pool = int(params.get("zero_pool", ZERO_POOL))
        self.filler = IdleFiller()
        # Encoded weights per (group, message, block shape) with their bytes, least recently used
        # first out: a client choosing unusual row counts cannot make the server keep every copy.
        self._encoded: collections.OrderedDict[tuple[str, int, int, int, str], tuple[Encoded, int]] = \
            collections.OrderedDict()
        self._encoded_lock = threading.Lock()
        self._encoded_total = 0
        self.encoded_budget = ENCODED_BYTES
        self._plaintext_bytes = 8 * self.bfv.poly_modulus_degree * (len(self.bfv.coeff_bits) - 1)  # NTT form

    @property
    def encoded_bytes(self) -> int:
        """Bytes of encoded weights kept now (never above ``encoded_budget``)."""
        with self._encoded_lock:
            return self._encoded_total

    def open_session(self, evaluation_keys: bytes, pending: PendingStore | None = None,
                     fingerprint: Fingerprint | None = None) -> Session:
        (public_bytes,) = unframe(evaluation_keys, 1)
        public = seal.from_bytes(sealapi.PublicKey, self.ctx, public_bytes, "public key")
        session = Session(ZeroPool(sealapi.Encryptor(self.ctx, public), self.first, self.zero_pool),
                          {} if pending is None else pending)
        if fingerprint is not None:
            session.fingerprint, session.marked = fingerprint.tag, self.marked_b(fingerprint)
        if self.zero_pool:
            self.filler.add(session)
        return session

    def marked_b(self, fingerprint: Fingerprint) -> dict[str, np.ndarray]:
        """Every group's B_hat with the fingerprint's marks added, site by site (its diagonal blocks)."""
        marked = {}
        for key, group in self.group_specs.items():
            a_hat, b_hat = self.matrices[key]
            b_marked, row, column = b_hat.copy(), 0, 0
            for site in group.sites:
                rows, columns = slice(row, row + site.d_out), slice(column, column + site.rank)
                mark = fingerprint.marks.get(site.module)
                if mark is not None:
                    b_marked[rows, columns] += mark_offset(a_hat[columns], b_hat[rows, columns], mark,
                                                           fingerprint.strength, self.pll, self.modulus)
                row, column = row + site.d_out, column + site.rank
            marked[key] = b_marked
        return marked

    def _b(self, group: GroupSpec, session: Session) -> np.ndarray:
        """B_hat as this session's account is served it."""
        return session.marked.get(group.key, self.matrices[group.key][1])

    def _layout(self, group: GroupSpec, message: int, rows: int) -> Layout:
        return message_layout(group, message, rows, self.bfv.poly_modulus_degree)

    def parse(self, group: GroupSpec, message: int, payload: bytes, session: Any = None) -> Request:
        """Checked cheapest first, so that a refusal costs no more than the check that refuses it:
        the header, the row count against the ciphertexts sent (no block holds more rows than the
        ring has coefficients), then, with the session, a message 1's pending message 0, and only
        then the ciphertexts themselves."""
        check_message(message, self.messages)
        blobs = unframe(payload)
        if not blobs or len(blobs[0]) != _HEADER.size:
            raise PayloadError("malformed payload: no row count and exchange id")
        rows, exchange = _HEADER.unpack(blobs[0])
        if rows > self.max_rows or rows > (len(blobs) - 1) * self.bfv.poly_modulus_degree:
            raise PayloadError(f"malformed payload: {rows} rows in {len(blobs) - 1} ciphertexts (at most "
                               f"{self.max_rows} rows a request)")
        layout = self._layout(group, message, rows)
        if len(blobs) - 1 != layout.input_ciphertexts:
            raise PayloadError(f"malformed payload: {rows} rows take {layout.input_ciphertexts} ciphertexts, "
                               f"got {len(blobs) - 1}")
        if session is not None:
            self._check_state(group, message, rows, exchange, session)
        inputs = []
        for blob in blobs[1:]:
            inputs.append(self._load_input(blob))
            pause_point()
        return Request(message, rows if message == 0 else 0, Payload(layout, exchange, inputs))

    def _check_state(self, group: GroupSpec, message: int, rows: int, exchange: int, session: Session) -> None:
        """What the session's state refuses before the ciphertexts are read: a message 1 without
        its message 0."""
        if message == 1:
            session.expect(group.key, exchange)

    def _load_input(self, blob: bytes) -> sealapi.Ciphertext:
        ct = seal.from_bytes(sealapi.Ciphertext, self.ctx, blob, "input ciphertext")
        if ct.size() != 2 or ct.parms_id() != self.first or ct.is_ntt_form():
            raise PayloadError("input ciphertext has the wrong size, level or form")
        return ct

    def _weights(self, group: GroupSpec, message: int, layout: Layout, session: Session) -> Encoded:
        """The weight polynomials of A_hat (message 0) or B_hat (message 1, as the session's
        account is served it) for this block shape, in NTT form (None for an all-zero block, such
        as the off-diagonal blocks of a fused group's B), encoded once per shape and kept."""
        marked = session.fingerprint if message == 1 else ""
        key = (group.key, message, layout.db, layout.ob, marked)
        with self._encoded_lock:
            kept = self._encoded.get(key)
            if kept is not None:
                self._encoded.move_to_end(key)
                return kept[0]
        matrix = self._b(group, session) if message == 1 else self.matrices[group.key][0]
        polys = layout.weights(np.mod(matrix, self.modulus).astype(np.uint64))
        encoded = [self._encode_row(row) for row in polys]
        size = self._plaintext_bytes * sum(plain is not None for row in encoded for plain in row)
        if size <= self.encoded_budget:
            with self._encoded_lock:
                if key not in self._encoded:  # two requests may encode one shape at once: keep one copy
                    self._encoded[key] = (encoded, size)
                    self._encoded_total += size
                while self._encoded_total > self.encoded_budget:
                    self._encoded_total -= self._encoded.popitem(last=False)[1][1]
        return encoded

    def _encode_row(self, polys: np.ndarray) -> list[sealapi.Plaintext | None]:
        row = []
        for poly in polys:
            row.append(self._ntt(seal.plaintext(self.ctx, poly)) if poly.any() else None)
            pause_point()  # a large shape's encoding is long: another caller may take the turn here
        return row

    def _ntt(self, plain: sealapi.Plaintext) -> sealapi.Plaintext:
        self.evaluator.transform_to_ntt_inplace(plain, self.first)
        return plain

    def _products(self, layout: Layout, inputs: list[sealapi.Ciphertext], weights: Encoded,
                  session: Session):
        """For every (row block, out block): the sum over input blocks of input x weight, out of NTT form."""
        for ct in inputs:
            self.evaluator.transform_to_ntt_inplace(ct)
            pause_point()
        for i in range(layout.row_blocks):
            row = inputs[i * layout.in_blocks:(i + 1) * layout.in_blocks]
            for m in range(layout.out_blocks):
                total = None
                for ct, plain in zip(row, weights[m]):
                    if plain is None:  # SEAL refuses a product that is transparent (identically zero)
                        continue
                    part = sealapi.Ciphertext()
                    self.evaluator.multiply_plain(ct, plain, part)
                    if total is None:
                        total = part
                    else:
                        self.evaluator.add_inplace(total, part)
                    pause_point()
                if total is None:  # an all-zero block of outputs: an encryption of zero stands for it
                    total = sealapi.Ciphertext()
                    session.zeros.encryptor.encrypt_zero(self.first, total)
                else:
                    self.evaluator.transform_from_ntt_inplace(total)
                yield total
                pause_point()  # between output blocks, another caller may take the server's turn

    def _uniform(self, layout: Layout) -> np.ndarray:
        size = layout.output_ciphertexts * layout.degree
        shape = (layout.row_blocks, layout.out_blocks, layout.degree)
        return self.rng.integers(0, self.modulus, size).astype(np.uint64).reshape(shape)

    def offline_seconds(self, session: Session) -> float:
        return session.zeros.offline_seconds

    def evaluate(self, group: GroupSpec, request: Request[Payload], session: Session) -> bytes:
        with self.filler:  # no background work while a request is evaluated
            return self._evaluate(group, request, session)

    def _evaluate(self, group: GroupSpec, request: Request[Payload], session: Session,
                  shift: np.ndarray | None = None) -> bytes:
        """Message 0 or 1 of the masked PLL; ``shift`` ([rows, d_out] mod p) is added to message 1's
        outputs (the pads backend's output masks)."""
        layout, exchange, inputs = request.data.layout, request.data.exchange, request.data.inputs
        mask = session.take(group.key, exchange, layout.rows) if request.message == 1 else None
        fill = self._uniform(layout)  # every coefficient of a reply is masked
        if mask is None:
            session.keep(group.key, exchange, layout.rows, layout.gather(fill[..., layout.outputs]))
            added = fill
        else:
            b_hat = self._b(group, session)
            error = discrete_gaussian(self.rng, self.pll.sigma, self.pll.error_bound, layout.rows * layout.d_out)
            correction = error.reshape(layout.rows, layout.d_out) - (mask.astype(np.int64) @ b_hat.T)
            if shift is not None:
                correction = correction + shift.astype(np.int64)
            added = layout.scatter(np.mod(correction, self.modulus).astype(np.uint64), fill)
        sums = self._products(layout, inputs, self._weights(group, request.message, layout, session), session)
        return frame([self._finish(total, poly, session) for total, poly in zip(sums, added.reshape(-1, layout.degree))])

    def _finish(self, total: sealapi.Ciphertext, added: np.ndarray, session: Session) -> bytes:
        """Add the mask (and error), re-randomise, then switch to the reply modulus: the switch
        rounds a fresh ciphertext (switching first would round c1, a function of the client's
        ciphertext and the weights only, and keep that rounding in the reply's noise)."""
        self.evaluator.add_plain_inplace(total, seal.plaintext(self.ctx, added))
        self._rerandomise(total, session)
        self.evaluator.mod_switch_to_inplace(total, self.last)
        return seal.to_bytes(total)

    def _rerandomise(self, ct: sealapi.Ciphertext, session: Session) -> None:
        """Add a fresh public-key encryption of zero: the reply's mask becomes fresh."""
        self.evaluator.add_inplace(ct, session.zeros.take())
