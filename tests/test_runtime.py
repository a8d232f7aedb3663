"""Secure generation end to end over a real uvicorn server on 127.0.0.1: secure greedy output
equals the plaintext fine-tuned model's, nothing on the wire is plaintext, two clients with
their own keys are served at once, and bad requests get a 4xx without hurting the server."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from conftest import write_tiny_adapter, write_tiny_llama
from live import LiveServer
from privlora.backends.base import PayloadError, unframe
from privlora.compiler.driver import compile_artifact
from privlora.models.loading import load_model
from privlora.runtime.client import SecureClient, key_path, render_timings
from privlora.runtime.generation import GenerationConfig, generate
from privlora.runtime.http import BodyLimits
from privlora.runtime.transport import HttpTransport, TransportError

PROMPTS = ([3, 14, 15, 92, 65], [27, 18, 28])
CONFIG = GenerationConfig(max_new_tokens=6)


class RecordingTransport(HttpTransport):
    """HTTP transport that keeps every body sent and received."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.wire: list[bytes] = []

    def open_session(self, evaluation_keys: bytes) -> str:
        self.wire.append(evaluation_keys)
        return super().open_session(evaluation_keys)

    def evaluate(self, session, round_name, index, payload):
        reply = super().evaluate(session, round_name, index, payload)
        self.wire += [payload, reply]
        return reply


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime")
    base = write_tiny_llama(root / "base")
    adapter = write_tiny_adapter(base, root / "adapter", ["q_proj", "v_proj"])
    built = {name: compile_artifact(str(base), adapter, root / name, backend=name).artifact for name in ("ckks", "concrete", "reference")}
    return base, adapter, built


@pytest.fixture(scope="module")
def live(artifacts):
    servers = {name: LiveServer(path) for name, path in artifacts[2].items()}
    yield servers
    for server in servers.values():
        server.stop()


def plaintext_tokens(artifacts, prompt):
    base, adapter, _ = artifacts
    return list(generate(load_model(base, adapter).model, prompt, CONFIG))


def recorded_client(artifacts, live, name):
    transport = RecordingTransport(live[name].url)
    client = SecureClient(artifacts[2][name], transport, cache_keys=False)
    activations = []
    encrypt = client.crypto.encrypt

    def recording_encrypt(group, x):
        activations.append(x.reshape(-1, group.d_in).numpy().astype(np.float32))
        return encrypt(group, x)

    client.crypto.encrypt = recording_encrypt
    return client, transport, activations


def test_secure_generation_over_http_equals_the_plaintext_model(artifacts, live):
    client, _, _ = recorded_client(artifacts, live, "ckks")
    try:
        for prompt in PROMPTS:
            client.steps.clear()
            assert list(generate(client, prompt, CONFIG)) == plaintext_tokens(artifacts, prompt)
            assert client.steps[0].rows == len(prompt) and all(s.rows == 1 for s in client.steps[1:])
            assert all(s.bytes_up > 0 and s.bytes_down > 0 and s.server_s > 0 for s in client.steps)
        assert "tokens/s" in render_timings(client.steps)
    finally:
        client.close()


def _plaintext_in(payload: bytes, activations: list[np.ndarray]) -> bool:
    """Does any part of the payload decode as a tensor close to an activation, or hold the raw
    float32/float64 bytes of one?"""
    parts = [payload]
    try:
        parts += unframe(payload)
    except PayloadError:
        pass
    for x in activations:
        for row in x[:, :8]:
            if row.any() and any(row.astype(dtype).tobytes() in payload for dtype in (np.float32, np.float64)):
                return True
    for part in parts:
        try:
            array = np.load(io.BytesIO(part), allow_pickle=False)
        except Exception:  # not a .npy payload: that is what a ciphertext looks like
            continue
        flat = np.asarray(array, dtype=np.float64).reshape(-1)
        for x in activations:
            rows = x.reshape(-1)
            if flat.size == rows.size and np.corrcoef(flat, rows)[0, 1] > 0.9:
                return True
    return False


