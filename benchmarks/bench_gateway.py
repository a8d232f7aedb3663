"""Time to first token and decode speed through ``privlora gateway`` (the official ``openai``
client, streaming) against ``privlora generate`` on the same greedy question, both in front of
one ``privlora serve`` on loopback, alternated in one run.

    python benchmarks/bench_gateway.py ARTIFACT [--tokens 32] [--repeats 2] [--json PATH]

``generate``'s figures come from its ``--stats-json`` (its prefill step is its time to first
token); the gateway's are measured by the client: from sending the request to the first content
chunk, and the chunks after it over the time after it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

from privlora.tools.loadtest import ServerProcess, free_port
from privlora.tools.machine import report_machine

QUESTION = "What are the weekday opening hours of Larkspur Valley Clinic?"


def through_generate(artifact: str, url: str, tokens: int) -> dict[str, float | str]:
    with tempfile.TemporaryDirectory() as work:
        stats = Path(work) / "stats.json"
        run = subprocess.run([sys.executable, "-m", "privlora.cli", "generate", artifact, "--server", url, "--prompt",
                              QUESTION, "--max-new-tokens", str(tokens), "--quiet", "--stats-json", str(stats)],
                             capture_output=True, text=True, check=True)
        report = json.loads(stats.read_text())
    return {"ttft_s": report["prefill"]["total_s"], "tokens_per_s": report["tokens_per_second"],
            "text": run.stdout.strip()}


def through_gateway(client: openai.OpenAI, model: str, tokens: int) -> dict[str, float | str]:
    start = time.perf_counter()
    first, pieces = None, []
    for chunk in client.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTION}],
                                                max_tokens=tokens, temperature=0, stream=True,
                                                stream_options={"include_usage": True}):
        if chunk.usage:
            completion_tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            pieces.append(chunk.choices[0].delta.content)
    end = time.perf_counter()
    return {"ttft_s": first - start, "tokens_per_s": (completion_tokens - 1) / (end - first), "text": "".join(pieces)}


def main() -> None:
    report_machine()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    server = ServerProcess(args.artifact).start()
    port = free_port()
    gateway = subprocess.Popen([sys.executable, "-m", "privlora.cli", "gateway", args.artifact, "--server", server.url,
                                "--port", str(port)], stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="loopback")
        through_gateway(client, model, 2)  # warm: the gateway's session is opened at start, its segments load here
        runs: dict[str, list[dict]] = {"generate": [], "gateway": []}
        for _ in range(args.repeats):  # alternated, so that the machine's noise falls on both
            runs["generate"].append(through_generate(args.artifact, server.url, args.tokens))
            runs["gateway"].append(through_gateway(client, model, args.tokens))
    finally:
        gateway.terminate()
        gateway.wait(30)
        server.stop()
    same = all(r["text"] == runs["generate"][0]["text"] for rs in runs.values() for r in rs)
    summary = {name: {"ttft_s": statistics.median(r["ttft_s"] for r in rs),
                      "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs)} for name, rs in runs.items()}
    print(f"{args.tokens}-token greedy answer to {QUESTION!r}, {args.repeats} runs each, alternated "
          f"(medians); same text everywhere: {same}")
    print(f"{'path':10s} {'first token':>12s} {'tokens/s':>9s}")
    for name, figures in summary.items():
        print(f"{name:10s} {figures['ttft_s']:11.2f}s {figures['tokens_per_s']:9.2f}")
    ratio = summary["gateway"]["tokens_per_s"] / summary["generate"]["tokens_per_s"]
    print(f"gateway / generate: first token {summary['gateway']['ttft_s'] / summary['generate']['ttft_s']:.2f}x the "
          f"time, decode {ratio:.2f}x the speed")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "runs": runs, "same_text": same}, indent=2) + "\n")


if __name__ == "__main__":
    main()
