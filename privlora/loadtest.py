"""``privlora loadtest``: K concurrent clients, each with its own keys and session, generate M
tokens over HTTP. Reports throughput, round-request latency percentiles, the server's memory,
and every request's fate: answered, or refused with a status (none may be lost). Each request's
session and send/answer times, and each client's prompt and tokens, are kept, so that a test can
check that sessions were really served at once and that every client got the right tokens."""

from __future__ import annotations

import statistics
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from privlora.core.artifact import CLIENT, load_bundle
from privlora.runtime.client import SecureClient
from privlora.runtime.generation import GenerationConfig, generate
from privlora.runtime.transport import HttpTransport, StreamTransport, TransportError


class TimedTransport(StreamTransport):
    """The stream transport, recording each message's latency and outcome."""

    def __init__(self, url: str, report: LoadReport) -> None:
        super().__init__(url)
        self.report = report

    def evaluate(self, session: str, round_name: str, index: int, message: int, payload: bytes) -> bytes:
        start = time.perf_counter()
        try:
            reply = super().evaluate(session, round_name, index, message, payload)
        except TransportError as exc:
            self.report.record(RoundRequest(session, start, time.perf_counter(), exc.status or 0))
            raise
        self.report.record(RoundRequest(session, start, time.perf_counter(), 200))
        return reply


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

    def summary(self) -> str:
        generated = self.completed * self.tokens
        lines = [f"{self.clients} clients x {self.tokens} tokens in {self.seconds:.1f} s: "
                 f"{generated / self.seconds:.2f} tokens/s in all, {self.completed}/{self.clients} clients completed",
                 f"round requests: {sum(self.statuses.values())} "
                 f"({', '.join(f'{k}: {v}' for k, v in sorted(self.statuses.items()))}); latency p50 "
                 f"{1000 * self.percentile(50):.0f} ms, p95 {1000 * self.percentile(95):.0f} ms, "
                 f"p99 {1000 * self.percentile(99):.0f} ms, mean {1000 * statistics.fmean(self.latencies or [0]):.0f} ms"]
        if self.server_rss_bytes is not None:
            lines.append(f"server peak memory: {self.server_rss_bytes / 1e6:.0f} MB")
        lines += [f"failure: {f}" for f in self.failures]
        return "\n".join(lines)


def wait_for_server(url: str, timeout: float = 120.0) -> None:
    """Poll the health endpoint until the server answers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            HttpTransport(url, timeout=5).info()
            return
        except TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def run_load(artifact: str | Path, url: str, clients: int, tokens: int, prompt_length: int = 8,
             seed: int = 0) -> LoadReport:
    """K clients at once, each with its own keys, each generating ``tokens`` tokens greedily."""
    vocab = load_bundle(artifact, CLIENT).manifest["model"]["vocab_size"]
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, vocab, prompt_length).tolist() for _ in range(clients)]
    report = LoadReport(clients, tokens)
    config = GenerationConfig(max_new_tokens=tokens)

    def one(prompt: list[int]) -> None:
        try:
            client = SecureClient(artifact, TimedTransport(url, report), cache_keys=False)
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
    report.server_rss_bytes = HttpTransport(url).info().get("peak_rss_bytes")
    return report
