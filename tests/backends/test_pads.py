"""The ``pads`` backend: the PLL split into an offline exchange on random pads and a one-message
online phase in plain modular arithmetic. Each protection is measured beside a control that
removes it: pads are one-time (a reused pad is refused), ``u`` is uniform whatever x is, the
client's share ``y_j`` and the online answer ``z`` are each uniform to the client, and only the
online rows are charged."""

from __future__ import annotations

import numpy as np
import pytest

from test_bfv import Deployment, group, random_weights
from test_pll import UNIFORM, uniformity_score

from privlora.backends import bfv, pads
from privlora.backends.base import MessageOrderError, PayloadError
from privlora.backends.common import frame, unframe
from privlora.backends.exchange import ExchangeCost, exchange, local_send
from privlora.backends.pll import centred, encode_input
from privlora.core.types import GroupSpec

rng = np.random.default_rng(11)
SAMPLES = 400  # rows per uniformity score: 25 per bin of a 16-bin histogram


def send(d: Deployment, g: GroupSpec):
    return local_send(d.server, g, d.session)


def lora_mod_p(d: Deployment, g: GroupSpec, x_hat: np.ndarray) -> np.ndarray:
    return np.mod(d.integer_lora(g, x_hat), d.modulus)


def deploy(groups: list[GroupSpec], server_class: type[pads.Server] = pads.Server,
           options: dict | None = None) -> Deployment:
    build = pads.compile(groups, random_weights(groups), {"privacy": "fast", **(options or {})})
    client = pads.Client(build.client_params)
    server = server_class(build.server_tensors, groups, build.public_params)
    return Deployment(build.server_tensors, client, server, server.open_session(client.evaluation_keys()))


class NoOutputMask(pads.Server):
    """Control: r_j = 0."""

    def _masks(self, group, ledger, ids):
        return np.zeros_like(super()._masks(group, ledger, ids))


class Forgetful(pads.Server):
    """Control: a server that does not remember which pads were used."""

    def _answer(self, group, online, session):
        session.ledger.used.clear()
        return super()._answer(group, online, session)


class ZeroPads(pads.Client):
    """Control: a client whose pads are all zero (so u = x_hat)."""

    def _take(self, group, rows):
        ids, p, shares = super()._take(group, rows)
        return ids, np.zeros_like(p), shares


def test_the_online_answer_is_the_integer_lora_up_to_the_pll_error():
    g = group(0, 64, (48, 16), rank=4)
    d = deploy([g])
    d.client.prepare(g, 10, send(d, g))
    x = rng.normal(size=(10, 64))
    request, state = d.client.encrypt(g, x)
    reply = send(d, g)(pads.ONLINE, request)
    z = pads.unpack_values(reply, d.client.bits, 10 * g.d_out).reshape(10, g.d_out)
    x_hat, _ = encode_input(x, d.client.pll.x_bits)
    error = centred(np.mod((z + state.shares).astype(np.int64) - lora_mod_p(d, g, x_hat), d.modulus), d.modulus)
    assert 0 < np.abs(error).max() <= d.client.pll.error_bound
    delta = d.client.decrypt(g, reply, state)
    assert delta.shape == (10, g.d_out) and delta.dtype == np.float32


def test_exchange_uses_one_online_message_and_no_ciphertext():
    g = group(0, 576, (768,), rank=16)
    d = deploy([g])
    d.client.prepare(g, 1, send(d, g))
    cost = ExchangeCost()
    exchange(d.client, g, rng.normal(size=(1, 576)), send(d, g), cost)
    bits = d.client.bits
    assert cost.messages == 1
    assert cost.bytes_up <= pads.packed_size(576, bits) + 64 and cost.bytes_down == pads.packed_size(768, bits)
    assert d.client.ready(g) == 0


@pytest.mark.parametrize("server_class, refused", [(pads.Server, True), (Forgetful, False)],
                         ids=["one-time pads", "control: a server that forgets"])
