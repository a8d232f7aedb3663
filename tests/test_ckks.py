"""What is specific to the ckks kernel: the minimal rotation key set, one key set whatever the
number of layers, seeded uploads, replies at the last level, and strict input checks."""

from __future__ import annotations

import numpy as np
import pytest
import tenseal.sealapi as seal
import torch

from privlora.backends import ckks
from privlora.backends import seal as sealx
from privlora.backends.base import GroupSpec, PayloadError, frame, unframe
from privlora.compiler.ir import PLLSite


def group(index: int, d_in: int, outputs: tuple[int, ...], rank: int = 8) -> GroupSpec:
    sites = tuple(PLLSite(10 * index + k, f"layers.{index}.proj{k}", d_in, d_out, rank, 2.0) for k, d_out in enumerate(outputs))
    return GroupSpec(f"round_{index}", 0, 0, 0, sites)


def weights(groups):
    rng = np.random.default_rng(1)
    return {s.site_id: (rng.normal(0, 0.1, (s.rank, s.d_in)), rng.normal(0, 0.1, (s.d_out, s.rank)))
            for g in groups for s in g.sites}


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
    build = ckks.compile([g], weights([g]), {})
    client = ckks.Client(build.client_params)
    server = ckks.Server(build.server_tensors, [g], build.public_params)
    keys = server.open_session(client.evaluation_keys())
    lay = ckks.layout(g, 4096)
    assert lay.rows_per_ciphertext == 16  # block of 256 slots: 96 outputs + 15 + 63 read past them
    x = torch.randn(20, 64)
    request, state = client.encrypt(g, x)
    assert len(unframe(request)) == 2
    delta = client.decrypt(g, server.evaluate(g, request, keys), state)
    expected = torch.cat([torch.from_numpy((x.double().numpy() @ a.T) @ b.T * 2.0)
                          for a, b in (weights([g])[s.site_id] for s in g.sites)], -1)
    assert ((delta.double() - expected).norm() / expected.norm()) < 1e-3


def test_one_key_set_whatever_the_number_of_layers():
    one = [group(0, 64, (64, 32))]
    many = [group(i, 64, (64, 32)) for i in range(6)]
    builds = [ckks.compile(groups, weights(groups), {}) for groups in (one, many)]
    assert builds[0].public_params["steps"] == builds[1].public_params["steps"]
    sizes = [len(ckks.Client(b.client_params).evaluation_keys()) for b in builds]
    assert abs(sizes[0] - sizes[1]) < 0.01 * sizes[0]


@pytest.fixture(scope="module")
def session():
    groups = [group(0, 64, (64, 32))]
    build = ckks.compile(groups, weights(groups), {})
    client = ckks.Client(build.client_params)
    server = ckks.Server(build.server_tensors, groups, build.public_params)
    return groups[0], client, server, server.open_session(client.evaluation_keys())


def test_uploads_are_seeded_and_replies_come_at_the_last_level(session):
    g, client, server, keys = session
    request, _ = client.encrypt(g, torch.randn(1, 64))
    full_ciphertext = 2 * 8192 * 2 * 8  # two polynomials at the top level (q0 q1), uncompressed
    assert len(request) < 0.55 * full_ciphertext
    (reply,) = unframe(server.evaluate(g, request, keys))
    ct = sealx.from_bytes(seal.Ciphertext, client.ctx, reply, "reply")
    assert ct.coeff_modulus_size() == 1


def test_inputs_at_the_wrong_scale_or_level_are_refused(session):
    g, client, server, keys = session
    plain = seal.Plaintext()
    client.encoder.encode([0.5] * 4096, client.ctx.first_parms_id(), 2.0**30, plain)
    wrong_scale = sealx.to_bytes(client.encryptor.encrypt_symmetric(plain))
    with pytest.raises(PayloadError, match="scale"):
        server.evaluate(g, frame([wrong_scale]), keys)
    with pytest.raises(PayloadError, match="malformed"):
        server.evaluate(g, frame([b"\x00" * 64]), keys)


def test_parameters_outside_seal_security_bound_are_refused():
    with pytest.raises(ValueError, match="invalid CKKS parameters"):
        sealx.context(sealx.CKKSParameters(coeff_bits=(60, 60, 60, 60)))


def test_unknown_options_are_refused():
    g = group(0, 64, (64, 32))
    with pytest.raises(ckks.PLLError, match="unknown ckks options"):
        ckks.compile([g], weights([g]), {"sigmaa": 1.0})
