"""``privlora loadtest``: K concurrent clients, each with its own keys and session, generate M
tokens over HTTP. Reports throughput, round-request latency percentiles, the server's memory,
and every request's fate: answered, or refused with a status (none may be lost). Each request's
session and send/answer times, and each client's prompt and tokens, are kept, so that a test can
check that sessions were really served at once and that every client got the right tokens.

``loadtest --faults`` (:func:`run_soak`) runs the clients for a bounded time while it kills and
restarts the server (``kill -9``) and cuts the clients' connections at random moments, and
counts every answer: completed, lost, or different from the reference."""

from __future__ import annotations

import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from privlora.core.artifact import CLIENT, load_bundle
from privlora.client.secure import SecureClient
from privlora.client.generation import GenerationConfig, generate
from privlora.client.transports import Credentials, HttpTransport, StreamTransport, TransportError


class _Timed:
    """A transport recording each message's latency and outcome, which a fault can cut."""

    def __init__(self, url: str, report: LoadReport, credentials: Credentials = Credentials()) -> None:
        super().__init__(url, credentials)  # type: ignore[call-arg]
        self.report = report

    def drop(self) -> None:
        """Cut this client's streams as a network fault would: no close handshake (an HTTP
        client's keep-alive connection is left alone; restarts cut those)."""
        for stream in list(getattr(self, "sockets", {}).values()):
            try:
                stream.socket.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def evaluate(self, session: str, round_name: str, index: int, message: int, payload: bytes) -> bytes:
        start = time.perf_counter()
        try:
            reply = super().evaluate(session, round_name, index, message, payload)  # type: ignore[misc]
        except TransportError as exc:
            self.report.record(RoundRequest(session, start, time.perf_counter(), exc.status or 0))
            raise
        self.report.record(RoundRequest(session, start, time.perf_counter(), 200))
        return reply


class TimedTransport(_Timed, StreamTransport):
    """The stream transport, timed."""


class TimedHttpTransport(_Timed, HttpTransport):
    """The HTTP transport, timed."""


@dataclass(frozen=True)
class RoundRequest:
    """One round request as its client saw it (times from ``time.perf_counter``)."""

    session: str
    start: float  # sent
    end: float  # answered or refused
    status: int


@dataclass
class LoadReport:
    clients: int
    tokens: int
    requests: list[RoundRequest] = field(default_factory=list)
    generated: list[tuple[list[int], list[int]]] = field(default_factory=list)  # (prompt, tokens) per finished client
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    server_rss_bytes: int | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, request: RoundRequest) -> None:
        with self.lock:
            self.requests.append(request)

    @property
    def statuses(self) -> Counter:
        return Counter(r.status for r in self.requests)

    @property
    def latencies(self) -> list[float]:
        """Seconds from sending to the answer, of the answered requests."""
        return [r.end - r.start for r in self.requests if r.status == 200]

    @property
    def completed(self) -> int:
        """Clients that generated all their tokens."""
        return sum(len(tokens) == self.tokens for _, tokens in self.generated)

    def percentile(self, q: float) -> float:
        latencies = self.latencies
        return float(np.percentile(latencies, q)) if latencies else float("nan")

    def round_line(self) -> str:
        statuses = ", ".join(f"{status or 'no reply'}: {count}" for status, count in sorted(self.statuses.items()))
        return (f"round requests: {sum(self.statuses.values())} ({statuses}); latency p50 "
                f"{1000 * self.percentile(50):.0f} ms, p95 {1000 * self.percentile(95):.0f} ms, "
                f"p99 {1000 * self.percentile(99):.0f} ms, mean {1000 * statistics.fmean(self.latencies or [0]):.0f} ms")

    def summary(self) -> str:
        generated = self.completed * self.tokens
        lines = [f"{self.clients} clients x {self.tokens} tokens in {self.seconds:.1f} s: "
                 f"{generated / self.seconds:.2f} tokens/s in all, {self.completed}/{self.clients} clients completed",
                 self.round_line()]
        if self.server_rss_bytes is not None:
            lines.append(f"server peak memory: {self.server_rss_bytes / 1e6:.0f} MB")
        lines += [f"failure: {f}" for f in self.failures]
        return "\n".join(lines)


