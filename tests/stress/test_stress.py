"""The stress suite: clients of two builds of one adapter (bfv and pads), over the stream and over
HTTP, each its own account, answer random prompts while the server is killed (-9), stopped
(SIGTERM) and restarted, connections are cut, and sessions are evicted mid-answer; pads clients
make pads between answers, racing the others' online requests. Every answer must be completed
and equal the plaintext fine-tuned model's; the server must be alive at the end, and its memory
flat over a run without restarts.

It runs in this process (the clients are threads), as the old in-process soak did when a native
crash killed the test process about one run in two (tests/backends/test_signals.py has the
cause). ``make test`` runs each test for PRIVLORA_STRESS_SECONDS (default 20); ``make stress``
for half an hour each."""

from __future__ import annotations

import os

import pytest
from support.live import plaintext_tokens

from privlora.client.generation import GenerationConfig
from privlora.tools.loadtest import STRESS_FAULTS, SoakConfig, random_prompts, run_soak, secure_reference

SECONDS = float(os.environ.get("PRIVLORA_STRESS_SECONDS", "20"))
TOKENS = 3
pytestmark = pytest.mark.stress


@pytest.fixture(scope="module")
def builds(tiny_build):
    return [tiny_build.artifact("bfv"), tiny_build.artifact("pads")]


@pytest.fixture(scope="module")
def plaintext(tiny_build, builds):
    generation = GenerationConfig(max_new_tokens=TOKENS)

    def answer(prompt, config):
        return plaintext_tokens(tiny_build.base, tiny_build.adapter, [prompt], config)[0]

    # Precondition: uninterrupted, both builds answer these prompts as the plaintext model does.
    for artifact in builds:
        uninterrupted = secure_reference(artifact)
        for prompt in random_prompts(artifact, SoakConfig().prompts, SoakConfig().prompt_length, 0):
            assert uninterrupted(prompt, generation) == answer(prompt, generation)
    return answer


def test_every_answer_survives_every_fault(builds, plaintext, tmp_path):
    config = SoakConfig(clients=4, tokens=TOKENS, duration_s=SECONDS, fault_every_s=max(1.5, SECONDS / 12), seed=0,
                        faults=STRESS_FAULTS, transports=("stream", "http"), keep_pads=32)
    report = run_soak(builds, config, plaintext, "plaintext", tmp_path)
    print(report.summary())
    assert not report.lost and not report.differing, report.summary()
    assert len(report.completed) >= config.clients and sum(report.faults.values()) >= 4
    assert len(report.faults) >= 3  # at least three kinds of fault happened in this run


def test_server_memory_stays_flat_under_load_without_restarts(builds, plaintext, tmp_path):
    config = SoakConfig(clients=4, tokens=TOKENS, duration_s=SECONDS, fault_every_s=max(1.5, SECONDS / 12), seed=0,
                        faults=("drop", "evict"), transports=("stream", "http"), keep_pads=32)
    report = run_soak(builds, config, plaintext, "plaintext", tmp_path)
    print(report.summary())
    assert not report.lost and not report.differing, report.summary()
    assert report.rss_growth_bytes() < 48 * 1024**2, report.summary()
