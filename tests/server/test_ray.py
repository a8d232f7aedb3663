"""`privlora serve --ray`: a local Ray cluster serving an artifact with 2 replicas, concurrent
clients (over the stream and over plain HTTP, so that a group's two bfv messages land on
different replicas) with the plaintext model's tokens, per-site budgets exact across replicas,
and a generation that survives its replicas being killed."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest
from support.live import plaintext_tokens

from privlora.core.artifact import adapter_key
from privlora.tools.loadtest import ServerProcess
from privlora.server.accounts import AccountStore
from privlora.client.secure import SecureClient
from privlora.client.generation import GenerationConfig, generate
from privlora.client.transports import Credentials, HttpTransport, StreamTransport

PROMPTS = ([3, 14, 15, 92, 65], [27, 18, 28], [5, 9, 77, 101])
CONFIG = GenerationConfig(max_new_tokens=5)


def replicas(url: str, admin: str, probes: int = 40) -> set[str]:
    """The replicas that answered ``probes`` health requests (each names its host and pid to an admin)."""
    headers = {"authorization": f"Bearer {admin}"}
    return {httpx.get(f"{url}/v1/health", headers=headers, timeout=30).json()["artifacts"][0]["replica"]
            for _ in range(probes)}


@pytest.fixture(scope="module")
def cluster(tiny_build, tmp_path_factory):
    accounts = AccountStore(tmp_path_factory.mktemp("ray") / "accounts.db", create=True)
    server = ServerProcess(tiny_build.artifact("bfv"), "--ray", "--replicas", "2", "--accounts", str(accounts.path),
                           "--name", "clinic")
    server.start(ready=False)
    server.wait_ready(timeout=240)
    yield server, accounts, accounts.create("operator", admin=True)
    assert server.stop() in (0, -signal.SIGTERM), server.output()[-2000:]


def test_two_replicas_serve_concurrent_clients_exactly(cluster, tiny_build):
    server, accounts, admin = cluster
    expected = plaintext_tokens(tiny_build.base, tiny_build.adapter, list(PROMPTS), CONFIG)
    assert len(replicas(server.url, admin)) == 2
    tokens = [accounts.create(f"user-{i}") for i in range(len(PROMPTS))]
    results: dict[int, list[int]] = {}

    def one(i: int) -> None:
        kind = HttpTransport if i % 2 else StreamTransport  # over HTTP each message may go to either replica
        client = SecureClient(tiny_build.artifact("bfv"), kind(server.url, Credentials(tokens[i])), cache_keys=False)
        results[i] = list(generate(client, PROMPTS[i], CONFIG))
        client.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(PROMPTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert [results.get(i) for i in range(len(PROMPTS))] == expected
    adapter = adapter_key(tiny_build.artifact("bfv"))
    for i, prompt in enumerate(PROMPTS):  # every row counted once, whichever replica evaluated it
        assert set(accounts.site_rows(f"user-{i}", adapter).values()) == {len(prompt) + CONFIG.max_new_tokens - 1}


def test_every_replica_serves_the_artifact_under_its_name(cluster):
    server, _, admin = cluster
    headers = {"authorization": f"Bearer {admin}"}
    for _ in range(8):  # whichever replica answers
        health = httpx.get(f"{server.url}/v1/health", headers=headers, timeout=30).json()
        models = httpx.get(f"{server.url}/v1/models", headers=headers, timeout=30).json()["data"]
        assert [a["name"] for a in health["artifacts"]] == [m["id"] for m in models] == ["clinic"]


def test_a_generation_survives_its_replicas_being_killed(cluster, tiny_build):
    server, accounts, admin = cluster
    expected = plaintext_tokens(tiny_build.base, tiny_build.adapter, [PROMPTS[0]], CONFIG)[0]
    before = replicas(server.url, admin)
    pids = [int(replica.rpartition(":")[2]) for replica in before]
    sent = []

    class Killing(StreamTransport):
        def evaluate(self, session, round_name, index, message, payload):
            sent.append(1)
            if len(sent) == 10:  # in the first decode step: both replicas die, Ray starts new ones
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
            return super().evaluate(session, round_name, index, message, payload)

    transport = Killing(server.url, Credentials(accounts.create("victim")))
    client = SecureClient(tiny_build.artifact("bfv"), transport, cache_keys=False)
    start = time.monotonic()
    assert list(generate(client, PROMPTS[0], CONFIG)) == expected
    # The proxy keeps the stream open when its replica dies: the client hears no heartbeat, takes
    # the connection for dead and sends the message again, to a new replica that finds the
    # session's keys and the pending mask in the directory.
    assert transport.reconnects + client.recoveries >= 1 and time.monotonic() - start < 120
    client.close()
    after = replicas(server.url, admin)
    assert len(after) == 2 and not after & before  # two new replica processes


def test_a_backend_whose_sessions_live_in_one_process_is_refused_before_any_replica(tiny_build):
    """pads keeps each session's ledger in the process that opened it: replicas could not share it."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "privlora.cli", "serve", str(tiny_build.artifact("pads")), "--ray"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "keeps each session's state in the process that opened it" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1  # one line, no traceback
    from privlora.server.ray import check_replicable

    check_replicable(str(tiny_build.artifact("bfv")))  # the control: bfv's state is shared through the directory


def test_a_refusal_from_the_directory_is_raised_as_itself():
    """The directory returns refusals as data (Ray would wrap a raised one); a replica re-raises
    the same class, so that the client gets its status and code (404 unknown_session here)."""
    from privlora.core.wire import SessionError, refusal_of
    from privlora.server.ray import _refusal

    with pytest.raises(SessionError, match="gone") as raised:
        _refusal(("refused", "SessionError", "gone"))
    assert refusal_of(raised.value).code == "unknown_session"
    assert _refusal(b"keys") == b"keys"
