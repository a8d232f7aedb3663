"""Hostile inputs against the HTTP server: each kind gets the answer it calls for (a 4xx with a
clear message, or for a bit flip that still parses, a well-formed reply), the server stays up and
other sessions are unaffected: the victim's tokens still equal the plaintext fine-tuned model's.
Query budgets, rate limits, expiry and eviction hold; no log line or error message carries a
payload, and the client's secret key is never sent."""

from __future__ import annotations

import logging
import time
from collections import Counter

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support.live import LiveServer, plaintext_tokens
from privlora.backends import ckks
from privlora.backends.common import frame, pack, unframe
from privlora.client.secure import SecureClient
from privlora.client.generation import GenerationConfig, generate
from privlora.server.logs import JsonLogFormatter
from privlora.core.wire import SessionError
from privlora.server.private import PrivateServer
from privlora.server.sessions import SessionLimits
from privlora.client.transports import HttpTransport
from privlora.local import InProcessTransport

FUZZ_COUNTS: Counter = Counter()  # status codes seen by the fuzzers, printed at the end
VICTIM_PROMPT = [5, 6, 7]
VICTIM_CONFIG = GenerationConfig(max_new_tokens=3)


@pytest.fixture(scope="module")
def artifacts(tiny_build):
    return {name: tiny_build.artifact(name) for name in ("ckks", "plain")}


@pytest.fixture(scope="module")
def live(artifacts):
    server = LiveServer(artifacts["ckks"])
    yield server
    server.stop()
    print(f"\nfuzzed requests by status: {dict(sorted(FUZZ_COUNTS.items()))}")


@pytest.fixture(scope="module")
def expected(tiny_build):
    """The plaintext fine-tuned model's tokens for the victim's prompt (the base model's differ)."""
    return plaintext_tokens(tiny_build.base, tiny_build.adapter, [VICTIM_PROMPT], VICTIM_CONFIG)[0]


@pytest.fixture(scope="module")
def victim(artifacts, live):
    """A well-behaved client whose session must survive everything the other tests send."""
    client = SecureClient(artifacts["ckks"], HttpTransport(live.url), cache_keys=False)
    yield client
    client.close()


def first_request(client):
    group = next(iter(client.groups.values()))[0]
    request, state = client.crypto.encrypt(group, np.random.default_rng().normal(size=(1, group.d_in)))
    return group, request, state


def url_for(live, session, group):
    return f"{live.url}/v1/sessions/{session}/rounds/{group.round}/{group.index}/0"


@pytest.fixture(scope="module")
def probe(victim):
    """One valid request and the state that decrypts its reply, fixed for the whole fuzzing run
    (hypothesis replays must see the same)."""
    return first_request(victim)


@pytest.fixture(scope="module")
def victim_keys(victim):
    """The rotation-key and public-key blobs of one real key upload, to damage inside the frame."""
    return unframe(victim.crypto.evaluation_keys(), 2)


FRAME_HEADER = 16  # magic, part count and the first part's length: a change there breaks the frame
# What each kind of damage must be refused with (400). A bit flip past the frame header may also be
# answered: SEAL checks a ciphertext's structure and value ranges, and has no checksum.
REFUSAL = {"truncate": "malformed payload", "append": "malformed payload: trailing bytes",
           "truncate-part": "malformed input ciphertext", "random": "malformed",
           "garbage-frames": "malformed input ciphertext", "flip": "malformed"}
KEY_PARTS = ("rotation keys", "public key")  # the two blobs of a ckks key upload, as the errors name them


def flipped(data: st.DataObject, blob: bytes) -> tuple[bytes, int]:
    """``blob`` with one byte XORed by a non-zero mask, and that byte's position."""
    position = data.draw(st.integers(0, len(blob) - 1))
    return blob[:position] + bytes([blob[position] ^ data.draw(st.integers(1, 255))]) + blob[position + 1:], position


def damaged(data: st.DataObject, request: bytes, kind: str) -> tuple[bytes, bool]:
    """``request`` damaged as ``kind`` says, and whether the result may still parse (a flip inside
    the ciphertext). Truncations and additions either break the frame or, inside it, the ciphertext
    SEAL reads."""
    (blob,) = unframe(request)
    if kind == "truncate":
        return request[:data.draw(st.integers(0, len(request) - 1))], False
    if kind == "append":
        return request + data.draw(st.binary(min_size=1, max_size=64)), False
    if kind == "truncate-part":
        return frame([blob[:data.draw(st.integers(0, len(blob) - 1))]]), False
    if kind == "random":
        return data.draw(st.binary(max_size=4096)), False
    if kind == "garbage-frames":
        return frame([data.draw(st.binary(max_size=512)) for _ in range(data.draw(st.integers(1, 3)))]), False
    body, position = flipped(data, request)
    return body, position >= FRAME_HEADER


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzzed_ciphertexts_get_the_answer_their_damage_calls_for(live, victim, probe, data):
    group, request, state = probe
    kind = data.draw(st.sampled_from(sorted(REFUSAL)))
    body, may_parse = damaged(data, request, kind)
    response = httpx.post(url_for(live, victim.session, group), content=body, timeout=60)
    FUZZ_COUNTS[f"ciphertext:{kind}:{response.status_code}"] += 1
    if may_parse and response.status_code == 200:  # still a ciphertext: a well-formed reply, garbage to the sender only
        delta = victim.crypto.decrypt(group, response.content, state)
        assert delta.shape == (1, group.d_out) and np.isfinite(delta).all()
    else:
        assert response.status_code == 400, (kind, response.status_code)
        assert response.json()["error"].startswith(REFUSAL[kind]), (kind, response.json())


