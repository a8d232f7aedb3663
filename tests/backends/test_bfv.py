"""What the bfv kernel adds to a reply, each protection measured with a control that removes it:
the uniform mask of message 0 (on every coefficient), the PLL error of message 1, the fresh
encryption of zero in every reply, the one-time masks t kept per session and group, exact
decryption at the widest modulus allowed, and, with privacy=rigorous, a reply noise that is
fresh for every reply and in which the product's weight-dependent noise is drowned by the switch.

The noise measurements read the decryption noise itself, with the client's secret key as a
polynomial: SEAL keeps it in NTT form, so the helpers below make it decrypt a crafted ciphertext
(0, Delta) instead, whose plaintext is the key.
"""

from __future__ import annotations

import dataclasses

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from tenseal import sealapi
from test_pll import UNIFORM, uniformity_score

from privlora.backends import bfv, bfv_layout
from privlora.backends import seal
from privlora.backends.base import MessageOrderError, PayloadError, Request, Weights
from privlora.backends.common import frame, unframe
from privlora.backends.exchange import exchange, local_send
from privlora.backends.pll import PLLError, centred, encode_input
from privlora.core.types import GroupSpec, PLLSite

rng = np.random.default_rng(5)
CALLS = 400  # replies per uniformity score: 25 per bin of a 16-bin histogram


def group(index: int, d_in: int, outputs: tuple[int, ...], rank: int = 4) -> GroupSpec:
    """A group of one site of rank ``rank`` per output size."""
    sites = tuple(PLLSite(10 * index + k, f"layers.{index}.proj{k}", d_in, d_out, rank, 2.0)
                  for k, d_out in enumerate(outputs))
    return GroupSpec(f"round_{index}", 0, 0, 0, sites)


def random_weights(groups: list[GroupSpec], seed: int = 1) -> Weights:
    generator = np.random.default_rng(seed)
    return {s.site_id: (generator.normal(0, 0.1, (s.rank, s.d_in)), generator.normal(0, 0.1, (s.d_out, s.rank)))
            for g in groups for s in g.sites}


@dataclass(frozen=True)
class Deployment:
    """A compiled bfv build, its client, its server and one session opened with the client's keys."""

    tensors: dict[str, np.ndarray]
    client: bfv.Client
    server: bfv.Server
    session: bfv.Session

    @property
    def modulus(self) -> int:
        return self.client.modulus

    @property
    def degree(self) -> int:
        return self.client.bfv.poly_modulus_degree

    def call(self, g: GroupSpec, message: int, payload: bytes, session: bfv.Session | None = None) -> bytes:
        """One request through the server as the runtime drives it: parsed, then evaluated."""
        return self.server.evaluate(g, self.server.parse(g, message, payload), session or self.session)

    def integer_lora(self, g: GroupSpec, x_hat: np.ndarray) -> np.ndarray:
        """x_hat A_hat^T B_hat^T over the integers, from the server's own tensors."""
        a_hat, b_hat = (self.tensors[f"{g.key}.{name}"].astype(np.int64) for name in ("a_hat", "b_hat"))
        return x_hat @ a_hat.T @ b_hat.T


def deploy(groups: list[GroupSpec], weights: Weights, options: dict[str, Any] | None = None,
           server_class: type[bfv.Server] = bfv.Server, zero_pool: int | None = None) -> Deployment:
    """``zero_pool`` 0: the server makes each encryption of zero when a reply needs it (no pool)."""
    build = bfv.compile(groups, weights, options or {})
    client = bfv.Client(build.client_params)
    params = build.public_params if zero_pool is None else {**build.public_params, "zero_pool": zero_pool}
    server = server_class(build.server_tensors, groups, params)
    return Deployment(build.server_tensors, client, server, server.open_session(client.evaluation_keys()))


def load_ciphertext(client: bfv.Client, blob: bytes) -> sealapi.Ciphertext:
    return seal.from_bytes(sealapi.Ciphertext, client.ctx, blob, "ciphertext")


