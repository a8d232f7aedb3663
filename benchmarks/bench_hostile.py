"""A noisy neighbour and the attacks of issue 23 against ``privlora serve --accounts`` on loopback,
SmolLM2 + the demo adapter (bfv). Prints the victim's prefill and decode time alone and under the
heaviest legal load one account can generate, and the server's memory after each attack.

The victim (its own account) answers the demo's first question (16 tokens) over the stream. The
attacker is another account without a budget (an operator may create one), in its own process so
that its client work shares the cores as a real one would: 4 sessions; 8 threads sending
1000-row message 0s without pause; 2 threads sending 8192-row message 0s; 50 idle streams; 4 slow
readers that send a request and never read the reply. Then, one at a time, with the server's
resident memory after each: message 1s declaring 65 536 rows for exchanges that never began;
message 0s declaring 65 536 rows with no ciphertexts; accepted 2000-row message 0s to every group
(the encoded-weight cache); strangers' 200 MiB uploads without a token; 250 idle connections
(and whether health still answers).

    python benchmarks/bench_hostile.py ARTIFACT    # a bfv artifact of SmolLM2 + the demo adapter
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import threading
import time
import multiprocessing
from pathlib import Path

import httpx
import numpy as np

from privlora.backends.bfv import _HEADER
from privlora.backends.bfv_layout import message_layout
from privlora.backends.common import frame, unframe
from privlora.client.assistant import Assistant
from privlora.client.generation import GenerationConfig, generate
from privlora.client.secure import SecureClient
from privlora.client.transports import Credentials, HttpTransport, StreamTransport
from privlora.server.accounts import AccountLimits, AccountStore
from privlora.tools.loadtest import ServerProcess, rss_bytes
from privlora.tools.machine import report_machine
from privlora.tools.qa import load_qa



def round_url(url: str, session: str, group, message: int) -> str:
    return f"{url}/v1/sessions/{session}/rounds/{group.round}/{group.index}/{message}"


def message_zero(client: SecureClient, group, rows: int) -> bytes:
    payload, _ = client.crypto.encrypt(group, np.random.default_rng(rows).normal(size=(rows, group.d_in)))
    return payload


def victim_run(artifact: str, url: str, token: str, prompt: list[int], tokens: int) -> tuple[float, float]:
    """Prefill seconds and decode seconds per token of one answer."""
    client = SecureClient(artifact, StreamTransport(url, Credentials(token)), cache_keys=False)
    list(generate(client, prompt, GenerationConfig(max_new_tokens=tokens)))
    prefill = client.steps[0].total_s
    decode = sum(step.total_s for step in client.steps[1:]) / max(len(client.steps) - 1, 1)
    client.close()
    return prefill, decode


def attacker(artifact: str, url: str, token: str, stop_after: float) -> None:
    """The heaviest legal load one account can make, for ``stop_after`` seconds."""
    end = time.monotonic() + stop_after
    auth = {"authorization": f"Bearer {token}"}
    sessions = [SecureClient(artifact, HttpTransport(url, Credentials(token)), cache_keys=False) for _ in range(4)]
    group = next(iter(sessions[0].groups.values()))[0]
    small, large = message_zero(sessions[0], group, 1000), message_zero(sessions[0], group, 8192)

    def flood(payload: bytes, session: str) -> None:
        with httpx.Client(timeout=600, headers=auth) as http:
            while time.monotonic() < end:
                try:
                    http.post(round_url(url, session, group, 0), content=payload)
                except httpx.HTTPError:
                    time.sleep(0.1)

    def slow_reader(payload: bytes, session: str) -> None:
        path = round_url("", session, group, 0)
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as sock:
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                         f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
            time.sleep(max(end - time.monotonic(), 0))  # never reads the reply

    def idle_streams() -> None:
        from websockets.sync.client import connect

        opened = []
        for i in range(50):
            try:
                opened.append(connect(f"{url.replace('http', 'ws')}/v1/sessions/{sessions[i % 4].session}/stream",
                                      additional_headers=auth, open_timeout=30))
            except Exception:
                pass
        time.sleep(max(end - time.monotonic(), 0))
        for stream in opened:
            stream.close()

    threads = [threading.Thread(target=flood, args=(small, sessions[i % 4].session)) for i in range(8)]
    threads += [threading.Thread(target=flood, args=(large, sessions[i].session)) for i in range(2)]
    threads += [threading.Thread(target=slow_reader, args=(small, sessions[i].session)) for i in range(4)]
    threads.append(threading.Thread(target=idle_streams))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def wait_until_idle(url: str, admin: str) -> None:
    """Until the attacker's requests still in progress (its process is gone) are answered."""
    while httpx.get(f"{url}/v1/health", headers={"authorization": f"Bearer {admin}"},
                    timeout=60).json()["requests_in_progress"]:
        time.sleep(1)


