"""Load over loopback: K concurrent clients with their own keys, every request answered or
cleanly refused, none lost; figures printed (the larger run is `privlora loadtest`)."""

from __future__ import annotations

from conftest import write_tiny_adapter, write_tiny_llama
from live import LiveServer
from privlora.compiler.driver import compile_artifact
from privlora.loadtest import run_load
from privlora.runtime.server import SessionLimits


def test_concurrent_clients_are_all_served(tmp_path):
    base = write_tiny_llama(tmp_path / "base")
    adapter = write_tiny_adapter(base, tmp_path / "adapter", ["q_proj", "v_proj"])
    artifact = compile_artifact(str(base), adapter, tmp_path / "ckks", backend="ckks").artifact
    server = LiveServer(artifact)
    try:
        report = run_load(artifact, server.url, clients=4, tokens=5)
    finally:
        server.stop()
    print("\n" + report.summary())
    rounds_per_client = 3 * 5  # 3 layers (one fused q+v round each) x 5 steps
    assert report.failures == [] and report.completed == 4
    assert report.statuses == {200: 4 * rounds_per_client}
    assert report.server_rss_bytes and report.latencies


def test_over_capacity_clients_are_refused_cleanly_not_lost(tmp_path):
    base = write_tiny_llama(tmp_path / "base")
    adapter = write_tiny_adapter(base, tmp_path / "adapter", ["q_proj", "v_proj"])
    artifact = compile_artifact(str(base), adapter, tmp_path / "ckks", backend="ckks").artifact
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