def wait_for_server(url: str, timeout: float = 120.0, credentials: Credentials = Credentials(),
                    alive: Callable[[], None] | None = None) -> None:
    """Poll the health endpoint until the server answers; ``alive`` raises if it died meanwhile."""
    probe = HttpTransport(url, credentials, timeout=5)
    deadline = time.monotonic() + timeout
    try:
        while True:
            if alive is not None:
                alive()
            try:
                probe.info()
                return
            except TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        probe.client.close()  # an idle kept-alive connection would hold up a TLS server's shutdown


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerProcess:
    """``privlora serve`` in its own process (so that its memory is its own and it can be
    killed), on a fixed port so that a restart comes back at the same address."""

    def __init__(self, artifact: str | Path | Sequence[str | Path], *options: str, port: int | None = None,
                 scheme: str = "http") -> None:
        hosted = [artifact] if isinstance(artifact, (str, Path)) else list(artifact)
        self.command = [sys.executable, "-m", "privlora.cli", "serve", *map(str, hosted), "--log-level", "warning",
                        *options]
        self.port = port or free_port()
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.log = tempfile.TemporaryFile("w+")  # its stderr: a pipe nobody reads could fill and block it

    def start(self, ready: bool = True) -> ServerProcess:
        self.process = subprocess.Popen([*self.command, "--port", str(self.port)], stderr=self.log,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 120.0, credentials: Credentials = Credentials()) -> None:
        wait_for_server(self.url, timeout, credentials, alive=self._alive)

    def _alive(self) -> None:
        if self.process is None or self.process.poll() is not None:
            raise RuntimeError(f"the server exited: {self.output()}")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def kill(self) -> None:
        """``kill -9``: no shutdown, nothing flushed."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> int:
        """SIGTERM, then the exit status: uvicorn re-raises the signal once it has shut down
        gracefully, so a clean stop is -SIGTERM."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=90)


def random_prompts(artifact: str | Path, count: int, length: int, seed: int) -> list[list[int]]:
    vocab = load_bundle(artifact, CLIENT).manifest["model"]["vocab_size"]
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, length).tolist() for _ in range(count)]


def run_load(artifact: str | Path, url: str, clients: int, tokens: int, prompt_length: int = 8,
             seed: int = 0, credentials: Credentials = Credentials()) -> LoadReport:
    """K clients at once, each with its own keys, each generating ``tokens`` tokens greedily."""
    prompts = random_prompts(artifact, clients, prompt_length, seed)
    report = LoadReport(clients, tokens)
    config = GenerationConfig(max_new_tokens=tokens)

    def one(prompt: list[int]) -> None:
        try:
            client = SecureClient(artifact, TimedTransport(url, report, credentials), cache_keys=False)
            try:
                produced = list(generate(client, prompt, config))
            finally:
                client.close()
            with report.lock:
                report.generated.append((prompt, produced))
        except Exception as exc:  # reported, never lost: every failure is counted and shown
            with report.lock:
                report.failures.append(f"{type(exc).__name__}: {exc}")

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, prompts))
    report.seconds = time.perf_counter() - start
    report.server_rss_bytes = HttpTransport(url, credentials).info().get("peak_rss_bytes")
    return report


def _status_bytes(pid: int, field_name: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a server is its front and its evaluation process)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            pass
    return [pid, *(descendant for child in children for descendant in process_tree(child))]


def peak_rss_bytes(pid: int) -> int:
    """A live process tree's peak resident memory (Linux ``VmHWM``, summed), 0 when unreadable."""
    return sum(_status_bytes(member, "VmHWM:") for member in process_tree(pid))


def rss_bytes(pid: int) -> int:
    """A live process tree's resident memory now (Linux ``VmRSS``, summed), 0 when unreadable."""
    return sum(_status_bytes(member, "VmRSS:") for member in process_tree(pid))


FAULTS = ("restart", "drop")  # the soak's default faults
STRESS_FAULTS = ("restart", "term", "drop", "evict")  # every kind


@dataclass(frozen=True)
class SoakConfig:
    clients: int = 4
    tokens: int = 8  # per answer
    duration_s: float = 120.0  # no answer starts after this
    fault_every_s: float = 15.0  # mean time between faults (exponentially distributed)
    prompts: int = 8  # distinct prompts, each with its reference answer
    prompt_length: int = 8
    seed: int = 0
    # restart: kill -9 and restart; term: SIGTERM (graceful) and restart; drop: cut every client's
    # connections; evict: open a session for a client's account, whose quota of one evicts the
    # client's session mid-answer (then close it)
    faults: tuple[str, ...] = FAULTS
    transports: tuple[str, ...] = ("stream",)  # client i uses transports[i % len]
    keep_pads: int = 0  # pads clients make this many rows of pads between answers (racing others' answers)


