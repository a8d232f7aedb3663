"""Hostile inputs against the HTTP server: each gets a 4xx with a clear message, the server stays
up and other sessions are unaffected; query budgets, rate limits, expiry and eviction hold; no
log line or error message carries a payload, and the client's secret key is never sent."""

from __future__ import annotations

import logging
import time
from collections import Counter

import httpx
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import write_tiny_adapter, write_tiny_llama
from live import LiveServer
from privlora.backends import ckks
from privlora.backends.base import frame, pack, unframe
from privlora.compiler.driver import compile_artifact
from privlora.runtime.client import SecureClient
from privlora.runtime.generation import GenerationConfig, generate
from privlora.runtime.http import JsonLogFormatter
from privlora.runtime.server import PrivateServer, SessionError, SessionLimits
from privlora.runtime.transport import HttpTransport, InProcessTransport

FUZZ_COUNTS: Counter = Counter()  # status codes seen by the fuzzers, printed at the end


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    base = write_tiny_llama(root / "base")
    adapter = write_tiny_adapter(base, root / "adapter", ["q_proj", "v_proj"])
    return {name: compile_artifact(str(base), adapter, root / name, backend=name).artifact for name in ("ckks", "plain")}


@pytest.fixture(scope="module")
def live(artifacts):
    server = LiveServer(artifacts["ckks"])
    yield server
    server.stop()
    print(f"\nfuzzed requests by status: {dict(sorted(FUZZ_COUNTS.items()))}")


@pytest.fixture(scope="module")
def victim(artifacts, live):
    """A well-behaved client whose session must survive everything the other tests send."""
    client = SecureClient(artifacts["ckks"], HttpTransport(live.url), cache_keys=False)
    yield client
    client.close()


def first_request(client):
    group = next(iter(client.groups.values()))[0]
    request, state = client.crypto.encrypt(group, torch.randn(1, group.d_in))
    return group, request, state


def victim_still_works(victim):
    expected_length = 3
    assert len(list(generate(victim, [5, 6, 7], GenerationConfig(max_new_tokens=expected_length)))) == expected_length


def url_for(live, session, group):
    return f"{live.url}/v1/sessions/{session}/rounds/{group.round}/{group.index}"


@pytest.fixture(scope="module")
def probe(victim):
    """One valid request, fixed for the whole fuzzing run (hypothesis replays must see the same)."""
    group, request, _ = first_request(victim)
    return group, request


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzzed_ciphertexts_are_refused_or_answered(live, victim, probe, data):
    group, request = probe
    kind = data.draw(st.sampled_from(["truncate", "flip", "append", "random", "frame-of-garbage"]))
    if kind == "truncate":
        body = request[:data.draw(st.integers(0, len(request) - 1))]
    elif kind == "flip":
        position = data.draw(st.integers(0, len(request) - 1))
        body = request[:position] + bytes([request[position] ^ data.draw(st.integers(1, 255))]) + request[position + 1:]
    elif kind == "append":
        body = request + data.draw(st.binary(min_size=1, max_size=64))
    elif kind == "random":
        body = data.draw(st.binary(max_size=4096))
    else:
        body = frame([data.draw(st.binary(max_size=512)) for _ in range(data.draw(st.integers(1, 3)))])
    response = httpx.post(url_for(live, victim.session, group), content=body, timeout=60)
    FUZZ_COUNTS[f"ciphertext:{kind}:{response.status_code}"] += 1
    # a flipped bit inside the ciphertext's data can still be a valid ciphertext: answered (200)
    assert response.status_code in (200, 400), response.text
    if response.status_code == 400:
        assert response.json()["error"].startswith("malformed")


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=st.binary(max_size=2048))
def test_fuzzed_keys_are_refused(live, body):
    response = httpx.post(f"{live.url}/v1/sessions", content=body, timeout=60)
    FUZZ_COUNTS[f"keys:random:{response.status_code}"] += 1
    assert response.status_code == 400 and "malformed" in response.json()["error"]


def test_victim_survives_the_fuzzing(live, victim):
    victim_still_works(victim)
    assert httpx.get(f"{live.url}/v1/health").json()["status"] == "ok"