def test_a_reused_pad_is_refused(server_class: type[pads.Server], refused: bool):
    """Two answers for one pad give dW (u - u') in the clear: exactly B A (u - u') mod p."""
    g = group(0, 32, (24,), rank=4)
    d = deploy([g], server_class)
    d.client.prepare(g, 1, send(d, g))
    ids = np.zeros(1, "<u8")
    u1, u2 = (rng.integers(0, d.modulus, (1, g.d_in), dtype=np.uint64) for _ in range(2))
    online = [pads.frame([pads._ROWS.pack(1), ids.tobytes(), pads.pack_values(u, d.client.bits)]) for u in (u1, u2)]
    z1 = send(d, g)(pads.ONLINE, online[0])
    assert send(d, g)(pads.ONLINE, online[0]) == z1  # the identical resend of a lost message: the same answer
    if refused:
        with pytest.raises(MessageOrderError, match="already used"):
            send(d, g)(pads.ONLINE, online[1])
        return
    z2 = send(d, g)(pads.ONLINE, online[1])
    a, b = (pads.unpack_values(z, d.client.bits, g.d_out).astype(np.int64) for z in (z1, z2))
    difference = (u1.astype(np.int64) - u2.astype(np.int64)) % d.modulus
    assert np.array_equal(np.mod(a - b, d.modulus), lora_mod_p(d, g, difference)[0])  # a free exact evaluation


@pytest.mark.parametrize("client_class, uniform", [(pads.Client, True), (ZeroPads, False)],
                         ids=["pads", "control: pads of zero"])
def test_u_is_uniform_whatever_x_is(client_class: type[pads.Client], uniform: bool):
    """The same x every time (the worst case for a leak): u's top bits are uniform."""
    g = group(0, 16, (8,))
    d = deploy([g])
    d.client.__class__ = client_class
    d.client.prepare(g, SAMPLES, send(d, g))
    x = np.tile(rng.normal(size=(1, 16)), (SAMPLES, 1))
    request, _ = d.client.encrypt(g, x)
    _, _, packed = unframe(request, 3)
    u = pads.unpack_values(packed, d.client.bits, SAMPLES * g.d_in).reshape(SAMPLES, g.d_in).astype(np.int64)
    score = uniformity_score(u, d.modulus)
    assert (score < UNIFORM) if uniform else (score > 100 * UNIFORM), score


@pytest.mark.parametrize("server_class, masked", [(pads.Server, True), (NoOutputMask, False)],
                         ids=["output masks", "control: r = 0"])
def test_the_clients_share_and_the_online_answer_are_each_uniform_to_it(server_class: type[pads.Server], masked: bool):
    """Without r_j, the offline share y_j = B A s_j + e_j is an uncharged evaluation at the
    client's own s_j, and z - B A u = 0: with it, both differences are uniform."""
    g = group(0, 16, (8,))
    d = deploy([g], server_class)
    d.client.prepare(g, SAMPLES, send(d, g))
    batches = d.client.pools[g.key]
    s = np.concatenate([pads._rows(b.seed, b"pad", 0, b.rows, g.d_in, d.client.bits) for b in batches]).astype(np.int64)
    shares = np.concatenate([pads.unpack_values(b.shares, d.client.bits, b.rows * g.d_out).reshape(b.rows, g.d_out)
                             for b in batches]).astype(np.int64)
    share_residue = np.mod(shares - lora_mod_p(d, g, s), d.modulus)
    request, _ = d.client.encrypt(g, rng.normal(size=(SAMPLES, 16)))
    _, _, packed = unframe(request, 3)
    u = pads.unpack_values(packed, d.client.bits, SAMPLES * g.d_in).reshape(SAMPLES, g.d_in).astype(np.int64)
    z = pads.unpack_values(send(d, g)(pads.ONLINE, request), d.client.bits, SAMPLES * g.d_out).reshape(SAMPLES, g.d_out)
    answer_residue = np.mod(z.astype(np.int64) - lora_mod_p(d, g, u), d.modulus)
    scores = uniformity_score(share_residue, d.modulus), uniformity_score(answer_residue, d.modulus)
    if masked:
        assert max(scores) < UNIFORM, scores
        return
    assert np.abs(centred(share_residue, d.modulus)).max() <= d.client.pll.error_bound  # y_j reveals B A s_j
    assert not answer_residue.any()


