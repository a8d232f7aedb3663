"""``GET /metrics``: the server's state in Prometheus' text format (``prometheus_client``).

Each app has its own registry, so that several servers in one process (tests) do not share
counters. Request counters and latency histograms are labelled by route template (never by a
path, which would carry session ids); the session and account figures are read when scraped.
Account names appear as labels; tokens, keys and payloads never do.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from privlora.server.hosting import HostingBase

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
STREAM_ROUTE = "/v1/sessions/{session}/stream"


class _ServerState(Collector):
    """Figures read from the server (and its accounts database) at scrape time."""

    def __init__(self, hosting: HostingBase) -> None:
        self.hosting = hosting

    def collect(self) -> Iterator[GaugeMetricFamily]:
        info = self.hosting.info()
        yield GaugeMetricFamily("privlora_open_sessions", "Client sessions held", value=info["sessions"])
        yield GaugeMetricFamily("privlora_session_key_bytes", "Evaluation-key bytes held for all sessions",
                                value=info["session_key_bytes"])
        if self.hosting.accounts is None:
            return
        rows = GaugeMetricFamily("privlora_account_rows", "Rows of x an account has sent to its most-queried LoRA "
                                 "site of an adapter (what the per-site budget bounds)", labels=["account", "adapter"])
        budget = GaugeMetricFamily("privlora_account_budget_rows", "An account's budget in rows per LoRA site",
                                   labels=["account"])
        for adapter in self.hosting.adapter_keys:
            for usage in self.hosting.accounts.usage(adapter):
                rows.add_metric([usage.account.name, adapter[:16]], usage.max_site_rows)
        for usage in self.hosting.accounts.usage():
            if usage.account.limits.max_rows is not None:
                budget.add_metric([usage.account.name], usage.account.limits.max_rows)
        yield rows
        yield budget


class Metrics:
    def __init__(self, hosting: HostingBase) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("privlora_requests", "Requests (and stream frames) by route and status",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("privlora_request_seconds", "Time to answer a request (or stream frame)", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.refusals = Counter("privlora_refusals", "Requests refused, by kind", ["kind"], registry=self.registry)
        self.registry.register(_ServerState(hosting))
        ProcessCollector(registry=self.registry)  # resident memory, CPU seconds, open files

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