def plaintext_of(client: bfv.Client, ct: sealapi.Ciphertext) -> np.ndarray:
    """Every coefficient of the decryption of ``ct`` (int64, mod p)."""
    plain = sealapi.Plaintext()
    client.decryptor.decrypt(ct, plain)
    degree = ct.poly_modulus_degree()
    return seal.coefficients(plain, list(range(degree)), degree).astype(np.int64)


def decrypted_reply(client: bfv.Client, reply: bytes) -> np.ndarray:
    """Every coefficient of every ciphertext of a reply, decrypted: ``[ciphertexts, degree]``."""
    return np.stack([plaintext_of(client, load_ciphertext(client, blob)) for blob in unframe(reply)])


def output_values(layout: bfv_layout.Layout, polynomials: np.ndarray) -> np.ndarray:
    """The ``[rows, d_out]`` outputs of a decrypted reply, read at the layout's output coefficients."""
    per_block = polynomials.reshape(layout.row_blocks, layout.out_blocks, layout.degree)
    return layout.gather(per_block[..., layout.outputs])


def masked_request(d: Deployment, g: GroupSpec, x: np.ndarray, session: bfv.Session | None = None) -> tuple[bytes, Any]:
    """Message 0 answered; message 1 made from its reply, and the client's state."""
    request, state = d.client.encrypt(g, x)
    return d.client.advance(g, 0, d.call(g, 0, request, session), state)


def final_outputs(d: Deployment, g: GroupSpec, rows: int, reply: bytes) -> np.ndarray:
    """y (centred mod p) of message 1's reply."""
    layout = bfv_layout.choose_layout(rows, g.rank, g.d_out, d.degree)
    return centred(output_values(layout, decrypted_reply(d.client, reply)), d.modulus)


def pll_error(d: Deployment, g: GroupSpec, x: np.ndarray, reply: bytes) -> np.ndarray:
    """y - x_hat A_hat^T B_hat^T (centred mod p): the PLL error e, unless something else got in."""
    x_hat, _ = encode_input(x, d.client.pll.x_bits)
    return centred(final_outputs(d, g, len(x), reply) - d.integer_lora(g, x_hat), d.modulus)


# 1. The mask: message 0's reply is uniform on every coefficient.

class ZeroMask(bfv.Server):
    """Test-only control: the uniform values added to every coefficient (t included) are zeros."""

    def _uniform(self, layout: bfv_layout.Layout) -> np.ndarray:
        return np.zeros_like(super()._uniform(layout))


@pytest.mark.parametrize("server_class, masked", [(bfv.Server, True), (ZeroMask, False)],
                         ids=["mask", "control: no mask"])
def test_message_0_replies_are_uniform_on_every_coefficient(server_class: type[bfv.Server], masked: bool):
    """h' at the output coefficients and every other coefficient (the product's cross terms, the
    unused tail) over CALLS replies to one request: top-bits chi-square scores as in test_pll."""
    g = group(0, 16, (8,))
    d = deploy([g], random_weights([g]), {}, server_class)
    x = rng.normal(size=(2, 16))
    request, _ = d.client.encrypt(g, x)
    replies = np.stack([decrypted_reply(d.client, d.call(g, 0, request)) for _ in range(CALLS)])
    layout = bfv_layout.choose_layout(2, g.d_in, g.rank, d.degree)
    outputs = replies[..., layout.outputs].reshape(CALLS, -1)
    others = np.delete(replies, layout.outputs, axis=-1).reshape(CALLS, -1)
    scores = uniformity_score(outputs, d.modulus), uniformity_score(others, d.modulus)
    if masked:
        assert max(scores) < UNIFORM, f"uniformity scores (h', other coefficients) {scores}"
        return
    assert min(scores) > 100 * UNIFORM, f"uniformity scores (h', other coefficients) {scores}"
    x_hat, _ = encode_input(x, d.client.pll.x_bits)
    a_hat = d.tensors[f"{g.key}.a_hat"].astype(np.int64)
    assert np.array_equal(output_values(layout, replies[0]), np.mod(x_hat @ a_hat.T, d.modulus))  # h' = A x
    assert np.all(replies == replies[0]) and np.count_nonzero(np.delete(replies[0], layout.outputs, -1)) > 0