@dataclass(frozen=True)
class Answer:
    client: int
    prompt: int
    seconds: float
    tokens: list[int] | None  # None: lost
    error: str | None = None


@dataclass
class SoakReport:
    config: SoakConfig
    reference: str  # what the answers were compared with
    answers: list[Answer] = field(default_factory=list)
    expected: list[list[int]] = field(default_factory=list)
    faults: Counter = field(default_factory=Counter)
    rounds: LoadReport | None = None
    steps_redone: int = 0
    sessions_reopened: int = 0
    seconds: float = 0.0
    server_peak_rss_bytes: int = 0
    client_peak_rss_bytes: int = 0
    server_rss: list[tuple[float, int, int]] = field(default_factory=list)  # (seconds, server start, bytes)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def rss_growth_bytes(self) -> int:
        """How much the longest-lived server process grew from the second quarter of its life to
        the last (medians; the first quarter is warm-up): flat memory is near zero."""
        lives: dict[int, list[int]] = {}
        for _, start, size in self.server_rss:
            lives.setdefault(start, []).append(size)
        samples = max(lives.values(), key=len, default=[])
        if len(samples) < 8:
            return 0
        quarter = len(samples) // 4
        return int(statistics.median(samples[-quarter:]) - statistics.median(samples[quarter:2 * quarter]))

    @property
    def completed(self) -> list[Answer]:
        return [a for a in self.answers if a.tokens is not None]

    @property
    def lost(self) -> list[Answer]:
        return [a for a in self.answers if a.tokens is None]

    @property
    def differing(self) -> list[Answer]:
        return [a for a in self.completed if a.tokens != self.expected[a.prompt]]

    def percentile(self, q: float) -> float:
        seconds = [a.seconds for a in self.completed]
        return float(np.percentile(seconds, q)) if seconds else float("nan")

    def summary(self) -> str:
        c = self.config
        lines = [f"soak: {c.clients} clients x {c.tokens}-token answers for {self.seconds:.0f} s, faults "
                 f"{dict(self.faults) or 'none'} (mean every {c.fault_every_s:g} s)",
                 f"answers: {len(self.completed)} completed, {len(self.lost)} lost, {len(self.differing)} differing "
                 f"from {self.reference}; {self.steps_redone} steps redone, {self.sessions_reopened} sessions re-opened",
                 f"answer latency p50 {self.percentile(50):.2f} s, p95 {self.percentile(95):.2f} s, "
                 f"max {self.percentile(100):.2f} s",
                 f"peak memory: server {self.server_peak_rss_bytes / 1e6:.0f} MB, "
                 f"load generator {self.client_peak_rss_bytes / 1e6:.0f} MB; server growth over its longest life "
                 f"{self.rss_growth_bytes() / 1e6:+.0f} MB"]
        if self.rounds is not None:
            lines.append(self.rounds.round_line())
        lines += [f"lost: client {a.client}: {a.error}" for a in self.lost]
        return "\n".join(lines)


