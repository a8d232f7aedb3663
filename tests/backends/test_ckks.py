"""What is specific to the ckks kernel: the minimal rotation key set, one key set and one session
for groups of every shape and every layer, seeded uploads, replies at the last level, strict
input checks, and the two protections of a reply (PLL error and re-randomisation), each measured
on its own with a control that removes it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from tenseal import sealapi

from privlora.backends import ckks
from privlora.backends import seal
from privlora.backends.base import PayloadError, Weights
from privlora.backends.common import frame, unframe
from privlora.backends.exchange import exchange, local_send
from privlora.core.types import GroupSpec, PLLSite

rng = np.random.default_rng(3)


def group(index: int, d_in: int, outputs: tuple[int, ...], rank: int | tuple[int, ...] = 8) -> GroupSpec:
    """A group of one site per output size; ``rank`` is one rank for all sites or one per site."""
    ranks = rank if isinstance(rank, tuple) else (rank,) * len(outputs)
    sites = tuple(PLLSite(10 * index + k, f"layers.{index}.proj{k}", d_in, d_out, r, 2.0)
                  for k, (d_out, r) in enumerate(zip(outputs, ranks)))
    return GroupSpec(f"round_{index}", 0, 0, 0, sites)


def weights(groups: list[GroupSpec]) -> Weights:
    rng = np.random.default_rng(1)
    return {s.site_id: (rng.normal(0, 0.1, (s.rank, s.d_in)), rng.normal(0, 0.1, (s.d_out, s.rank)))
            for g in groups for s in g.sites}


def expected_delta(g: GroupSpec, w: Weights, x: np.ndarray) -> np.ndarray:
    """The float LoRA delta of every site of ``g``, concatenated as the group returns it."""
    return np.concatenate([(x @ w[s.site_id][0].T) @ w[s.site_id][1].T * s.scaling for s in g.sites], -1)


def deploy(groups: list[GroupSpec], options: dict[str, Any] | None = None,
           server_class: type[ckks.Server] = ckks.Server) -> tuple[ckks.Client, ckks.Server, ckks.Session]:
    """Compile, make a client and a server, and open one session with the client's keys."""
    build = ckks.compile(groups, weights(groups), options or {})
    client = ckks.Client(build.client_params)
    server = server_class(build.server_tensors, groups, build.public_params)
    return client, server, server.open_session(client.evaluation_keys())


def test_rotation_steps_are_the_minimal_set():
    chatglm2 = ckks.layout(group(0, 4096, (4608,)), 4096)
    assert chatglm2.outputs == 2 and chatglm2.steps == set(range(1, 8)) | {8 << i for i in range(9)}
    assert len(chatglm2.steps) == 16
    smollm2 = ckks.layout(group(0, 576, (576, 192)), 4096)  # fused q+v: rank 16, d_pad 1024
    assert (smollm2.d_pad, smollm2.r_pad, smollm2.outputs) == (1024, 16, 1)
    assert smollm2.steps == set(range(1, 16)) | {16, 32, 64, 128, 256, 512}
    assert (smollm2.block, smollm2.rows_per_ciphertext, chatglm2.rows_per_ciphertext) == (2048, 2, 1)


def test_prompt_rows_share_ciphertexts():
    g = group(0, 64, (64, 32))
    client, server, keys = deploy([g])
    lay = ckks.layout(g, 4096)
    assert lay.rows_per_ciphertext == 16  # block of 256 slots: 96 outputs + 15 + 63 read past them
    x = rng.normal(size=(20, 64))
    request, _ = client.encrypt(g, x)
    assert len(unframe(request)) == 2
    delta = exchange(client, g, x, local_send(server, g, keys))
    expected = expected_delta(g, weights([g]), x)
    assert np.linalg.norm(delta - expected) / np.linalg.norm(expected) < 1e-3


# Groups of different shapes: fused and unfused, site ranks 2 to 8 (group ranks 4 to 16), d_in 48 to
# 256, d_out 40 to 200. Every group needs rotation steps that some other group does not.
SHAPES = ((64, (64, 32), 8), (48, (40,), 4), (100, (30, 50), (2, 6)), (256, (200,), 4))


def layers(count: int) -> list[GroupSpec]:
    """``count`` layers, each with one group of every shape in ``SHAPES``."""
    return [group(len(SHAPES) * layer + k, *shape) for layer in range(count) for k, shape in enumerate(SHAPES)]


def key_set(groups: list[GroupSpec]) -> tuple[list[int], int]:
    """The compiled rotation steps and the size of the evaluation keys a client uploads."""
    build = ckks.compile(groups, weights(groups), {})
    return build.public_params["steps"], len(ckks.Client(build.client_params).evaluation_keys())


def test_the_key_set_does_not_grow_with_the_number_of_layers():
    (one_steps, one_size), (many_steps, many_size) = key_set(layers(1)), key_set(layers(4))
    assert one_steps == many_steps and abs(many_size - one_size) < 0.01 * one_size
    # Control: a group of a new shape (d_in 1024: two more sum steps) grows the key set, and the size shows it.
    wider_steps, wider_size = key_set(layers(1) + [group(99, 1024, (64,), 8)])
    assert set(wider_steps) > set(one_steps) and wider_size > 1.05 * one_size


def test_one_session_evaluates_every_group_of_every_shape_and_layer():
    groups = layers(2)
    needs = [ckks.layout(g, 4096).steps for g in groups]
    assert all(need < set().union(*needs) for need in needs)  # no group's own steps would serve them all
    client, server, keys = deploy(groups)
    w = weights(groups)
    for g in groups:
        x = rng.normal(size=(3, g.d_in))
        delta = exchange(client, g, x, local_send(server, g, keys))
        expected = expected_delta(g, w, x)
        assert np.linalg.norm(delta - expected) / np.linalg.norm(expected) < 1e-3, g.key