def test_nothing_on_the_wire_is_plaintext(artifacts, live):
    for name, leaks in (("ckks", False), ("reference", True)):  # reference: the scan's positive control
        client, transport, activations = recorded_client(artifacts, live, name)
        try:
            list(generate(client, PROMPTS[0], GenerationConfig(max_new_tokens=2)))
        finally:
            client.close()
        assert activations and len(transport.wire) > 2
        assert any(_plaintext_in(payload, activations) for payload in transport.wire) == leaks, name


def test_concrete_over_http_agreement(artifacts, live):
    """TFHE with 8-bit inputs and 6-bit weights is an approximation of the float LoRA: report how
    many greedy tokens agree with the plaintext model."""
    client = SecureClient(artifacts[2]["concrete"], HttpTransport(live["concrete"].url), cache_keys=False)
    try:
        pairs = [(got, want) for prompt in PROMPTS
                 for got, want in zip(generate(client, prompt, CONFIG), plaintext_tokens(artifacts, prompt))]
    finally:
        client.close()
    agreement = sum(got == want for got, want in pairs) / len(pairs)
    print(f"concrete greedy tokens agreeing with the plaintext model: {agreement:.0%} of {len(pairs)}")
    assert len(pairs) == len(PROMPTS) * CONFIG.max_new_tokens and agreement >= 0.5


def test_two_clients_with_their_own_keys_at_once(artifacts, live):
    def run(prompt):
        client = SecureClient(artifacts[2]["ckks"], HttpTransport(live["ckks"].url), cache_keys=False)
        try:
            return list(generate(client, prompt, CONFIG))
        finally:
            client.close()

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run, PROMPTS))
    assert results == [plaintext_tokens(artifacts, p) for p in PROMPTS]


def test_bad_requests_get_4xx_and_the_server_stays_up(artifacts, live):
    url = live["ckks"].url + "/v1"
    client = SecureClient(artifacts[2]["ckks"], HttpTransport(live["ckks"].url), cache_keys=False)
    try:
        round_name = next(iter(client.groups))
        garbage = httpx.post(f"{url}/sessions/{client.session}/rounds/{round_name}/0", content=b"garbage")
        assert garbage.status_code == 400 and "malformed" in garbage.json()["error"]
        assert httpx.post(f"{url}/sessions/nope/rounds/{round_name}/0", content=b"x").status_code == 404
        assert httpx.post(f"{url}/sessions/{client.session}/rounds/round_99/0", content=b"x").status_code == 404
        assert httpx.post(f"{url}/sessions", content=b"not keys").status_code == 400
        assert "garbage" not in garbage.text and httpx.get(f"{url}/health").json()["status"] == "ok"
        assert list(generate(client, PROMPTS[1], CONFIG)) == plaintext_tokens(artifacts, PROMPTS[1])
    finally:
        client.close()
    with pytest.raises(TransportError, match="404"):
        client.close()  # already closed


def test_oversized_bodies_are_refused(artifacts):
    server = LiveServer(artifacts[2]["ckks"], BodyLimits(keys=1000, round=1000))
    try:
        response = httpx.post(f"{server.url}/v1/sessions", content=b"x" * 5000)
        assert response.status_code == 413 and response.json()["error"] == "request body too large"
    finally:
        server.stop()


def test_client_refuses_a_server_on_another_artifact(artifacts, live):
    with pytest.raises(Exception, match="another artifact"):
        SecureClient(artifacts[2]["ckks"], HttpTransport(live["reference"].url), cache_keys=False)


def test_keys_are_cached_privately_per_artifact(artifacts, monkeypatch, tmp_path):
    monkeypatch.setenv("PRIVLORA_CACHE_DIR", str(tmp_path))
    from privlora.runtime.client import open_local

    first = open_local(artifacts[2]["ckks"], cache_keys=True)
    path = key_path(first.artifact_id, "ckks")
    assert path.is_file() and (path.stat().st_mode & 0o777) == 0o600
    second = open_local(artifacts[2]["ckks"], cache_keys=True)
    assert second.crypto.secret_key() == first.crypto.secret_key()
    x = torch.randn(2, 64)
    group = next(iter(first.groups.values()))[0]
    request, state = first.crypto.encrypt(group, x[:, :group.d_in])
    reply = first.transport.evaluate(first.session, group.round, group.index, request)
    assert torch.allclose(second.crypto.decrypt(group, reply, state), first.crypto.decrypt(group, reply, state), atol=1e-3)