def refused_attacks(artifact: str, server: ServerProcess, token: str) -> list[tuple[str, str]]:
    """The attacks that must cost nothing, one at a time; the server's RSS after each."""
    url, auth = server.url, {"authorization": f"Bearer {token}"}
    client = SecureClient(artifact, HttpTransport(url, Credentials(token)), cache_keys=False)
    groups = [g for gs in client.groups.values() for g in gs]
    group = groups[0]
    template = unframe(message_zero(client, group, 1))[1]
    results = [("after the noisy-neighbour run", f"{rss_bytes(server.process.pid) / 1e6:.0f} MB")]

    def rss(label: str) -> None:
        results.append((label, f"{rss_bytes(server.process.pid) / 1e6:.0f} MB"))
        print(f"  {label}: {results[-1][1]}", flush=True)

    count = message_layout(group, 1, 65536, client.crypto.bfv.poly_modulus_degree).input_ciphertexts
    forged = frame([_HEADER.pack(65536, 99), *[template] * count])  # a message 1 of an exchange that never began
    statuses = [httpx.post(round_url(url, client.session, group, 1), content=forged, headers=auth, timeout=120).status_code
                for _ in range(20)]
    rss(f"20 message 1s of 65 536 rows without a message 0 ({len(forged) / 1e6:.0f} MB each; status {set(statuses)})")
    bare = frame([_HEADER.pack(65536, 1), b"x"])
    start = time.perf_counter()
    statuses = [httpx.post(round_url(url, client.session, group, 0), content=bare, headers=auth).status_code
                for _ in range(200)]
    rss(f"200 message 0s declaring 65 536 rows, no ciphertexts (status {set(statuses)}, "
        f"{1000 * (time.perf_counter() - start) / 200:.1f} ms each, round trip)")
    for g in groups:
        httpx.post(round_url(url, client.session, g, 0), content=message_zero(client, g, 2000), headers=auth, timeout=600)
    rss(f"a 2000-row message 0 to each of the {len(groups)} groups (encoded-weight cache)")
    for _ in range(4):
        try:
            httpx.post(f"{url}/v1/sessions", content=(bytes(1 << 20) for _ in range(200)), timeout=120)
        except httpx.HTTPError:
            pass
    rss("4 strangers' 200 MiB uploads without a token")
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(250)]
    start = time.perf_counter()
    health = httpx.get(f"{url}/v1/health", timeout=30).status_code
    rss(f"250 idle connections (health {health} in {time.perf_counter() - start:.2f} s)")
    for sock in idle:
        sock.close()
    client.close()
    return results


def main() -> None:
    report_machine()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact")
    parser.add_argument("--tokens", type=int, default=16, help="the victim's answer length")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        store = AccountStore(Path(work) / "accounts.db", create=True)
        victim = store.create("victim")
        attacker_token = store.create("attacker", AccountLimits(max_rows=None, rate=None))
        prober = store.create("prober", AccountLimits(max_rows=None, rate=None))
        operator = store.create("operator", admin=True)
        server = ServerProcess(args.artifact, "--accounts", str(store.path)).start()
        try:
            prompt = Assistant(args.artifact).encode(load_qa(split="heldout")[0].question)
            alone = victim_run(args.artifact, server.url, victim, prompt, args.tokens)
            print(f"victim alone: prefill {alone[0]:.2f} s, decode {alone[1]:.2f} s/token", flush=True)
            load = multiprocessing.get_context("spawn").Process(target=attacker, args=(args.artifact, server.url, attacker_token, 600.0), daemon=True)
            load.start()
            time.sleep(45)  # the attacker's sessions, payloads and load under way
            under = victim_run(args.artifact, server.url, victim, prompt, args.tokens)
            load.terminate()
            wait_until_idle(server.url, operator)
            print(f"victim under attack: prefill {under[0]:.2f} s ({under[0] / alone[0]:.1f}x), "
                  f"decode {under[1]:.2f} s/token ({under[1] / alone[1]:.1f}x); server RSS "
                  f"{rss_bytes(server.process.pid) / 1e6:.0f} MB", flush=True)
            print("server memory after each attack:")
            refused_attacks(args.artifact, server, prober)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
