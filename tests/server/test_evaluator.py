"""``privlora serve`` evaluates in a process of its own, beside the one that holds the
connections (``server/evaluator.py``): the evaluation's CPU is spent there, not in the front
(control: a server in one process spends it all in the process that reads the requests); the
answers equal the plaintext model's; each process ends when the other does; and a load error
still reads as one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from support.live import LiveServer, plaintext_tokens
from privlora.backends.bfv import _HEADER
from privlora.backends.bfv_layout import message_layout
from privlora.backends.common import frame, unframe
from privlora.client.generation import GenerationConfig, generate
from privlora.client.secure import SecureClient
from privlora.client.transports import HttpTransport
from privlora.server.evaluator import CHANNELS
from privlora.tools.loadtest import ServerProcess, free_port, process_tree, rss_bytes

PROMPT = [5, 6, 7]
CONFIG = GenerationConfig(max_new_tokens=3)
HEAVY_ROWS = 2000
HEAVY_REQUESTS = 12
ROWS = 16384  # a refused message 1's declared rows (its body: several MB on the tiny model)


@pytest.fixture
def server(tiny_build):
    process = ServerProcess(tiny_build.artifact("bfv")).start()
    yield process
    process.stop()


def evaluation_process(server: ServerProcess) -> int:
    """The server's evaluation process: its one child but multiprocessing's resource tracker."""
    children = [pid for pid in process_tree(server.process.pid)[1:]
                if b"resource_tracker" not in open(f"/proc/{pid}/cmdline", "rb").read()]
    assert len(children) == 1, children
    return children[0]


def cpu_seconds(pid: int) -> float:
    """A process's user and system CPU time so far."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        if open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z":  # exited, not yet reaped
            return True
        time.sleep(0.1)
    return False


def heavy_messages(tiny_build, url: str) -> tuple[SecureClient, str, list[bytes]]:
    """A session and its heavy message 0s, made before anything is measured (the client's work)."""
    client = SecureClient(tiny_build.artifact("bfv"), HttpTransport(url), cache_keys=False)
    group = next(iter(client.groups.values()))[0]
    rng = np.random.default_rng(0)
    payloads = [client.crypto.encrypt(group, rng.normal(size=(HEAVY_ROWS, group.d_in)))[0]
                for _ in range(HEAVY_REQUESTS)]
    route = f"{url}/v1/sessions/{client.session}/rounds/{group.round}/{group.index}/0"
    return client, route, payloads


def post_all(route: str, payloads: list[bytes]) -> None:
    with httpx.Client(timeout=120) as http:
        for payload in payloads:
            assert http.post(route, content=payload).status_code == 200


def test_the_evaluation_runs_in_a_child_process_and_answers_exactly(tiny_build, server):
    assert b"spawn_main" in open(f"/proc/{evaluation_process(server)}/cmdline", "rb").read()
    client = SecureClient(tiny_build.artifact("bfv"), HttpTransport(server.url), cache_keys=False)
    tokens = list(generate(client, PROMPT, CONFIG))
    client.close()
    assert [tokens] == plaintext_tokens(tiny_build.base, tiny_build.adapter, [PROMPT], CONFIG)


def test_the_front_spends_little_of_the_evaluation_cpu(tiny_build, server):
    """Measured: the CPU the front and the evaluation process spend on heavy message 0s. Control:
    the same messages to a server in this process, which spends all of it here."""
    front, evaluation = server.process.pid, evaluation_process(server)
    client, route, payloads = heavy_messages(tiny_build, server.url)
    before = cpu_seconds(front), cpu_seconds(evaluation)
    post_all(route, payloads)
    front_cpu, evaluation_cpu = cpu_seconds(front) - before[0], cpu_seconds(evaluation) - before[1]
    client.close()
    print(f"\nsplit: front {front_cpu:.2f} s, evaluation process {evaluation_cpu:.2f} s of CPU")
    assert evaluation_cpu > 0.5 and front_cpu < 0.25 * evaluation_cpu

    one = LiveServer(tiny_build.artifact("bfv"))  # the control: one process reads and evaluates
    try:
        client, route, payloads = heavy_messages(tiny_build, one.url)
        start = time.process_time()
        post_all(route, payloads)
        here = time.process_time() - start
        client.close()
    finally:
        one.stop()
    print(f"one process: {here:.2f} s of CPU in the process holding the connections")
    assert here > 0.5 * evaluation_cpu


def test_a_killed_front_takes_the_evaluation_process_with_it(server):
    evaluation = evaluation_process(server)
    server.kill()
    assert wait_gone(evaluation, 30), "the evaluation process outlived its front"


def test_a_stop_ends_both_and_the_evaluation_process_ignores_sigterm(server):
    evaluation = evaluation_process(server)
    os.kill(evaluation, signal.SIGTERM)  # a process group's SIGTERM reaches it too: the front decides
    time.sleep(1)
    assert httpx.get(f"{server.url}/v1/health", timeout=30).json()["status"] == "ok"
    assert server.stop() == -signal.SIGTERM
    assert wait_gone(evaluation, 30)


def test_a_dead_evaluation_process_stops_the_server_with_its_reason(server):
    evaluation = evaluation_process(server)
    os.kill(evaluation, signal.SIGKILL)
    server.process.wait(timeout=60)
    assert "the evaluation process ended (killed by signal 9): stopping the server" in server.output()


def test_an_artifact_that_fails_to_load_is_one_line(tiny_build, tmp_path):
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(tiny_build.artifact("bfv")), str(broken)], check=True)
    (broken / "server" / "program.safetensors").write_bytes(b"damaged")  # found when the evaluation process loads it
    done = subprocess.run([sys.executable, "-m", "privlora.cli", "serve", str(broken), "--port", str(free_port())],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("privlora: error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "server/program.safetensors is corrupted or was replaced" in errors[0]


def test_refused_large_messages_leave_nothing_resident_in_the_evaluation_process(tiny_build, server):
    """Message 1s of an exchange that never began (409), large bodies reaching the evaluation
    process on each of its channels in turn, twice round: what stays resident is far less than a
    body per channel (a channel thread that held its last call, or the traceback of its refusal,
    kept one; so did glibc's per-thread heaps, the largest each had seen)."""
    client = SecureClient(tiny_build.artifact("bfv"), HttpTransport(server.url), cache_keys=False)
    group = next(iter(client.groups.values()))[0]
    template = unframe(client.crypto.encrypt(group, np.zeros((1, group.d_in)))[0])[1]
    count = message_layout(group, 1, ROWS, client.crypto.bfv.poly_modulus_degree).input_ciphertexts
    forged = frame([_HEADER.pack(ROWS, 99), *[template] * count])
    route = f"{server.url}/v1/sessions/{client.session}/rounds/{group.round}/{group.index}/1"
    evaluation = evaluation_process(server)
    with httpx.Client(timeout=120) as http:
        before = rss_bytes(evaluation)
        statuses = {http.post(route, content=forged).status_code for _ in range(2 * CHANNELS)}
    grown = rss_bytes(evaluation) - before
    client.close()
    print(f"\n{2 * CHANNELS} refused bodies of {len(forged) / 1e6:.1f} MB: evaluation process grew "
          f"{grown / 1e6:.1f} MB")
    assert statuses == {409}
    assert grown < CHANNELS * len(forged) / 3, grown
