"""Load over loopback: K concurrent clients with their own keys, every request answered or
cleanly refused, none lost, every finished client's tokens equal to the plaintext fine-tuned
model's, the clients really at once and the server taking their sessions in turn (one
evaluation at a time: server/fairness.py); figures printed (the larger run is `privlora loadtest`)."""

from __future__ import annotations

import itertools
import logging

import pytest
from support.live import LiveServer, plaintext_tokens
from privlora.tools.loadtest import LoadReport, run_load
from privlora.client.generation import GenerationConfig
from privlora.server.sessions import SessionLimits

Interval = tuple[str, float, float]  # session, start, end


def sessions_overlap(intervals: list[Interval]) -> bool:
    """Were two intervals of different sessions under way at the same moment?"""
    return any(a[0] != b[0] and a[1] < b[2] and b[1] < a[2] for a, b in itertools.combinations(intervals, 2))


def turns_taken(intervals: list[Interval]) -> int:
    """How often the server went from one session's evaluation to another's, in the order it ran them."""
    order = [session for session, *_ in sorted(intervals, key=lambda interval: interval[1])]
    return sum(a != b for a, b in zip(order, order[1:]))


def client_intervals(report: LoadReport) -> list[Interval]:
    """Each round request from sending to its answer, as the clients saw it."""
    return [(r.session, r.start, r.end) for r in report.requests]


def server_intervals(records: list[logging.LogRecord]) -> list[Interval]:
    """Each backend evaluation, as the server's debug log line "round" times it (logged as it ends)."""
    return [(r.session, r.created - r.ms / 1000, r.created) for r in records if getattr(r, "event", None) == "round"]


def test_concurrent_clients_are_all_served_at_once_and_correctly(tiny_build, caplog: pytest.LogCaptureFixture):
    artifact = tiny_build.artifact("ckks")
    server = LiveServer(artifact)
    try:
        with caplog.at_level(logging.DEBUG, logger="privlora"):
            report = run_load(artifact, server.url, clients=4, tokens=5)
    finally:
        server.stop()
    print("\n" + report.summary())
    rounds_per_client = 3 * 5  # 3 layers (one fused q+v round each) x 5 steps
    assert report.failures == [] and report.completed == 4
    assert report.statuses == {200: 4 * rounds_per_client}
    assert report.server_rss_bytes and report.latencies
    prompts = [prompt for prompt, _ in report.generated]
    config = GenerationConfig(max_new_tokens=report.tokens)
    expected = plaintext_tokens(tiny_build.base, tiny_build.adapter, prompts, config)
    assert [tokens for _, tokens in report.generated] == expected
    # the clients ran at once, and the server took their sessions in turn: it switched sessions at
    # least every other evaluation (served one client after another, it would switch 3 times)
    assert sessions_overlap(client_intervals(report))
    served = server_intervals(caplog.records)
    assert len(served) == 4 * rounds_per_client and turns_taken(served) >= len(served) // 2


def test_over_capacity_clients_are_refused_cleanly_not_lost(tiny_build):
    artifact = tiny_build.artifact("ckks")
    server = LiveServer(artifact, session_limits=SessionLimits(rate=2.0, burst=4))  # a tight rate limit
    try:
        report = run_load(artifact, server.url, clients=3, tokens=4)
    finally:
        server.stop()
    print("\n" + report.summary())
    refused = report.statuses.get(429, 0)
    assert refused > 0 and set(report.statuses) <= {200, 429}
    assert report.completed + len(report.failures) == 3  # every client accounted for
    assert all("429" in failure for failure in report.failures)
