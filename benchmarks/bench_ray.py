"""Throughput of ``privlora serve`` with uvicorn (one process) against Ray Serve with 1 and 2
replicas, under ``privlora loadtest``'s clients, in one run on this machine.

    python benchmarks/bench_ray.py ARTIFACT [--clients 4] [--tokens 6] [--json PATH]

Each configuration gets a fresh server process (Ray: a fresh local cluster), a warm-up answer,
then K clients at once, each with its own keys, generating M tokens from an 8-token prompt.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from privlora.tools.loadtest import ServerProcess, run_load
from privlora.tools.machine import report_machine

CONFIGURATIONS = {"uvicorn": [], "ray, 1 replica": ["--ray", "--replicas", "1"],
                  "ray, 2 replicas": ["--ray", "--replicas", "2"]}


def main() -> None:
    report_machine()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=6)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = {}
    for name, options in CONFIGURATIONS.items():
        server = ServerProcess(args.artifact, *options).start(ready=False)
        try:
            server.wait_ready(timeout=300)
            run_load(args.artifact, server.url, 1, 2)  # warm-up: every replica's first session loads its tables
            report = run_load(args.artifact, server.url, args.clients, args.tokens)
        finally:
            server.stop()
        generated = report.completed * args.tokens
        results[name] = {"seconds": report.seconds, "tokens_per_s": generated / report.seconds,
                         "completed": report.completed, "failures": report.failures,
                         "p50_ms": 1000 * report.percentile(50), "p95_ms": 1000 * report.percentile(95),
                         "p99_ms": 1000 * report.percentile(99), "requests": dict(report.statuses),
                         "tokens": [tokens for _, tokens in report.generated]}
        print(f"{name:16s} {report.summary().splitlines()[0]}")
        print(f"{'':16s} {report.round_line()}")
    same = len({json.dumps(sorted(r["tokens"])) for r in results.values()}) == 1
    base = results["ray, 1 replica"]["tokens_per_s"]
    print(f"\n{args.clients} clients x {args.tokens} tokens; same tokens in every configuration: {same}")
    for name, r in results.items():
        print(f"{name:16s} {r['tokens_per_s']:6.2f} tokens/s  ({r['tokens_per_s'] / base:.2f}x ray with 1 replica)  "
              f"round p50 {r['p50_ms']:.0f} ms, p95 {r['p95_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms, "
              f"{r['completed']}/{args.clients} completed")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
