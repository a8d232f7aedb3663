"""Transport cost and the round-trip-time crossover between ``bfv`` (two messages per group) and
``ckks`` (one), on SmolLM2 + the demo adapter, the demo's first question.

For each backend, in one run: secure generation in process (no transport), over HTTP on
loopback (a ``privlora serve`` subprocess, one request per message), over the WebSocket stream
(one frame per message), and over the stream with an extra delay injected before every message
(a simulated round-trip time). The decode step's time against the delay is a line
whose slope is the messages per step, so the crossover RTT where ``ckks`` catches up is where
the two lines meet.

    python benchmarks/bench_transport.py [--tokens 12] [--delays 0 10 20 40] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from privlora.compiler.driver import compile_artifact
from privlora.tools.loadtest import wait_for_server
from privlora.models.loading import load_model
from privlora.models.hf_tokenizer import encode_chat
from privlora.paths import DEMO_ADAPTER
from privlora.tools.qa import load_qa
from privlora.client.secure import SecureClient
from privlora.local import open_local
from privlora.client.generation import GenerationConfig, generate
from privlora.client.transports import HttpTransport, StreamTransport
from privlora.tools.machine import report_machine


class DelayedTransport(StreamTransport):
    """The stream with ``delay`` seconds slept before every message: a longer link, simulated."""

    def __init__(self, url: str, delay: float) -> None:
        super().__init__(url)
        self.delay = delay

    def evaluate(self, session: str, round_name: str, index: int, message: int, payload: bytes) -> bytes:
        time.sleep(self.delay)
        return super().evaluate(session, round_name, index, message, payload)


@dataclass
class Run:
    backend: str
    transport: str  # "in-process", "http", or "stream" with delay_ms injected per message
    delay_ms: float
    prefill_s: float
    decode_step_s: float  # median decode step
    messages_per_step: float
    tokens: list[int]


def measure(backend: str, transport: str, delay_ms: float, client: SecureClient, prompt: list[int],
            config: GenerationConfig) -> Run:
    tokens = list(generate(client, prompt, config))
    decode = client.steps[1:]
    run = Run(backend, transport, delay_ms, client.steps[0].total_s, statistics.median(s.total_s for s in decode),
              statistics.median(s.messages for s in decode), tokens)
    client.close()
    return run


def main() -> None:
    report_machine()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=12)
    parser.add_argument("--delays", type=float, nargs="+", default=[0.0, 10.0, 20.0, 40.0], help="ms per request")
    parser.add_argument("--port", type=int, default=8131)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    tuned = load_model("smollm2", DEMO_ADAPTER)
    prompt = encode_chat(tuned.tokenizer, load_qa(split="heldout")[0].question)
    config = GenerationConfig(max_new_tokens=args.tokens)  # fixed length: every run decodes as many steps
    runs: list[Run] = []
    with tempfile.TemporaryDirectory() as scratch:
        for backend in ("bfv", "ckks"):
            artifact = compile_artifact("smollm2", DEMO_ADAPTER, Path(scratch) / backend, backend=backend).artifact
            runs.append(measure(backend, "in-process", 0.0, open_local(artifact), prompt, config))
            server = subprocess.Popen([sys.executable, "-m", "privlora.cli", "serve", str(artifact), "--port",
                                       str(args.port), "--log-level", "warning", "--rate", "0", "--max-rows", "0"])
            try:
                url = f"http://127.0.0.1:{args.port}"
                wait_for_server(url)
                runs.append(measure(backend, "http", 0.0, SecureClient(artifact, HttpTransport(url), cache_keys=False),
                                    prompt, config))
                for delay in args.delays:
                    client = SecureClient(artifact, DelayedTransport(url, delay / 1000), cache_keys=False)
                    runs.append(measure(backend, "stream", delay, client, prompt, config))
            finally:
                server.terminate()
                server.wait(timeout=30)
            print(*(f"{r.backend:5s} {r.transport:10s} +{r.delay_ms:4.0f} ms: prefill {r.prefill_s:6.2f} s, decode step "
                    f"{r.decode_step_s:6.3f} s ({r.messages_per_step:g} messages)" for r in runs if r.backend == backend),
                  sep="\n")
    report = summarise(runs)
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": [asdict(r) for r in runs], **report}, indent=2) + "\n")


def summarise(runs: list[Run]) -> dict:
    """Per-message overhead of each transport on loopback, its share of a decode step, and the
    crossover RTT (on the stream)."""
    out: dict = {"tokens_identical_across_runs": len({tuple(r.tokens) for r in runs}) == 1}
    lines = {}
    for backend in ("bfv", "ckks"):
        local = next(r for r in runs if r.backend == backend and r.transport == "in-process")
        http = next(r for r in runs if r.backend == backend and r.transport == "http")
        stream = sorted((r for r in runs if r.backend == backend and r.transport == "stream"), key=lambda r: r.delay_ms)
        slope = (stream[-1].decode_step_s - stream[0].decode_step_s) / max(stream[-1].delay_ms - stream[0].delay_ms, 1e-9)
        lines[backend] = (stream[0].decode_step_s, slope)  # seconds at 0 ms, seconds per ms of delay
        out[backend] = {"decode_step_s_in_process": local.decode_step_s, "messages_per_step": local.messages_per_step,
                        "seconds_per_ms_of_rtt": slope}
        for run in (http, stream[0]):
            overhead = run.decode_step_s - local.decode_step_s
            out[backend][run.transport] = {"decode_step_s": run.decode_step_s,
                                           "overhead_ms_per_message": 1000 * overhead / local.messages_per_step,
                                           "overhead_share_of_decode_step": overhead / run.decode_step_s}
    (b0, b1), (c0, c1) = lines["bfv"], lines["ckks"]
    out["crossover_rtt_ms"] = (c0 - b0) / (b1 - c1) if b1 > c1 else None
    return out


if __name__ == "__main__":
    main()
