"""Backends behind the common interface: reference and plain agree with the float LoRA, and
malformed requests are rejected with a clear error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from privlora.backends import BACKENDS, backend
from privlora.backends.base import GroupSpec, PayloadError, pack
from privlora.compiler.ir import PLLSite
from privlora.errors import PrivloraError

SITES = (PLLSite(0, "q_proj", 32, 32, 4, 2.0), PLLSite(1, "v_proj", 32, 16, 4, 2.0))
GROUP = GroupSpec("round_0", 0, 0, 0, SITES)


def weights():
    rng = np.random.default_rng(0)
    return {site.site_id: (rng.normal(0, 0.1, (4, 32)).astype(np.float32),
                           rng.normal(0, 0.1, (site.d_out, 4)).astype(np.float32)) for site in SITES}


def exact_delta(x, w):
    return torch.cat([torch.from_numpy((x.numpy() @ w[s.site_id][0].T) @ w[s.site_id][1].T * s.scaling)
                      for s in SITES], dim=-1)


def roundtrip(name, x):
    module = backend(name)
    build = module.compile([GROUP], weights(), {})
    client, server = module.Client(build.client_params), module.Server(build.server_tensors, [GROUP], build.public_params)
    request, state = client.encrypt(GROUP, x)
    return client.decrypt(GROUP, server.evaluate(GROUP, request), state), server


@pytest.mark.parametrize(("name", "tolerance"), [("reference", 1e-6), ("plain", 0.03)])
def test_backends_compute_the_lora_delta(name, tolerance):
    x = torch.randn(2, 3, 32)
    delta, _ = roundtrip(name, x)
    expected = exact_delta(x.reshape(-1, 32), weights()).reshape(2, 3, 48)
    assert delta.shape == (2, 3, 48)
    assert (delta - expected).norm() / expected.norm() < tolerance


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_malformed_requests_are_rejected(name):
    _, server = roundtrip(name, torch.randn(1, 32))
    with pytest.raises(PayloadError, match="malformed"):
        server.evaluate(GROUP, b"\x93NUMPY garbage")
    with pytest.raises(PayloadError, match="columns"):
        server.evaluate(GROUP, pack(np.zeros((1, 31), dtype=np.float32 if name == "reference" else np.int64)))
    with pytest.raises(PayloadError, match="expected"):
        server.evaluate(GROUP, pack(np.zeros((1, 32), dtype=np.float16)))


def test_plain_server_refuses_inputs_outside_the_encoding():
    _, server = roundtrip("plain", torch.randn(1, 32))
    with pytest.raises(PayloadError, match="must lie in"):
        server.evaluate(GROUP, pack(np.full((1, 32), 10**6, dtype=np.int64)))


def test_unknown_backend():
    with pytest.raises(PrivloraError, match="unknown backend 'tfhe'"):
        backend("tfhe")