def test_truncated_and_foreign_keys(live, victim, artifacts):
    keys = victim.crypto.evaluation_keys()
    galois, public = unframe(keys)
    for body in (keys[: len(keys) // 2], frame([galois]), frame([public, galois]), frame([galois[:-100], public])):
        response = httpx.post(f"{live.url}/v1/sessions", content=body, timeout=60)
        FUZZ_COUNTS[f"keys:damaged:{response.status_code}"] += 1
        assert response.status_code == 400, response.text
    # keys made for other CKKS parameters (another ring dimension): refused by SEAL's checks
    other = ckks.Client({"ckks": {"poly_modulus_degree": 4096, "coeff_bits": [30, 25, 30], "scale_bits": 25,
                                  "a_scale_bits": 25}, "steps": [1, 2], "groups": {}})
    response = httpx.post(f"{live.url}/v1/sessions", content=other.evaluation_keys(), timeout=60)
    assert response.status_code == 400
    replayed = httpx.post(f"{live.url}/v1/sessions", content=keys, timeout=60)  # replaying keys: just a new session
    assert replayed.status_code == 200 and replayed.json()["session"] != victim.session


def test_unknown_sessions_rounds_and_groups(live, victim):
    group, request, _ = first_request(victim)
    cases = {
        url_for(live, "no-such-session", group): "unknown or expired session",
        f"{live.url}/v1/sessions/{victim.session}/rounds/round_99/0": "no private group",
        f"{live.url}/v1/sessions/{victim.session}/rounds/{group.round}/7": "no private group",
    }
    for url, message in cases.items():
        response = httpx.post(url, content=request, timeout=60)
        assert response.status_code == 404 and message in response.json()["error"]
    assert httpx.post(f"{live.url}/v1/sessions/{victim.session}/rounds/{group.round}/x", content=request).status_code == 422
    assert httpx.delete(f"{live.url}/v1/sessions/no-such-session").status_code == 404


def test_replayed_ciphertext_gets_fresh_randomness(live, victim):
    group, request, state = first_request(victim)
    first, second = (httpx.post(url_for(live, victim.session, group), content=request, timeout=60) for _ in range(2))
    assert first.status_code == second.status_code == 200 and first.content != second.content
    a, b = (victim.crypto.decrypt(group, r.content, state) for r in (first, second))
    assert torch.allclose(a, b, atol=1e-2 * a.abs().max().item() + 1e-6)


def test_wrong_shapes_and_dtypes(artifacts):
    server = PrivateServer(artifacts["plain"])
    session = server.open_session(b"")
    group = next(iter(server.groups.values()))
    for payload in (pack(np.zeros((2, group.d_in + 1), np.int64)), pack(np.zeros((2, group.d_in), np.float32)),
                    pack(np.zeros((group.d_in,), np.int64)), pack(np.zeros((1, group.d_in), np.int64))[:-3]):
        with pytest.raises(Exception, match="expected|malformed"):
            server.evaluate(session, group.round, group.index, payload)
    assert server.evaluate(session, group.round, group.index, pack(np.zeros((2, group.d_in), np.int64)))


def test_query_budget_and_rate_limit(artifacts):
    probe = PrivateServer(artifacts["ckks"])
    client = SecureClient(artifacts["ckks"], InProcessTransport(probe), cache_keys=False)
    group, request, _ = first_request(client)
    per_request = probe.backend.rows(group, request)  # a ciphertext counts as the rows it can hold
    assert per_request == 16
    server = PrivateServer(artifacts["ckks"], SessionLimits(max_rows=4 * per_request, rate=1000.0, burst=1000))
    client = SecureClient(artifacts["ckks"], InProcessTransport(server), cache_keys=False)
    for _ in range(4):
        server.evaluate(client.session, group.round, group.index, request)
    with pytest.raises(Exception, match="query budget exhausted"):
        server.evaluate(client.session, group.round, group.index, request)
    other = SecureClient(artifacts["ckks"], InProcessTransport(server), cache_keys=False)  # unaffected
    server.evaluate(other.session, group.round, group.index, request)

    limited = PrivateServer(artifacts["ckks"], SessionLimits(rate=1.0, burst=2))
    client = SecureClient(artifacts["ckks"], InProcessTransport(limited), cache_keys=False)
    limited.evaluate(client.session, group.round, group.index, request)
    limited.evaluate(client.session, group.round, group.index, request)
    with pytest.raises(Exception, match="too many requests"):
        limited.evaluate(client.session, group.round, group.index, request)
    time.sleep(1.1)
    limited.evaluate(client.session, group.round, group.index, request)


def test_http_status_for_budget_and_rate(artifacts):
    server = LiveServer(artifacts["ckks"], session_limits=SessionLimits(max_rows=16, rate=1000.0, burst=1000))
    try:
        client = SecureClient(artifacts["ckks"], HttpTransport(server.url), cache_keys=False)
        group, request, _ = first_request(client)
        assert httpx.post(url_for(server, client.session, group), content=request).status_code == 200
        over = httpx.post(url_for(server, client.session, group), content=request)
        assert over.status_code == 403 and "budget" in over.json()["error"]
    finally:
        server.stop()
    server = LiveServer(artifacts["ckks"], session_limits=SessionLimits(rate=0.5, burst=1))
    try:
        client = SecureClient(artifacts["ckks"], HttpTransport(server.url), cache_keys=False)
        group, request, _ = first_request(client)
        assert httpx.post(url_for(server, client.session, group), content=request).status_code == 200
        limited = httpx.post(url_for(server, client.session, group), content=request)
        assert limited.status_code == 429 and limited.headers["retry-after"] == "1"
    finally:
        server.stop()


def test_sessions_expire_and_are_evicted_least_recently_used_first(artifacts):
    server = PrivateServer(artifacts["ckks"], SessionLimits(max_sessions=2))
    clients = [SecureClient(artifacts["ckks"], InProcessTransport(server), cache_keys=False) for _ in range(2)]
    group, request, _ = first_request(clients[0])
    server.evaluate(clients[0].session, group.round, group.index, request)  # clients[1] is now the oldest
    third = SecureClient(artifacts["ckks"], InProcessTransport(server), cache_keys=False)
    with pytest.raises(SessionError):
        server.evaluate(clients[1].session, group.round, group.index, request)
    for client in (clients[0], third):
        server.evaluate(client.session, group.round, group.index, request)
    bounded = PrivateServer(artifacts["ckks"], SessionLimits(max_key_bytes=1))  # only the newest fits
    first = bounded.open_session(clients[0].crypto.evaluation_keys())
    bounded.open_session(clients[0].crypto.evaluation_keys())
    assert bounded.info()["sessions"] == 1
    with pytest.raises(SessionError):
        bounded.close_session(first)
    expiring = PrivateServer(artifacts["ckks"], SessionLimits(idle_seconds=0.05))
    session = expiring.open_session(clients[0].crypto.evaluation_keys())
    time.sleep(0.1)
    with pytest.raises(SessionError, match="unknown or expired"):
        expiring.evaluate(session, group.round, group.index, request)


def test_logs_and_errors_carry_no_payload_and_the_secret_key_is_never_sent(artifacts, caplog):
    server = PrivateServer(artifacts["ckks"])
    wire: list[bytes] = []

    class Recording(InProcessTransport):
        def open_session(self, keys):
            wire.append(keys)
            return super().open_session(keys)

        def evaluate(self, session, round_name, index, payload):
            reply = super().evaluate(session, round_name, index, payload)
            wire.extend([payload, reply])
            return reply

    with caplog.at_level(logging.DEBUG, logger="privlora"):
        client = SecureClient(artifacts["ckks"], Recording(server), cache_keys=False)
        list(generate(client, [9, 8, 7], GenerationConfig(max_new_tokens=3)))
        marker = b"SECRET-PROMPT-MARKER" * 8
        with pytest.raises(Exception) as refused:
            server.evaluate(client.session, "round_1", 0, marker)
        client.close()
    assert "MARKER" not in str(refused.value)
    formatter = JsonLogFormatter()
    lines = [formatter.format(record) for record in caplog.records]
    assert any('"event": "round"' in line for line in lines)
    assert all(len(line) < 400 and client.session not in line and "MARKER" not in line for line in lines)
    secret = client.crypto.secret_key()
    window = secret[len(secret) // 2: len(secret) // 2 + 256]
    assert wire and not any(window in payload for payload in wire)
