"""Pads against the per-query backends, in process and over simulated links, on SmolLM2 + the demo
adapter and the demo's first question.

One run, side by side: ``reference`` (unencrypted, the same runtime and ONNX segments), ``pads``
warm (every pad made before the prompt, as ``generate --pads`` does), ``pads`` cold (made on the
spot: the prompt's rows plus a batch ahead, offline time counted), ``bfv`` and ``ckks``. Then the
same over a link simulated around the in-process server: each message sleeps RTT/2 each way plus
its bytes over the bandwidth, for the offline messages too.

    python benchmarks/bench_pads.py [--tokens 12] [--artifacts DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from privlora.client.generation import GenerationConfig, generate
from privlora.client.secure import SecureClient
from privlora.client.timings import OfflineStats
from privlora.compiler.driver import compile_artifact
from privlora.local import InProcessTransport, local_transport
from privlora.models.hf_tokenizer import encode_chat
from privlora.models.loading import load_model
from privlora.models.step import TorchStep
from privlora.paths import DEMO_ADAPTER
from privlora.tools.qa import load_qa
from privlora.tools.machine import report_machine

LINKS = {"loopback": (0.0, None), "20ms-100Mbit": (0.020, 100e6), "60ms-20Mbit": (0.060, 20e6)}


class Link:
    """A simulated link around a transport: RTT/2 each way and each direction's bytes at ``bits_per_s``."""

    def __init__(self, inner: InProcessTransport, rtt_s: float, bits_per_s: float | None) -> None:
        self.inner, self.rtt_s, self.bits_per_s = inner, rtt_s, bits_per_s

    def _wire(self, size: int) -> None:
        time.sleep(self.rtt_s / 2 + (8 * size / self.bits_per_s if self.bits_per_s else 0.0))

    def info(self) -> dict[str, Any]:
        return self.inner.info()

    def open_session(self, evaluation_keys: bytes, artifact: str | None = None) -> str:
        self._wire(len(evaluation_keys))
        session = self.inner.open_session(evaluation_keys, artifact)
        self._wire(64)
        return session

    def evaluate(self, session: str, round_name: str, index: int, message: int, payload: bytes) -> bytes:
        self._wire(len(payload))
        reply = self.inner.evaluate(session, round_name, index, message, payload)
        self._wire(len(reply))
        return reply

    def close_session(self, session: str) -> None:
        self.inner.close_session(session)

    def forget(self, session: str) -> None:
        self.inner.forget(session)


@dataclass
class Run:
    backend: str  # "pads (warm)" / "pads (cold)" for the two pool states
    link: str
    ttft_s: float  # the prompt's step, pads made on the spot included
    decode_tokens_per_s: float  # every second of the decode steps
    bytes_per_token: float
    messages_per_token: float
    offline_s: float  # pads made before the prompt (warm) or during the run (cold)
    offline_rows: float
    tokens: list[int]


def warm_up(client: SecureClient, prompt: list[int]) -> None:
    """One short step first, so that no configuration pays ONNX Runtime's first runs in its
    figures; then a clean slate (no steps, no pads)."""
    list(generate(client, prompt[:8], GenerationConfig(max_new_tokens=1)))
    if client.pads is not None:
        client.pads.forget_pads()
    client.steps.clear()
    client.offline = OfflineStats()


def measure(label: str, link: str, client: SecureClient, prompt: list[int], config: GenerationConfig,
            warm_rows: int = 0) -> Run:
    warm_up(client, prompt)
    made = client.prepare(warm_rows) if warm_rows else None
    tokens = list(generate(client, prompt, config))
    decode = client.steps[1:]
    step_s = statistics.mean(s.total_s for s in decode)
    run = Run(label, link, client.steps[0].total_s, 1.0 / step_s, statistics.mean(s.bytes_up + s.bytes_down for s in decode),
              statistics.mean(s.messages for s in decode), client.offline.seconds, client.offline.rows, tokens)
    if made is not None:
        assert all(s.offline_s == 0 for s in client.steps), "a warm run made pads on the spot"
    client.close()
    return run


def clients(artifacts: dict[str, Path], link: str) -> list[tuple[str, str, SecureClient, int]]:
    """(label, backend, client, pads to make first) for each configuration on this link."""
    rtt, rate = LINKS[link]
    out = []
    for label, backend, warm in (("reference", "reference", 0), ("pads (warm)", "pads", 1), ("pads (cold)", "pads", 0),
                                 ("bfv", "bfv", 0), ("ckks", "ckks", 0)):
        transport = Link(local_transport(artifacts[backend]), rtt, rate)
        out.append((label, backend, SecureClient(artifacts[backend], transport, cache_keys=False), warm))
    return out


def main() -> None:
    report_machine()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=12)
    parser.add_argument("--links", nargs="+", default=list(LINKS), choices=list(LINKS))
    parser.add_argument("--artifacts", default="/tmp/privlora-bench-artifacts", help="compiled once, reused")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    tuned = load_model("smollm2", DEMO_ADAPTER)
    prompt = encode_chat(tuned.tokenizer, load_qa(split="heldout")[0].question)
    config = GenerationConfig(max_new_tokens=args.tokens)  # fixed length: every run decodes as many steps
    plaintext = list(generate(TorchStep(tuned.model), prompt, config))
    artifacts = {}
    for backend in ("reference", "pads", "bfv", "ckks"):
        target = Path(args.artifacts) / backend
        artifacts[backend] = target if (target / "manifest.json").is_file() else \
            compile_artifact("smollm2", DEMO_ADAPTER, target, backend=backend).artifact
    runs: list[Run] = []
    for link in args.links:
        for label, backend, client, warm in clients(artifacts, link):
            run = measure(label, link, client, prompt, config, len(prompt) + args.tokens if warm else 0)
            runs.append(run)
            print(f"{link:13s} {label:12s} TTFT {run.ttft_s:7.2f} s  decode {run.decode_tokens_per_s:6.2f} tokens/s  "
                  f"{run.bytes_per_token / 1e6:6.2f} MB/token  {run.messages_per_token:3.0f} msgs/token  "
                  f"offline {run.offline_s:6.2f} s ({run.offline_rows:g} rows)  "
                  f"{'= plaintext' if run.tokens == plaintext else 'DIFFERS from plaintext'}", flush=True)
    report = {"runs": [asdict(r) for r in runs], "plaintext": plaintext, "prompt_tokens": len(prompt),
              "ratios": ratios(runs)}
    print(json.dumps(report["ratios"], indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


def ratios(runs: list[Run]) -> dict[str, dict[str, float]]:
    """Each configuration against ``reference`` on the same link: decode speed and TTFT."""
    out: dict[str, dict[str, float]] = {}
    for run in runs:
        base = next(r for r in runs if r.link == run.link and r.backend == "reference")
        out[f"{run.link} {run.backend}"] = {"decode_vs_reference": run.decode_tokens_per_s / base.decode_tokens_per_s,
                                            "ttft_vs_reference": run.ttft_s / base.ttft_s}
    return out


if __name__ == "__main__":
    main()
