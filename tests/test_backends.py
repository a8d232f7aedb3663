"""The backend conformance suite: every backend behind the common interface computes the LoRA
delta within its documented tolerance, draws fresh randomness per call, serves every layer with
one key set, and rejects malformed payloads with a clear error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from privlora.backends import BACKENDS, backend
from privlora.backends.base import GroupSpec, PayloadError, frame, pack, unframe
from privlora.compiler.ir import PLLSite
from privlora.errors import PrivloraError

SITES = (PLLSite(0, "q_proj", 32, 32, 4, 2.0), PLLSite(1, "v_proj", 32, 16, 4, 2.0))
GROUP = GroupSpec("round_0", 0, 0, 0, SITES)
OTHER = GroupSpec("round_1", 0, 0, 0, (PLLSite(2, "o_proj", 48, 24, 4, 2.0),))  # another shape, same keys
# Relative L2 error against the float LoRA, for a single random row (the worst case: no averaging over
# rows). Measured over 300 rows: plain (8-bit x and weights) median 0.008, max 0.023; concrete (8-bit x,
# 6-bit weights) median 0.026, 99th percentile 0.067, max 0.084; ckks about 1e-4.
TOLERANCE = {"reference": 1e-6, "plain": 0.05, "ckks": 1e-3, "concrete": 0.12}
RANDOMISED = {"plain", "ckks", "concrete"}  # backends whose replies carry fresh PLL error


def weights(groups=(GROUP, OTHER)):
    rng = np.random.default_rng(0)
    return {site.site_id: (rng.normal(0, 0.1, (site.rank, site.d_in)).astype(np.float32),
                           rng.normal(0, 0.1, (site.d_out, site.rank)).astype(np.float32))
            for group in groups for site in group.sites}


def exact_delta(group, x, w):
    flat = x.reshape(-1, group.d_in).double().numpy()
    delta = np.concatenate([(flat @ w[s.site_id][0].T) @ w[s.site_id][1].T * s.scaling for s in group.sites], -1)
    return torch.from_numpy(delta).reshape(*x.shape[:-1], group.d_out)


def relative_error(actual, expected):
    return ((actual.double() - expected).norm() / expected.norm()).item()


@pytest.fixture(scope="module", params=sorted(BACKENDS))
def pair(request):
    """(name, module, client, server, session) for one backend, compiled for both groups."""
    module = backend(request.param)
    build = module.compile([GROUP, OTHER], weights(), {})
    client = module.Client(build.client_params)
    server = module.Server(build.server_tensors, [GROUP, OTHER], build.public_params)
    return request.param, module, build, client, server, server.open_session(client.evaluation_keys())


def roundtrip(pair, group, x):
    _, _, _, client, server, session = pair
    request, state = client.encrypt(group, x)
    return client.decrypt(group, server.evaluate(group, request, session), state)


@pytest.mark.parametrize("group", [GROUP, OTHER], ids=["fused-q-v", "other-shape"])
def test_computes_the_lora_delta(pair, group):
    x = torch.randn(2, 3, group.d_in)
    delta = roundtrip(pair, group, x)
    assert delta.shape == (2, 3, group.d_out) and delta.dtype == torch.float32
    assert relative_error(delta, exact_delta(group, x, weights())) < TOLERANCE[pair[0]]


def test_zero_and_extreme_inputs(pair):
    zero = roundtrip(pair, GROUP, torch.zeros(1, 32))
    assert zero.abs().max() < 1e-6
    x = torch.randn(2, 32) * 1e4
    x[0, 3] = -3e5  # one outlier channel, as real activations have
    assert relative_error(roundtrip(pair, GROUP, x), exact_delta(GROUP, x, weights())) < TOLERANCE[pair[0]]


def test_no_rows(pair):
    assert roundtrip(pair, GROUP, torch.zeros(0, 32)).shape == (0, 48)


def test_fresh_randomness_per_call(pair):
    name, _, _, client, server, session = pair
    request, _ = client.encrypt(GROUP, torch.randn(1, 32))
    first, second = (server.evaluate(GROUP, request, session) for _ in range(2))
    assert (first != second) == (name in RANDOMISED)


def test_secret_key_reloads(pair):
    name, module, build, client, server, session = pair
    x = torch.randn(1, 32)
    request, state = client.encrypt(GROUP, x)
    reply = server.evaluate(GROUP, request, session)
    again = module.Client(build.client_params, secret_key=client.secret_key())
    assert relative_error(again.decrypt(GROUP, reply, state), exact_delta(GROUP, x, weights())) < TOLERANCE[name]


def test_malformed_payloads_are_rejected(pair):
    _, _, _, client, server, session = pair
    for payload in (b"", b"\x93NUMPY garbage", frame([b"garbage"]), pack(np.zeros((1, 31), dtype=np.float32))):
        with pytest.raises(PayloadError):
            server.evaluate(GROUP, payload, session)
    request, _ = client.encrypt(GROUP, torch.randn(1, 32))
    with pytest.raises(PayloadError):
        server.evaluate(GROUP, request[:-7], session)


def test_wrong_keys_do_not_decrypt(pair):
    name, module, build, client, server, session = pair
    if name not in {"ckks", "concrete"}:
        pytest.skip("no keys")
    stranger = module.Client(build.client_params)
    x = torch.randn(1, 32)
    request, state = client.encrypt(GROUP, x)
    garbage = stranger.decrypt(GROUP, server.evaluate(GROUP, request, session), state)
    assert relative_error(garbage, exact_delta(GROUP, x, weights())) > 0.5
    with pytest.raises(PayloadError):
        server.open_session(b"not keys")


def test_plain_server_refuses_inputs_outside_the_encoding():
    module = backend("plain")
    build = module.compile([GROUP], weights((GROUP,)), {})
    server = module.Server(build.server_tensors, [GROUP], build.public_params)
    with pytest.raises(PayloadError, match="must lie in"):
        server.evaluate(GROUP, pack(np.full((1, 32), 10**6, dtype=np.int64)), None)


def test_frames_reject_damage():
    payload = frame([b"abc", b"", b"defg"])
    assert unframe(payload, 3) == [b"abc", b"", b"defg"]
    for damaged in (payload[:-1], payload + b"x", b"XXXX" + payload[4:]):
        with pytest.raises(PayloadError):
            unframe(damaged)
    with pytest.raises(PayloadError, match="expected 2 parts"):
        unframe(payload, 2)


def test_unknown_backend():
    with pytest.raises(PrivloraError, match="unknown backend 'tfhe'"):
        backend("tfhe")