def connect(artifact: str | Path, transport: TimedTransport, deadline_s: float = 120.0) -> SecureClient:
    """A client, once the server answers (it may be restarting)."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return SecureClient(artifact, transport, cache_keys=False)
        except TransportError as exc:
            if not exc.recoverable or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def secure_reference(artifact: str | Path) -> Callable[[list[int], GenerationConfig], list[int]]:
    """Answers of an uninterrupted secure run with an in-process server (when no plaintext model is given)."""
    from privlora.local import open_local

    client = open_local(artifact)
    return lambda prompt, config: list(generate(client, prompt, config))


def run_soak(artifact: str | Path | Sequence[str | Path], config: SoakConfig,
             reference: Callable[[list[int], GenerationConfig], list[int]], reference_name: str,
             work_dir: str | Path) -> SoakReport:
    """The clients answer prompts for ``config.duration_s`` against a server this harness owns,
    with accounts, while it injects ``config.faults`` at random moments. Every answer is counted:
    completed (and compared with the reference) or lost. With several artifacts (builds of one
    adapter), client i uses artifact i mod their number, all on one server."""
    from privlora.client.assistant import PadKeeper
    from privlora.server.accounts import AccountLimits, AccountStore

    hosted = [artifact] if isinstance(artifact, (str, Path)) else list(artifact)
    generation = GenerationConfig(max_new_tokens=config.tokens)
    prompts = random_prompts(hosted[0], config.prompts, config.prompt_length, config.seed)
    report = SoakReport(config, reference_name, expected=[reference(p, generation) for p in prompts],
                        rounds=LoadReport(config.clients, config.tokens))
    store = AccountStore(Path(work_dir) / "accounts.db", create=True)
    quota = 1 if "evict" in config.faults else AccountLimits().max_sessions
    tokens = [store.create(f"soak-{i}", AccountLimits(max_rows=None, rate=None, max_sessions=quota))
              for i in range(config.clients)]
    server = ServerProcess(hosted, "--accounts", str(store.path)).start()
    starts = [0]  # server processes started so far (a memory sample names the one it measured)
    transports: list[TimedTransport] = []
    clients: dict[int, SecureClient] = {}
    end = time.monotonic() + config.duration_s
    rng = np.random.default_rng(config.seed)

    def client_loop(index: int) -> None:
        kind = config.transports[index % len(config.transports)]
        transport = (TimedTransport if kind == "stream" else TimedHttpTransport)(server.url, report.rounds,
                                                                                  Credentials(tokens[index]))
        with report.lock:
            transports.append(transport)
        order = np.random.default_rng(config.seed + 1 + index)
        client, keeper = None, None
        while time.monotonic() < end:
            prompt = int(order.integers(len(prompts)))
            start = time.perf_counter()
            try:
                if client is None:
                    client = connect(hosted[index % len(hosted)], transport)
                    keeper = PadKeeper(client, config.keep_pads)
                    with report.lock:
                        clients[index] = client
                keeper.pause()  # pads made between answers, never during one
                produced = list(generate(client, prompts[prompt], generation))
                keeper.start()
                answer = Answer(index, prompt, time.perf_counter() - start, produced)
            except Exception as exc:  # counted as lost, never hidden
                answer = Answer(index, prompt, time.perf_counter() - start, None, f"{type(exc).__name__}: {exc}")
            with report.lock:
                report.answers.append(answer)
        if client is not None:
            keeper.pause()
            with report.lock:
                report.steps_redone += client.recoveries
                report.sessions_reopened += client.sessions_opened - 1
            client.close()

    def restart(graceful: bool) -> None:
        report.server_peak_rss_bytes = max(report.server_peak_rss_bytes, peak_rss_bytes(server.process.pid))
        if graceful:
            server.stop()
        else:
            server.kill()
        server.start(ready=False)
        starts[0] += 1

    def evict() -> None:
        with report.lock:
            victims = list(clients.items())
        if not victims:
            return
        index, client = victims[int(rng.integers(len(victims)))]
        intruder = HttpTransport(server.url, Credentials(tokens[index]))
        try:  # the account's quota is one session: this one evicts the client's
            intruder.close_session(intruder.open_session(client.evaluation_keys, client.artifact_id))
        except TransportError:
            pass  # the server is restarting: no eviction this time
        finally:
            intruder.client.close()

    def faults() -> None:
        while True:
            pause = float(rng.exponential(config.fault_every_s))
            if time.monotonic() + pause >= end:
                return
            time.sleep(pause)
            kind = config.faults[int(rng.integers(len(config.faults)))]
            if kind in ("restart", "term"):
                restart(graceful=kind == "term")
            elif kind == "drop":
                with report.lock:
                    for transport in transports:
                        transport.drop()
            else:
                evict()
            report.faults[kind] += 1

    def sample_memory() -> None:
        while time.monotonic() < end:
            report.server_rss.append((time.monotonic(), starts[0], rss_bytes(server.process.pid)))
            time.sleep(0.5)

    started = time.perf_counter()
    try:
        with ThreadPoolExecutor(config.clients + 2) as pool:
            futures = [pool.submit(client_loop, i) for i in range(config.clients)]
            futures += [pool.submit(faults), pool.submit(sample_memory)]
            for future in futures:
                future.result()
        report.seconds = time.perf_counter() - started
        report.server_peak_rss_bytes = max(report.server_peak_rss_bytes, peak_rss_bytes(server.process.pid))
        server.wait_ready(timeout=30)  # still alive at the end: a server that died is a crash, not a fault
    finally:
        server.stop()
    report.client_peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return report