@settings(max_examples=16, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzzed_keys_inside_a_valid_frame_get_their_answer(live, probe, victim_keys, data):
    """One key blob damaged inside a well-formed frame, so that SEAL's own parsers read it. A
    truncated blob is refused, naming the blob. A flipped byte may still load (SEAL keys carry no
    checksum): the session it opens has wrong keys, which hurt only their sender, and its requests
    are still answered."""
    part = data.draw(st.sampled_from(range(len(KEY_PARTS))))
    kind = data.draw(st.sampled_from(["flip", "truncate"]))
    blobs = list(victim_keys)
    if kind == "flip":
        blobs[part], _ = flipped(data, blobs[part])
    else:
        blobs[part] = blobs[part][:data.draw(st.integers(0, len(blobs[part]) - 1))]
    response = httpx.post(f"{live.url}/v1/sessions", content=frame(blobs), timeout=60)
    FUZZ_COUNTS[f"keys:{KEY_PARTS[part]}:{kind}:{response.status_code}"] += 1
    if kind == "flip" and response.status_code == 200:
        group, request, _ = probe
        session = response.json()["session"]
        assert httpx.post(url_for(live, session, group), content=request, timeout=60).status_code == 200
        assert httpx.delete(f"{live.url}/v1/sessions/{session}").status_code == 200
    else:
        assert response.status_code == 400, (kind, response.status_code)
        assert response.json()["error"].startswith(f"malformed {KEY_PARTS[part]}:"), (kind, response.json())


def test_bytes_appended_inside_a_frame_part_are_refused(live, victim, probe, victim_keys):
    group, request, _ = probe
    (blob,) = unframe(request)
    galois, public = victim_keys
    rounds, sessions = url_for(live, victim.session, group), f"{live.url}/v1/sessions"
    for url, body, refusal in ((rounds, frame([blob + b"\0"]), "malformed input ciphertext"),
                               (sessions, frame([galois + b"\0", public]), "malformed rotation keys"),
                               (sessions, frame([galois, public + b"\0"]), "malformed public key")):
        response = httpx.post(url, content=body, timeout=60)
        assert response.status_code == 400, (refusal, response.status_code)
        assert response.json()["error"].startswith(refusal), response.json()


def test_truncated_and_foreign_keys(live, victim, victim_keys):
    galois, public = victim_keys
    keys = frame([galois, public])
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
        f"{live.url}/v1/sessions/{victim.session}/rounds/round_99/0/0": "no private group",
        f"{live.url}/v1/sessions/{victim.session}/rounds/{group.round}/7/0": "no private group",
        f"{live.url}/v1/sessions/{victim.session}/rounds/{group.round}/{group.index}/1": "no message 1",
    }
    for url, message in cases.items():
        response = httpx.post(url, content=request, timeout=60)
        assert response.status_code == 404 and message in response.json()["error"]
    assert httpx.post(f"{live.url}/v1/sessions/{victim.session}/rounds/{group.round}/x/0", content=request).status_code == 422
    assert httpx.delete(f"{live.url}/v1/sessions/no-such-session").status_code == 404


class ReplayingTransport(HttpTransport):
    """Sends every round request twice, as an attacker replaying the traffic would, and hands the
    client the second answer; counts the answers that came back byte for byte the same."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.replays = 0
        self.identical = 0

    def evaluate(self, session: str, round_name: str, index: int, message: int, payload: bytes) -> bytes:
        first = super().evaluate(session, round_name, index, message, payload)
        second = super().evaluate(session, round_name, index, message, payload)
        self.replays += 1
        self.identical += first == second
        return second


def test_replayed_ciphertexts_are_answered_afresh_and_correctly(artifacts, live, expected):
    """A replay is answered again with fresh PLL error and a fresh mask (never the same bytes), and
    the replayed answer is right: generating from it gives the plaintext model's tokens."""
    transport = ReplayingTransport(live.url)
    client = SecureClient(artifacts["ckks"], transport, cache_keys=False)
    try:
        assert list(generate(client, VICTIM_PROMPT, VICTIM_CONFIG)) == expected
    finally:
        client.close()
    groups = sum(len(groups) for groups in client.groups.values())
    assert transport.replays == VICTIM_CONFIG.max_new_tokens * groups and transport.identical == 0


def test_the_victim_is_unaffected_by_all_of_the_above(live, victim, expected):
    assert httpx.get(f"{live.url}/v1/health").json()["status"] == "ok"
    assert list(generate(victim, VICTIM_PROMPT, VICTIM_CONFIG)) == expected


