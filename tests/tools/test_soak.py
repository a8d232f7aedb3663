"""The soak harness with faults, as a user runs it (`privlora loadtest --faults`, its own
process): clients answer for a while as the server is killed (-9) and restarted and their
connections are cut; no answer may be lost or differ from the plaintext model (a short run here;
docs/security.md records a longer one)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys

import pytest
from support.live import plaintext_tokens

from privlora.tools.loadtest import SoakConfig, random_prompts, secure_reference
from privlora.client.generation import GenerationConfig

TOKENS = 4


@pytest.mark.parametrize("backend", ["bfv", "pads"])
def test_no_answer_is_lost_or_wrong_under_restarts_and_dropped_connections(tiny_build, backend):
    """With pads, a restart also loses every pad: the clients make new ones on the spot."""
    artifact = tiny_build.artifact(backend)
    config = SoakConfig(clients=2, tokens=TOKENS, duration_s=14.0, fault_every_s=2.0, seed=0)
    generation = GenerationConfig(max_new_tokens=TOKENS)
    # Precondition: without faults, these prompts' secure answers equal the plaintext ones (on a
    # tiny random model some prompts have near-tied logits that quantisation flips).
    uninterrupted = secure_reference(artifact)
    for prompt in random_prompts(artifact, config.prompts, config.prompt_length, config.seed):
        assert uninterrupted(prompt, generation) == \
            plaintext_tokens(tiny_build.base, tiny_build.adapter, [prompt], generation)[0]
    run = subprocess.run([sys.executable, "-m", "privlora.cli", "loadtest", str(artifact), "--faults",
                          "--duration", str(config.duration_s), "--fault-every", str(config.fault_every_s),
                          "--clients", str(config.clients), "--tokens", str(TOKENS), "--seed", str(config.seed),
                          "--base", str(tiny_build.base), "--adapter", str(tiny_build.adapter)],
                         capture_output=True, text=True, timeout=300)
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    faults = re.search(r"faults (\{.*?\})", run.stdout)
    assert faults and all(ast.literal_eval(faults[1]).get(kind, 0) >= 1 for kind in ("restart", "drop"))  # seed 0
    answers = re.search(r"answers: (\d+) completed, (\d+) lost, (\d+) differing from plaintext; (\d+) steps redone",
                        run.stdout)
    assert answers and int(answers[1]) >= 4 and answers[2] == "0" and answers[3] == "0" and int(answers[4]) >= 1
    assert re.search(r"peak memory: server \d+ MB", run.stdout)


def test_faults_need_a_server_of_their_own(tiny_build):
    run = subprocess.run([sys.executable, "-m", "privlora.cli", "loadtest", str(tiny_build.artifact("bfv")), "--faults",
                          "--server", "http://127.0.0.1:9"], capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.strip() == \
        "privlora: error: --faults needs a server it can kill and restart: leave out --server"