# 2. The error: message 1's reply is B A x + e, with e of the configured spread.

@pytest.mark.parametrize("options, flooded", [({}, True), ({"privacy": "rigorous"}, True), ({"sigma": 0.0}, False)],
                         ids=["fast", "rigorous", "control: sigma 0"])
def test_the_pll_error_has_the_configured_spread(options: dict[str, Any], flooded: bool):
    """8 rows x 64 outputs x 8 exchanges: 4096 samples of e (one standard error of the spread 1.1%)."""
    g = group(0, 16, (64,))
    d = deploy([g], random_weights([g]), options)
    errors = []
    for _ in range(8):
        x = rng.normal(size=(8, 16))
        request, _ = masked_request(d, g, x)
        errors.append(pll_error(d, g, x, d.call(g, 1, request)))
    error = np.concatenate(errors).ravel()
    params = d.client.pll
    assert np.abs(error).max() <= params.error_bound
    if not flooded:
        assert np.all(error == 0)
        return
    ratio = error.std() / params.sigma
    assert 0.9 < ratio < 1.1, f"estimated / configured sigma {ratio:.3f}"
    assert abs(error.mean()) < 5 * params.sigma / np.sqrt(error.size)


# 3. Re-randomisation: every reply carries a fresh encryption of zero.

class WithoutRerandomisation(bfv.Server):
    """Test-only control: replies carry the mask, the error and the switch, no fresh encryption of zero."""

    def _rerandomise(self, ct: sealapi.Ciphertext, session: bfv.Session) -> None:
        """Leaves the reply as the product, the mask and the switch made it."""


def mask_polynomial(client: bfv.Client, blob: bytes) -> np.ndarray:
    """c1 of a reply ciphertext, the part that multiplies the secret key. The mask and the error
    are plaintexts added to c0, so without re-randomisation two replies to one request share c1."""
    ct = load_ciphertext(client, blob)
    size, data = ct.coeff_modulus_size() * ct.poly_modulus_degree(), ct.dyn_array()
    return np.fromiter(map(data.at, range(size, 2 * size)), dtype=np.uint64, count=size)


@pytest.mark.parametrize("privacy", ["fast", "rigorous"])
@pytest.mark.parametrize("pooled", [True, False], ids=["zeros from the pool", "zeros made on demand"])
@pytest.mark.parametrize("server_class, rerandomised", [(bfv.Server, True), (WithoutRerandomisation, False)],
                         ids=["rerandomised", "control: none"])
def test_replies_are_rerandomised(privacy: str, pooled: bool, server_class: type[bfv.Server], rerandomised: bool):
    """Both sources of encryptions of zero, each without a race: two made ahead of time and taken
    from the pool, or a server without a pool that makes one per reply."""
    g = group(0, 16, (8,))
    d = deploy([g], random_weights([g]), {"privacy": privacy}, server_class, None if pooled else 0)
    if pooled:
        d.session.zeros.refill()
        d.session.zeros.refill()
    request, _ = d.client.encrypt(g, rng.normal(size=(2, 16)))
    (first,), (second,) = unframe(d.call(g, 0, request)), unframe(d.call(g, 0, request))
    changed = np.mean(mask_polynomial(d.client, first) != mask_polynomial(d.client, second))
    if rerandomised:  # a fresh c1 coefficient equals the other by chance in about 2^-60
        assert changed > 0.99
    else:
        assert changed == 0.0


# 4. One-time t: kept for exactly one message 1 of its own session and group.

