"""Hostile inputs against a bfv server over HTTP: both messages of a group, damaged every way the
ckks fuzzer damages a request, get the answer their damage calls for; a replayed or early message
1 is refused with 409; the server stays up and a victim's tokens still equal the plaintext
fine-tuned model's."""

from __future__ import annotations

from collections import Counter

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support.live import LiveServer, plaintext_tokens
from privlora.backends.common import frame, unframe
from privlora.client.secure import SecureClient
from privlora.client.generation import GenerationConfig, generate
from privlora.client.transports import HttpTransport

VICTIM_PROMPT = [5, 6, 7]
VICTIM_CONFIG = GenerationConfig(max_new_tokens=3)
COUNTS: Counter = Counter()
# The first 16 bytes are the frame's magic, part count and the row-count part's length; the next
# 4 the row count (a changed count asks for another number of ciphertexts). The 8 after them are
# the exchange id, the client's free choice: a flip there is another valid message 0.
FRAME_AND_ROWS = 20


@pytest.fixture(scope="module")
def live(tiny_build):
    server = LiveServer(tiny_build.artifact("bfv"))
    yield server
    server.stop()
    print(f"\nbfv fuzzed requests by status: {dict(sorted(COUNTS.items()))}")


@pytest.fixture(scope="module")
def victim(tiny_build, live):
    client = SecureClient(tiny_build.artifact("bfv"), HttpTransport(live.url), cache_keys=False)
    yield client
    client.close()


@pytest.fixture(scope="module")
def messages(victim, live):
    """A valid message 0 of the first group, and a valid message 1 made from its real reply."""
    group = next(iter(victim.groups.values()))[0]
    first, state = victim.crypto.encrypt(group, np.random.default_rng(0).normal(size=(2, group.d_in)))
    reply = httpx.post(url(live, victim, group, 0), content=first, timeout=60)
    second, _ = victim.crypto.advance(group, 0, reply.content, state)
    return group, first, second


def url(live, client, group, message: int) -> str:
    return f"{live.url}/v1/sessions/{client.session}/rounds/{group.round}/{group.index}/{message}"


def damaged(data: st.DataObject, body: bytes, kind: str) -> tuple[bytes, bool]:
    """``body`` damaged as ``kind`` says, and whether it may still parse (a flip inside a ciphertext)."""
    header, *blobs = unframe(body)
    if kind == "truncate":
        return body[:data.draw(st.integers(0, len(body) - 1))], False
    if kind == "append":
        return body + data.draw(st.binary(min_size=1, max_size=64)), False
    if kind == "truncate-part":
        index = data.draw(st.integers(0, len(blobs) - 1))
        blobs[index] = blobs[index][:data.draw(st.integers(0, len(blobs[index]) - 1))]
        return frame([header, *blobs]), False
    if kind == "random":
        return data.draw(st.binary(max_size=4096)), False
    if kind == "rows":
        return frame([data.draw(st.binary(min_size=4, max_size=4).filter(lambda b: b != header)), *blobs]), False
    position = data.draw(st.integers(0, len(body) - 1))
    flipped = body[:position] + bytes([body[position] ^ data.draw(st.integers(1, 255))]) + body[position + 1:]
    return flipped, position >= FRAME_AND_ROWS


@settings(max_examples=24, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_damaged_messages_are_refused_or_answered(live, victim, messages, data):
    group, first, _ = messages
    kind = data.draw(st.sampled_from(["truncate", "append", "truncate-part", "random", "rows", "flip"]))
    body, may_parse = damaged(data, first, kind)
    response = httpx.post(url(live, victim, group, 0), content=body, timeout=60)
    COUNTS[f"message 0:{kind}:{response.status_code}"] += 1
    if not (may_parse and response.status_code == 200):
        assert response.status_code == 400, (kind, response.status_code, response.text)
        assert response.json()["error"].startswith("malformed"), (kind, response.json())


def test_message_one_is_answered_once_and_only_after_message_zero(live, tiny_build, messages):
    group, first, second = messages
    fresh = SecureClient(tiny_build.artifact("bfv"), HttpTransport(live.url), cache_keys=False)  # a session of its own
    try:
        early = httpx.post(url(live, fresh, group, 1), content=second, timeout=60)
        assert early.status_code == 409 and "without a pending message 0" in early.json()["error"]
        assert httpx.post(url(live, fresh, group, 0), content=first, timeout=60).status_code == 200
        assert httpx.post(url(live, fresh, group, 1), content=second, timeout=60).status_code == 200
        replayed = httpx.post(url(live, fresh, group, 1), content=second, timeout=60)
        assert replayed.status_code == 409 and "replayed" in replayed.json()["error"]
        assert httpx.post(url(live, fresh, group, 2), content=second, timeout=60).status_code == 404
    finally:
        fresh.close()


def test_victim_survives(live, victim, tiny_build):
    expected = plaintext_tokens(tiny_build.base, tiny_build.adapter, [VICTIM_PROMPT], VICTIM_CONFIG)[0]
    assert list(generate(victim, VICTIM_PROMPT, VICTIM_CONFIG)) == expected
    assert httpx.get(f"{live.url}/v1/health", timeout=60).json()["status"] == "ok"
