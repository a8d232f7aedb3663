"""Secure generation with pads end to end on a tiny Llama: warm (pads made first) and cold (made
on the spot), over HTTP and in process, through a lost session, with only online rows charged,
and the same tokens as the plaintext fine-tuned model every time."""

from __future__ import annotations

import pytest

from support.live import LiveServer, plaintext_tokens

from privlora.client.generation import GenerationConfig, generate
from privlora.client.secure import COLD_AHEAD, SecureClient
from privlora.client.timings import timing_report
from privlora.client.transports import HttpTransport
from privlora.local import InProcessTransport, open_local
from privlora.server.accounts import AccountLimits, AccountStore
from privlora.server.private import PrivateServer
from privlora.server.sessions import SessionLimits

PROMPT = [3, 14, 15, 92, 65]
CONFIG = GenerationConfig(max_new_tokens=6)


@pytest.fixture(scope="module")
def build(tiny_build):
    return tiny_build, tiny_build.artifact("pads")


@pytest.fixture(scope="module")
def expected(build):
    tiny, _ = build
    return plaintext_tokens(tiny.base, tiny.adapter, [PROMPT], CONFIG)[0]


def test_warm_pads_over_http_equal_the_plaintext_model_with_no_offline_work_online(build, expected):
    server = LiveServer(build[1])
    client = SecureClient(build[1], HttpTransport(server.url), cache_keys=False)
    try:
        made = client.prepare(len(PROMPT) + CONFIG.max_new_tokens)
        assert made.rows == len(PROMPT) + CONFIG.max_new_tokens and made.seconds > 0
        assert list(generate(client, PROMPT, CONFIG)) == expected
        assert all(step.offline_s == 0 and step.messages == client.groups_per_step for step in client.steps)
        report = timing_report(client.steps, client.offline)
        assert report["online"]["messages_per_token"] == client.groups_per_step
        assert report["offline"]["rows"] == made.rows and report["offline"]["bytes_up"] > 0
    finally:
        client.close()
        server.stop()


def test_cold_pads_are_made_on_the_spot_and_said_so(build, expected):
    client = open_local(build[1])
    assert list(generate(client, PROMPT, CONFIG)) == expected
    prefill, decode = client.steps[0], client.steps[1:]
    assert prefill.offline_s > 0 and prefill.offline_rows == len(PROMPT) + COLD_AHEAD
    assert all(step.offline_s == 0 for step in decode)  # the batch ahead covers them
    assert prefill.total_s == pytest.approx(prefill.online_s + prefill.offline_s)


def test_a_lost_session_drops_its_pads_and_the_answer_is_unchanged(build, expected):
    server = PrivateServer(build[1], SessionLimits(max_rows=None, rate=None))
    client = SecureClient(build[1], InProcessTransport(server), cache_keys=False)
    client.prepare(3)
    tokens = []
    for token in generate(client, PROMPT, CONFIG):
        tokens.append(token)
        if len(tokens) == 2:  # the server loses the session (an eviction, a restart) mid-answer
            server.sessions.remove(client.session, None)
    assert tokens == expected
    assert client.sessions_opened == 2 and client.recoveries >= 1


def test_only_online_rows_are_charged_to_the_account(build, tmp_path):
    store = AccountStore(tmp_path / "accounts.db", create=True)
    token = store.create("alice", AccountLimits(max_rows=len(PROMPT) + 5))
    server = PrivateServer(build[1], SessionLimits(), store)
    client = SecureClient(build[1], InProcessTransport(server, token), cache_keys=False)
    client.prepare(200)  # far beyond the budget: pads are not charged
    answer = list(generate(client, PROMPT, CONFIG))
    rows = store.site_rows("alice", server.adapter_key)
    assert set(rows.values()) == {len(PROMPT) + len(answer) - 1}