def test_message_1_is_refused_out_of_order_replayed_or_with_other_rows():
    """A second message 1 on one t would let a client difference two answers; the budget counts
    rows at message 0 only, so message 1 must not carry rows of its own."""
    g = group(0, 16, (8,))
    d = deploy([g], random_weights([g]))
    x = rng.normal(size=(2, 16))
    first, _ = d.client.encrypt(g, x)
    assert d.server.parse(g, 0, first).rows == 2
    second, _ = masked_request(d, g, x)
    assert d.server.parse(g, 1, second).rows == 0  # the budget counts the rows once, at message 0
    fresh = d.server.open_session(d.client.evaluation_keys())
    with pytest.raises(MessageOrderError):  # no message 0 in this session yet
        d.call(g, 1, second, fresh)
    assert np.abs(pll_error(d, g, x, d.call(g, 1, second))).max() <= d.client.pll.error_bound
    with pytest.raises(MessageOrderError):  # replayed: t was used once
        d.call(g, 1, second)
    three_rows, _ = masked_request(d, g, rng.normal(size=(3, 16)), fresh)
    _, pending = masked_request(d, g, x)  # a pending message 0 of 2 rows
    with pytest.raises(PayloadError, match="declares 3 rows"):  # message 1 of its exchange, with other rows
        d.call(g, 1, with_exchange(three_rows, pending.exchange))


def with_exchange(payload: bytes, exchange: int) -> bytes:
    """``payload`` with its header's exchange id replaced (its row count kept)."""
    header, *blobs = unframe(payload)
    rows, _ = bfv._HEADER.unpack(header)
    return frame([bfv._HEADER.pack(rows, exchange), *blobs])


class KeyedByGroupOnly(bfv.Server):
    """Control: t kept under the group alone, as before exchange ids (the payload's id ignored)."""

    def _evaluate(self, group, request, session):
        unkeyed = dataclasses.replace(request.data, exchange=0)
        return super()._evaluate(group, Request(request.message, request.rows, unkeyed), session)


@pytest.mark.parametrize("server_class, right", [(bfv.Server, True), (KeyedByGroupOnly, False)])
def test_a_stale_message_0_evaluated_after_its_resend_changes_nothing(server_class: type[bfv.Server], right: bool):
    """A connection dies after message 0 was sent; the client sends it again on a new one, and
    the server finishes the stale copy last. The resend's message 1 must still find its own t."""
    g = group(0, 16, (8,))
    d = deploy([g], random_weights([g]), server_class=server_class)
    x = rng.normal(size=(2, 16))
    stale, _ = d.client.encrypt(g, x)  # the first sending, whose reply was lost
    resend, state = d.client.encrypt(g, x)
    reply = d.call(g, 0, resend)
    d.call(g, 0, stale)  # evaluated after the resend
    final = d.call(g, 1, d.client.advance(g, 0, reply, state)[0])
    assert bool(np.abs(pll_error(d, g, x, final)).max() <= d.client.pll.error_bound) is right


def test_pending_exchanges_are_bounded_per_group():
    g = group(0, 16, (8,))
    d = deploy([g], random_weights([g]))
    x = rng.normal(size=(2, 16))
    states = [d.client.encrypt(g, x) for _ in range(bfv.PENDING_PER_GROUP + 2)]
    replies = [d.call(g, 0, request) for request, _ in states]
    assert len(d.session.pending) == bfv.PENDING_PER_GROUP
    with pytest.raises(MessageOrderError):  # the oldest was dropped
        d.call(g, 1, d.client.advance(g, 0, replies[0], states[0][1])[0])
    final = d.call(g, 1, d.client.advance(g, 0, replies[-1], states[-1][1])[0])
    assert np.abs(pll_error(d, g, x, final)).max() <= d.client.pll.error_bound


def test_the_masks_of_two_sessions_or_two_groups_do_not_mix():
    """Two groups of one shape (their message-1 payloads fit either) and two sessions: message 1
    of one cannot consume the other's t, and interleaved groups each unmask with their own."""
    g0, g1 = group(0, 16, (8,)), group(1, 16, (8,))
    d = deploy([g0, g1], random_weights([g0, g1]))
    other = d.server.open_session(d.client.evaluation_keys())
    x0, x1 = rng.normal(size=(2, 16)), rng.normal(size=(2, 16))
    request0, _ = masked_request(d, g0, x0)
    with pytest.raises(MessageOrderError):  # session A's t is not session B's
        d.call(g0, 1, request0, other)
    with pytest.raises(MessageOrderError):  # g0's t is not g1's
        d.call(g1, 1, request0)
    request1, _ = masked_request(d, g1, x1)
    bound = d.client.pll.error_bound
    assert np.abs(pll_error(d, g1, x1, d.call(g1, 1, request1))).max() <= bound
    assert np.abs(pll_error(d, g0, x0, d.call(g0, 1, request0))).max() <= bound