def test_wrong_shapes_and_dtypes(artifacts):
    server = PrivateServer(artifacts["plain"])
    session = server.open_session(b"")
    group = next(iter(server.groups.values()))
    for payload in (pack(np.zeros((2, group.d_in + 1), np.int64)), pack(np.zeros((2, group.d_in), np.float32)),
                    pack(np.zeros((group.d_in,), np.int64)), pack(np.zeros((1, group.d_in), np.int64))[:-3]):
        with pytest.raises(Exception, match="expected|malformed"):
            server.evaluate(session, group.round, group.index, 0, payload)
    assert server.evaluate(session, group.round, group.index, 0, pack(np.zeros((2, group.d_in), np.int64)))


def test_query_budget_and_rate_limit(artifacts, expected):
    probe = PrivateServer(artifacts["ckks"])
    client = SecureClient(artifacts["ckks"], InProcessTransport(probe), cache_keys=False)
    group, request, _ = first_request(client)
    per_request = probe.backend.parse(group, 0, request).rows  # a ciphertext counts as the rows it can hold
    assert per_request == 16
    # the victim's generation: one ciphertext per group and step (its prompt fits one ciphertext)
    requests = VICTIM_CONFIG.max_new_tokens * sum(len(groups) for groups in client.groups.values())
    server = PrivateServer(artifacts["ckks"], SessionLimits(max_rows=requests * per_request, rate=1000.0, burst=1000))
    client = SecureClient(artifacts["ckks"], InProcessTransport(server), cache_keys=False)
    for _ in range(requests):
        server.evaluate(client.session, group.round, group.index, 0, request)
    with pytest.raises(Exception, match="query budget exhausted"):
        server.evaluate(client.session, group.round, group.index, 0, request)
    other = SecureClient(artifacts["ckks"], InProcessTransport(server), cache_keys=False)  # unaffected: its whole
    assert list(generate(other, VICTIM_PROMPT, VICTIM_CONFIG)) == expected  # budget buys exactly this generation
    with pytest.raises(Exception, match="query budget exhausted"):
        server.evaluate(other.session, group.round, group.index, 0, request)

    limited = PrivateServer(artifacts["ckks"], SessionLimits(rate=1.0, burst=2))
    client = SecureClient(artifacts["ckks"], InProcessTransport(limited), cache_keys=False)
    limited.evaluate(client.session, group.round, group.index, 0, request)
    limited.evaluate(client.session, group.round, group.index, 0, request)
    with pytest.raises(Exception, match="too many requests"):
        limited.evaluate(client.session, group.round, group.index, 0, request)
    time.sleep(1.1)
    limited.evaluate(client.session, group.round, group.index, 0, request)


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
    server.evaluate(clients[0].session, group.round, group.index, 0, request)  # clients[1] is now the oldest
    third = SecureClient(artifacts["ckks"], InProcessTransport(server), cache_keys=False)
    with pytest.raises(SessionError):
        server.evaluate(clients[1].session, group.round, group.index, 0, request)
    for client in (clients[0], third):
        server.evaluate(client.session, group.round, group.index, 0, request)
    bounded = PrivateServer(artifacts["ckks"], SessionLimits(max_key_bytes=1))  # only the newest fits
    first = bounded.open_session(clients[0].crypto.evaluation_keys())
    bounded.open_session(clients[0].crypto.evaluation_keys())
    assert bounded.describe()["sessions"] == 1
    with pytest.raises(SessionError):
        bounded.close_session(first)
    expiring = PrivateServer(artifacts["ckks"], SessionLimits(idle_seconds=0.05))
    session = expiring.open_session(clients[0].crypto.evaluation_keys())
    time.sleep(0.1)
    with pytest.raises(SessionError, match="unknown or expired"):
        expiring.evaluate(session, group.round, group.index, 0, request)


def test_logs_and_errors_carry_no_payload_and_the_secret_key_is_never_sent(artifacts, caplog):
    server = PrivateServer(artifacts["ckks"])
    wire: list[bytes] = []

    class Recording(InProcessTransport):
        def open_session(self, keys, artifact=None):
            wire.append(keys)
            return super().open_session(keys, artifact)

        def evaluate(self, session, round_name, index, message, payload):
            reply = super().evaluate(session, round_name, index, message, payload)
            wire.extend([payload, reply])
            return reply

    with caplog.at_level(logging.DEBUG, logger="privlora"):
        client = SecureClient(artifacts["ckks"], Recording(server), cache_keys=False)
        list(generate(client, [9, 8, 7], GenerationConfig(max_new_tokens=3)))
        marker = b"SECRET-PROMPT-MARKER" * 8
        with pytest.raises(Exception) as refused:
            server.evaluate(client.session, "round_1", 0, 0, marker)
        client.close()
    assert "MARKER" not in str(refused.value)
    formatter = JsonLogFormatter()
    lines = [formatter.format(record) for record in caplog.records]
    assert any('"event": "round"' in line for line in lines)
    assert all(len(line) < 400 and client.session not in line and "MARKER" not in line for line in lines)
    secret = client.crypto.secret_key()
    window = secret[len(secret) // 2: len(secret) // 2 + 256]
    assert wire and not any(window in payload for payload in wire)
