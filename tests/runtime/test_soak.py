"""The soak harness with faults: clients answer for a while as the server is killed (-9) and
restarted and their connections are cut; no answer may be lost or differ from the plaintext
model (a short run here; docs/security.md records a longer one)."""

from __future__ import annotations

import subprocess
import sys

from live import plaintext_tokens

from privlora.runtime.generation import GenerationConfig

from privlora.loadtest import SoakConfig, random_prompts, run_soak, secure_reference


def test_no_answer_is_lost_or_wrong_under_restarts_and_dropped_connections(tiny_build, tmp_path):
    config = SoakConfig(clients=2, tokens=4, duration_s=14.0, fault_every_s=2.0, prompts=3, seed=0)
    artifact = tiny_build.artifact("bfv")

    def plaintext(prompt, generation):
        return plaintext_tokens(tiny_build.base, tiny_build.adapter, [prompt], generation)[0]

    # Precondition: without faults, these prompts' secure answers equal the plaintext ones (on a
    # tiny random model some prompts have near-tied logits that quantisation flips).
    uninterrupted = secure_reference(artifact)
    for prompt in random_prompts(artifact, config.prompts, config.prompt_length, config.seed):
        assert uninterrupted(prompt, GenerationConfig(max_new_tokens=4)) == plaintext(prompt, GenerationConfig(4))
    report = run_soak(artifact, config, plaintext, "plaintext", tmp_path)
    print(report.summary())
    assert report.faults["restart"] >= 1 and report.faults["drop"] >= 1  # both kinds happened (seed 0)
    assert len(report.completed) >= 4 and report.steps_redone >= 2 and report.sessions_reopened >= 1
    assert not report.lost and not report.differing
    assert report.server_peak_rss_bytes > 10**7 and report.rounds.latencies


def test_faults_need_a_server_of_their_own(tiny_build):
    run = subprocess.run([sys.executable, "-m", "privlora.cli", "loadtest", str(tiny_build.artifact("bfv")), "--faults",
                          "--server", "http://127.0.0.1:9"], capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.strip() == \
        "privlora: error: --faults needs a server it can kill and restart: leave out --server"