# 5. The worst case: exact decryption at the widest modulus allowed.

WIDE_IN, WIDE_RANK, WIDE_OUT = 1024, 8, 4
ALTERNATING = np.where(np.arange(WIDE_IN) % 2 == 0, 1.0, -1.0)


def widest_group() -> tuple[GroupSpec, Weights]:
    """Two sites of maximal weights (every A_hat and B_hat entry +-511): one reaches the worst case
    on constant inputs, the other on alternating ones. rank * d_in = 8192 puts the bound just
    under 2^45 at 15-bit rows (p = 2^46, the largest allowed) and over it at 16 bits."""
    g = GroupSpec("round_0", 0, 0, 0, tuple(PLLSite(k, f"layers.0.proj{k}", WIDE_IN, WIDE_OUT, WIDE_RANK, 2.0)
                                             for k in range(2)))
    ones = np.ones((WIDE_OUT, WIDE_RANK))
    return g, {0: (np.ones((WIDE_RANK, WIDE_IN)), ones), 1: (np.tile(ALTERNATING, (WIDE_RANK, 1)), ones)}


@pytest.mark.parametrize("privacy", ["fast", "rigorous"])
def test_the_worst_case_decrypts_exactly_at_the_widest_modulus(privacy: str):
    """sigma 0, so that y must equal B A x_hat exactly: any decryption error or wrap shows."""
    g, weights = widest_group()
    d = deploy([g], weights, {"privacy": privacy, "sigma": 0.0})
    x = np.stack([np.ones(WIDE_IN), -np.ones(WIDE_IN), ALTERNATING, -ALTERNATING])
    x_hat, _ = encode_input(x, d.client.pll.x_bits)
    assert np.all(np.abs(x_hat) == 2 ** (d.client.pll.x_bits - 1) - 1)
    request, _ = masked_request(d, g, x)
    y, exact = final_outputs(d, g, len(x), d.call(g, 1, request)), d.integer_lora(g, x_hat)
    assert np.array_equal(y, exact), f"off by up to {np.abs(y - exact).max()} (p = 2^{d.modulus.bit_length() - 1})"
    assert np.abs(exact).max() > 0.99 * d.modulus / 2  # the inputs reach the bound p was sized for
    assert d.client.pll.x_bits == 15 and d.modulus == 2 ** bfv.DEFAULTS["max_modulus_bits"]


def test_rows_fixed_too_wide_for_the_widest_modulus_are_refused():
    g, weights = widest_group()
    with pytest.raises(PLLError, match="needs a 47-bit modulus"):
        bfv.compile([g], weights, {"sigma": 0.0, "x_bits": 16})


# 6. Circuit privacy (privacy=rigorous): the reply's noise is fresh, the weights' share of it drowned.

_HEADER = struct.Struct("<HBBBBHQ")  # SEALHeader: magic, size, version, compression, reserved, total size


def seal_header(template: bytes, size: int) -> bytes:
    """SEAL's header for an uncompressed object of ``size`` bytes, with this build's version
    (read from an object it saved)."""
    magic, header_size, major, minor, _, reserved, _ = _HEADER.unpack_from(template)
    return _HEADER.pack(magic, header_size, major, minor, int(sealapi.COMPR_MODE_TYPE.NONE), reserved, size)


