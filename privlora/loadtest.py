"""``privlora loadtest``: K concurrent clients, each with its own keys and session, generate M
tokens over HTTP. Reports throughput, round-request latency percentiles, the server's memory,
and every request's fate: answered, or refused with a status (none may be lost)."""

from __future__ import annotations

import statistics
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from privlora.compiler.artifact import CLIENT, load_bundle
from privlora.runtime.client import SecureClient
from privlora.runtime.generation import GenerationConfig, generate
from privlora.runtime.transport import HttpTransport, TransportError


class TimedTransport(HttpTransport):
    """HTTP transport that records each round request's latency and outcome."""

    def __init__(self, url: str, report: LoadReport) -> None:
        super().__init__(url)
        self.report = report

    def evaluate(self, session, round_name, index, payload):
        start = time.perf_counter()
        try:
            reply = super().evaluate(session, round_name, index, payload)
        except TransportError as exc:
            self.report.record(None, exc.status or 0)
            raise
        self.report.record(time.perf_counter() - start, 200)
        return reply


@dataclass
class LoadReport:
    clients: int
    tokens: int
    latencies: list[float] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    completed: int = 0  # clients that generated all their tokens
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    server_rss_bytes: int | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, latency: float | None, status: int) -> None:
        with self.lock:
            self.statuses[status] += 1
            if latency is not None:
                self.latencies.append(latency)

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) if self.latencies else float("nan")

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
    vocab = load_bundle(artifact, CLIENT).manifest["base"]["config"]["vocab_size"]
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
                report.completed += len(produced) == tokens
        except Exception as exc:  # reported, never lost: every failure is counted and shown
            with report.lock:
                report.failures.append(f"{type(exc).__name__}: {exc}")

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, prompts))
    report.seconds = time.perf_counter() - start
    report.server_rss_bytes = HttpTransport(url).info().get("peak_rss_bytes")
    return report