def test_only_online_rows_are_charged():
    g = group(0, 16, (8,))
    d = deploy([g])
    charged = []
    send = lambda message, payload: d.server.evaluate(g, record(d.server.parse(g, message, payload)), d.session)  # noqa: E731

    def record(request):
        charged.append((request.message, request.rows))
        return request

    d.client.prepare(g, 5, send)
    request, _ = d.client.encrypt(g, rng.normal(size=(3, 16)))
    send(pads.ONLINE, request)
    assert charged == [(pads.OFFLINE_MASK, 0), (pads.OFFLINE_FINISH, 0), (pads.ONLINE, 3)]


def test_bad_online_messages_are_refused_in_one_line():
    g = group(0, 16, (8,))
    d = deploy([g])
    d.client.prepare(g, 2, send(d, g))
    request, _ = d.client.encrypt(g, rng.normal(size=(2, 16)))
    head, ids, packed = unframe(request, 3)
    cases = {
        "truncated rows": pads.frame([head, ids, packed[:-1]]),
        "ids not matching rows": pads.frame([head, ids[:8], packed]),
        "a repeated id": pads.frame([head, ids[:8] * 2, packed]),
        "no row count": pads.frame([b"", ids, packed]),
        "not a frame": b"garbage",
    }
    for name, payload in cases.items():
        with pytest.raises(PayloadError):
            d.server.parse(g, pads.ONLINE, payload)
    never = pads.frame([head, np.array([7, 8], "<u8").tobytes(), packed])
    with pytest.raises(MessageOrderError, match="never issued"):
        send(d, g)(pads.ONLINE, never)
    with pytest.raises(pads.PadsShortError):
        d.client.encrypt(g, rng.normal(size=(1, 16)))


def test_unused_pads_per_session_are_bounded(monkeypatch):
    g = group(0, 16, (8,))
    d = deploy([g])
    monkeypatch.setattr(pads, "MAX_UNUSED", 4)
    d.client.prepare(g, 4, send(d, g))
    evaluated = []

    def recording(message: int, payload: bytes) -> bytes:
        evaluated.append(message)
        return send(d, g)(message, payload)

    with pytest.raises(PayloadError, match="unused pads"):
        d.client.prepare(g, 1, recording)
    assert evaluated == [pads.OFFLINE_MASK]  # refused at the first offline message, before any work


def test_an_offline_request_over_one_batch_is_refused_before_its_ciphertexts_are_read():
    g = group(0, 16, (8,))
    d = deploy([g])
    oversized = frame([bfv._HEADER.pack(pads.MAX_BATCH + 1, 7)])  # no ciphertext at all: the count alone
    with pytest.raises(PayloadError, match=f"at most {pads.MAX_BATCH} rows"):
        d.server.parse(g, pads.OFFLINE_MASK, oversized)
    one_batch = frame([bfv._HEADER.pack(pads.MAX_BATCH, 7)])
    with pytest.raises(PayloadError, match="ciphertexts"):  # the control: one batch passes the bound, to the count
        d.server.parse(g, pads.OFFLINE_MASK, one_batch)


@pytest.mark.parametrize("bits", [1, 7, 8, 33, 44, 46, 63])
def test_packing_at_the_modulus_width_round_trips(bits: int):
    values = rng.integers(0, 2**bits, 97, dtype=np.uint64)
    packed = pads.pack_values(values, bits)
    assert len(packed) == pads.packed_size(97, bits) == 97 * ((bits + 7) // 8)
    assert np.array_equal(pads.unpack_values(packed, bits, 97), values)
    with pytest.raises(PayloadError):
        pads.unpack_values(packed + b"\0", bits, 97)
    if bits % 8:  # a value wider than the modulus is refused
        with pytest.raises(PayloadError, match="does not fit"):
            pads.unpack_values(pads.pack_values(np.full(97, 2**bits, np.uint64), bits + 8 - bits % 8), bits, 97)