def ciphertext_bytes(template: bytes, parms_id: list[int], polynomials: np.ndarray) -> bytes:
    """A ciphertext in SEAL's serialisation: parms_id, NTT flag, size, degree, moduli count,
    scale, correction factor, then the coefficients ``[size, moduli, degree]`` as a DynArray.
    The bindings read coefficients but cannot write them."""
    data = np.ascontiguousarray(polynomials, dtype=np.uint64)
    size, moduli, degree = data.shape
    array = seal_header(template, _HEADER.size + 8 + data.nbytes) + struct.pack("<Q", data.size) + data.tobytes()
    body = struct.pack("<4QB3QdQ", *parms_id, 0, size, degree, moduli, 1.0, 1) + array
    return seal_header(template, _HEADER.size + len(body)) + body


def primes(client: bfv.Client, ct: sealapi.Ciphertext) -> list[int]:
    return [m.value() for m in client.ctx.get_context_data(ct.parms_id()).parms().coeff_modulus()]


def secret_polynomial(client: bfv.Client, template: bytes) -> np.ndarray:
    """The secret key's ternary coefficients: (0, Delta) at the reply level decrypts to
    round(p Delta s / q) = s (mod p)."""
    last = client.ctx.last_parms_id()
    (q,) = [m.value() for m in client.ctx.get_context_data(last).parms().coeff_modulus()]
    polynomials = np.zeros((2, 1, client.bfv.poly_modulus_degree), dtype=np.uint64)
    polynomials[1, 0, 0] = q // client.modulus
    s = plaintext_of(client, load_ciphertext(client, ciphertext_bytes(template, last, polynomials)))
    assert set(np.unique(s)) <= {0, 1, client.modulus - 1}
    return np.where(s == client.modulus - 1, -1, s)


def coefficients(ct: sealapi.Ciphertext) -> np.ndarray:
    """``[2, moduli, degree]`` residues of a size-2 ciphertext in coefficient form."""
    assert ct.size() == 2 and not ct.is_ntt_form()
    count = 2 * ct.coeff_modulus_size() * ct.poly_modulus_degree()
    data = ct.dyn_array()
    return np.fromiter(map(data.at, range(count)), dtype=np.uint64, count=count).reshape(2, ct.coeff_modulus_size(), -1)


def negacyclic_product(a: np.ndarray, s: np.ndarray) -> np.ndarray:
    """a s in Z[X]/(X^N + 1), exactly, for 60-bit a and ternary s (Python integers): four 15-bit
    limbs through a float FFT, whose sums stay below 2^29 and round exactly."""
    degree = len(a)
    spectrum = np.fft.rfft(s.astype(np.float64), 2 * degree)
    total = np.zeros(degree, dtype=object)
    for k in range(4):
        limb = ((a >> np.uint64(15 * k)) & np.uint64(2**15 - 1)).astype(np.float64)
        full = np.rint(np.fft.irfft(np.fft.rfft(limb, 2 * degree) * spectrum, 2 * degree)).astype(np.int64)
        total = total + (full[:degree] - full[degree:]).astype(object) * 2 ** (15 * k)
    return total