@pytest.fixture(scope="module")
def session():
    groups = [group(0, 64, (64, 32))]
    return (groups[0], *deploy(groups))


def test_uploads_are_seeded_and_replies_come_at_the_last_level(session):
    g, client, server, keys = session
    request, _ = client.encrypt(g, rng.normal(size=(1, 64)))
    full_ciphertext = 2 * 8192 * 2 * 8  # two polynomials at the top level (q0 q1), uncompressed
    assert len(request) < 0.55 * full_ciphertext
    (reply,) = unframe(local_send(server, g, keys)(0, request))
    ct = seal.from_bytes(sealapi.Ciphertext, client.ctx, reply, "reply")
    assert ct.coeff_modulus_size() == 1


def test_inputs_at_the_wrong_scale_or_level_are_refused(session):
    g, client, server, keys = session
    plain = sealapi.Plaintext()
    client.encoder.encode([0.5] * 4096, client.ctx.first_parms_id(), 2.0**30, plain)
    wrong_scale = seal.to_bytes(client.encryptor.encrypt_symmetric(plain))
    with pytest.raises(PayloadError, match="scale"):
        server.parse(g, 0, frame([wrong_scale]))
    with pytest.raises(PayloadError, match="malformed"):
        server.parse(g, 0, frame([b"\x00" * 64]))


def test_parameters_outside_seal_security_bound_are_refused():
    with pytest.raises(ValueError, match="invalid CKKS parameters"):
        seal.context(seal.CKKSParameters(coeff_bits=(60, 60, 60, 60)))


def test_unknown_options_are_refused():
    g = group(0, 64, (64, 32))
    with pytest.raises(ckks.PLLError, match="unknown ckks options"):
        ckks.compile([g], weights([g]), {"sigmaa": 1.0})


class WithoutRerandomisation(ckks.Server):
    """Test-only control: replies carry the PLL error but no fresh encryption of zero."""

    def _rerandomise(self, out: sealapi.Ciphertext, session: ckks.Session) -> None:
        """Leaves the reply as the kernel and the error made it."""


@dataclass(frozen=True)
class Protection:
    options: dict[str, Any]  # compile options
    server_class: type[ckks.Server]
    flooded: bool  # replies carry the PLL error
    rerandomised: bool  # replies carry a fresh encryption of zero


PROTECTIONS = {"both": Protection({}, ckks.Server, True, True),
               "control: sigma 0": Protection({"sigma": 0.0}, ckks.Server, False, True),
               "control: no re-randomisation": Protection({}, WithoutRerandomisation, True, False)}


@dataclass(frozen=True)
class TwoReplies:
    """Two replies of one server to the same request, and the client that decrypts them."""

    protection: Protection
    client: ckks.Client
    server: ckks.Server
    first: bytes
    second: bytes


@pytest.fixture(scope="module", params=list(PROTECTIONS))
def two_replies(request: pytest.FixtureRequest) -> TwoReplies:
    protection = PROTECTIONS[request.param]
    g = group(0, 64, (64, 32))
    client, server, keys = deploy([g], protection.options, protection.server_class)
    payload, _ = client.encrypt(g, rng.normal(size=(1, 64)))
    send = local_send(server, g, keys)
    (first,), (second,) = unframe(send(0, payload)), unframe(send(0, payload))
    return TwoReplies(protection, client, server, first, second)


def error_spread(replies: TwoReplies) -> float:
    """sigma estimated from every slot of two decryptions of the same request, in error units
    (2^-precision_bits of the worst-case output: the slots hold the output normalised to the
    worst case, before the client multiplies by c * beta). The kernel is deterministic, so its
    own noise cancels in the difference, and e1 - e2 has a standard deviation of sqrt(2) sigma."""
    unit = 2.0**-replies.server.flood.precision_bits
    difference = replies.client._decrypt_slots(replies.first) - replies.client._decrypt_slots(replies.second)
    return float(np.std(difference / unit) / np.sqrt(2))


def mask_polynomial(client: ckks.Client, reply: bytes) -> np.ndarray:
    """c1 of a reply ciphertext, the part that multiplies the secret key. The error is a plaintext
    added to c0, so without re-randomisation two replies to one request share their c1."""
    ct = seal.from_bytes(sealapi.Ciphertext, client.ctx, reply, "reply ciphertext")
    size, data = ct.coeff_modulus_size() * ct.poly_modulus_degree(), ct.dyn_array()
    return np.array([data.at(i) for i in range(size, 2 * size)], dtype=np.uint64)


def test_the_pll_error_has_the_configured_spread(two_replies):
    ratio = error_spread(two_replies) / ckks.FloodParams().sigma
    if two_replies.protection.flooded:  # 4096 slots: one standard error of the estimate is about 1.1%
        assert 0.9 < ratio < 1.1
    else:  # only the two fresh encryptions of zero differ: about 1e-9 of the default sigma
        assert ratio < 0.01


def test_replies_are_rerandomised(two_replies):
    changed = np.mean(mask_polynomial(two_replies.client, two_replies.first)
                      != mask_polynomial(two_replies.client, two_replies.second))
    if two_replies.protection.rerandomised:  # a fresh c1 residue equals the other by chance in about 2^-60
        assert changed > 0.99
    else:
        assert changed == 0.0