def decryption_noise(client: bfv.Client, ct: sealapi.Ciphertext, s: np.ndarray) -> tuple[np.ndarray, int]:
    """The noise v of every coefficient, c0 + c1 s = (Q/p) m + v (mod Q), in units of the
    ciphertext's own modulus Q (returned with it): residues combined by CRT, m from decryption."""
    residues, moduli = coefficients(ct), primes(client, ct)
    modulus = int(np.prod(np.array(moduli, dtype=object)))
    phase = np.zeros(ct.poly_modulus_degree(), dtype=object)
    for i, q in enumerate(moduli):
        part = (residues[0, i].astype(object) + negacyclic_product(residues[1, i], s)) % q
        cofactor = modulus // q
        phase = (phase + part * (cofactor * pow(cofactor, -1, q))) % modulus
    p, m = client.modulus, plaintext_of(client, ct).astype(object)
    scaled = (p * phase - modulus * m) % (p * modulus)  # p v, centred below
    scaled = np.where(scaled >= p * modulus // 2, scaled - p * modulus, scaled)
    return np.array([float(value) / p for value in scaled]), modulus


def reply_noise(d: Deployment, s: np.ndarray, blob: bytes) -> np.ndarray:
    """The noise of one reply ciphertext, in units of the reply modulus."""
    return decryption_noise(d.client, load_ciphertext(d.client, blob), s)[0]


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


def sparse_or_dense(dense: bool) -> tuple[GroupSpec, Weights]:
    """Rows of A_hat with one +-511 entry, or with 256: the product noise grows with ||A_hat row||_2."""
    g = group(0, 256, (8,))
    generator = np.random.default_rng(2)
    a = np.zeros((4, 256))
    a[np.arange(4), generator.integers(0, 256, 4)] = 1.0
    return g, {0: (generator.choice([-1.0, 1.0], (4, 256)) if dense else a, generator.choice([-1.0, 1.0], (8, 4)))}


def one_weight_changed(weights: Weights) -> Weights:
    """The same weights but for one entry of A, which quantises to +-510 instead of +-511."""
    a, b = weights[0]
    a = a.copy()
    a[0, 1] *= 0.998
    return {0: (a, b)}


def same_client(d: Deployment, groups: list[GroupSpec], weights: Weights, options: dict[str, Any]) -> Deployment:
    """A server with other weights, and the same p, for ``d``'s client: one request, two weight sets."""
    build = bfv.compile(groups, weights, options)
    assert build.public_params["plain_modulus"] == d.modulus
    server = bfv.Server(build.server_tensors, groups, build.public_params)
    return Deployment(build.server_tensors, d.client, server, server.open_session(d.client.evaluation_keys()))


FRESH = 0.08  # |correlation| of independent noises over 4096 coefficients: one standard error is 0.016


class SwitchFirst(bfv.Server):
    """Test-only variant in the order the backend must not use: switch, then re-randomise."""

    def _finish(self, total: sealapi.Ciphertext, added: np.ndarray, session: bfv.Session) -> bytes:
        self.evaluator.add_plain_inplace(total, seal.plaintext(self.ctx, added))
        self.evaluator.mod_switch_to_inplace(total, self.last)
        zero = sealapi.Ciphertext()
        session.zeros.encryptor.encrypt_zero(self.last, zero)
        self.evaluator.add_inplace(total, zero)
        return seal.to_bytes(total)


@pytest.mark.parametrize("privacy, server_class, fresh", [("rigorous", bfv.Server, True), ("fast", bfv.Server, True),
                                                          ("fast", SwitchFirst, False)],
                         ids=["rigorous", "fast", "control: switch before re-randomising"])
def test_the_reply_noise_is_fresh_for_every_reply(privacy: str, server_class: type[bfv.Server], fresh: bool):
    """Two replies to one request, and one from a server whose weights differ in one entry: the
    correlation of their noises, coefficient by coefficient. Switched first, c1 is the client's own
    c1 times the weights (the mask is added to c0): the switch's rounding of it, times s, is a
    function of the request and the weights, half the reply's noise variance, and one weight
    changes it. Re-randomised first, what the switch rounds is uniform and fresh."""
    g, weights = sparse_or_dense(True)
    options = {"privacy": privacy}
    d = deploy([g], weights, options, server_class)
    other = same_client(d, [g], one_weight_changed(weights), options)
    request, _ = d.client.encrypt(g, rng.normal(size=(1, 256)))
    blobs = [unframe(d.call(g, 0, request))[0] for _ in range(2)] + [unframe(other.call(g, 0, request))[0]]
    s = secret_polynomial(d.client, blobs[0])
    first, again, changed = (reply_noise(d, s, blob) for blob in blobs)
    repeated, across = correlation(first, again), correlation(first, changed)
    assert abs(across) < FRESH, f"noise correlation with one weight changed {across:.3f}"
    assert (abs(repeated) < FRESH) if fresh else (repeated > 0.3), f"noise correlation of two replies {repeated:.3f}"


class NoiseTap(bfv.Server):
    """Test-only instrument: keeps a copy of every product before the mask, the re-randomisation
    and the switch (its noise is the input's noise times the weights), then finishes as the server does."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.products: list[bytes] = []

    def _finish(self, total: sealapi.Ciphertext, added: np.ndarray, session: bfv.Session) -> bytes:
        self.products.append(seal.to_bytes(total))
        return super()._finish(total, added, session)


@dataclass(frozen=True)
class Noise:
    reply: float  # standard deviation of the reply's noise, in units of the reply modulus
    weighted: float  # of the product's noise (weight-dependent), scaled to the reply modulus
    fresh: float  # of the client's own fresh encryption: the instrument's check


def measure_noise(privacy: str, dense: bool, replies: int = 2) -> Noise:
    g, weights = sparse_or_dense(dense)
    d = deploy([g], weights, {"privacy": privacy}, NoiseTap)
    request, _ = d.client.encrypt(g, rng.normal(size=(1, 256)))
    blobs = [unframe(d.call(g, 0, request))[0] for _ in range(replies)]
    s = secret_polynomial(d.client, blobs[0])
    reply_modulus = primes(d.client, load_ciphertext(d.client, blobs[0]))[0]
    product = [decryption_noise(d.client, load_ciphertext(d.client, blob), s) for blob in d.server.products]
    weighted = np.concatenate([v * (reply_modulus / float(modulus)) for v, modulus in product])
    fresh, _ = decryption_noise(d.client, load_ciphertext(d.client, unframe(request)[1]), s)
    reply = np.concatenate([reply_noise(d, s, blob) for blob in blobs])
    return Noise(float(reply.std()), float(weighted.std()), float(fresh.std()))


SMUDGED = 2.0**-40  # the weight-dependent noise below this fraction of the reply's noise


@pytest.mark.parametrize("privacy, smudged", [("rigorous", True), ("fast", False)], ids=["rigorous", "control: fast"])
def test_the_switch_drowns_the_noise_of_the_product(privacy: str, smudged: bool):
    """The product's own noise (the input's noise times the weights) grows with the weights:
    sparse vs dense rows of A, about 16 times; the reply's noise does not. The switch scales the
    product's noise by 2^-87 (rigorous) or 2^-29 (fast) next to a reply noise of about 21. Fast's
    part is also far below its reply noise, so the reply's spread cannot show it: the margin can."""
    sparse, dense = measure_noise(privacy, False), measure_noise(privacy, True)
    assert all(0.9 < noise.fresh / 3.2 < 1.1 for noise in (sparse, dense)), "the instrument reads SEAL's fresh noise"
    assert dense.weighted > 8 * sparse.weighted
    assert 0.9 < dense.reply / sparse.reply < 1.1, f"reply noise {dense.reply:.2f} vs {sparse.reply:.2f}"
    margin = dense.weighted / dense.reply
    message = f"weight-dependent / reply noise 2^{np.log2(margin):.1f}"
    assert (margin < SMUDGED) if smudged else (margin > SMUDGED), message


def test_encoded_weights_are_bounded_in_bytes_whatever_row_counts_a_client_sends():
    """Each row count may need another block shape, whose weights the server encodes: the cache
    keeps the most recently used shapes up to a budget in bytes, so unusual row counts cannot
    grow the server's memory without bound; every answer stays right. The control: the same
    requests to a server with no budget keep several times as much."""
    g, weights = sparse_or_dense(True)
    (site,) = g.sites
    a, b = weights[site.site_id]
    bounded, unbounded = deploy([g], weights, {"sigma": 0.0}), deploy([g], weights, {"sigma": 0.0})
    budget = bounded.server.encoded_budget = 1024**2
    unbounded.server.encoded_budget = 1 << 40
    for rows in range(1, 100, 3):
        x = rng.normal(size=(rows, site.d_in))
        exact = (x @ a.T) @ b.T * site.scaling
        for d in (bounded, unbounded):
            delta = exchange(d.client, g, x, local_send(d.server, g, d.session))
            assert np.abs(delta - exact).max() <= 0.01 * np.abs(exact).max()
        assert bounded.server.encoded_bytes <= budget
    assert unbounded.server.encoded_bytes > 3 * budget
