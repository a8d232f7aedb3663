"""Compile SmolLM2 + the demo adapter and time one decode step of the public part:
torch (the partitioned fx segments) vs ONNX Runtime (the compiled segments).

    .venv/bin/python benchmarks/bench_compile.py [--artifact DIR] [--repeats N]

Prints compile time, bundle sizes, rounds and segments per step, and the step timings (median
of N). All ratios come from one run on one machine.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from privlora.paths import DEMO_ADAPTER
from privlora.compiler.driver import compile_artifact
from privlora.compiler.frontend import sample_steps
from privlora.compiler.lower_onnx import segment_arguments
from privlora.compiler.pipeline import compile_graph
from privlora.models.loading import load_model
from privlora.local import open_local
from privlora.tools.machine import report_machine


def median_ms(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    report_machine()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path, default=None, help="where to compile (default: a temp dir)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    out = args.artifact or Path(tempfile.mkdtemp()) / "artifact"
    report = compile_artifact("smollm2", DEMO_ADAPTER, out, backend="reference", force=True)
    print(f"compile: {report.seconds:.1f} s; client bundle {report.client_bytes / 1e6:.1f} MB, "
          f"server bundle {report.server_bytes / 1e6:.2f} MB; {report.sites} sites, "
          f"{report.rounds} rounds and {report.segments} public segments per step")

    loaded = load_model("smollm2", DEMO_ADAPTER)
    split = compile_graph(loaded.model).graph_module
    runner = open_local(out)
    prefill, decode, _ = sample_steps(loaded.model, prompt_length=32)
    print(f"median of {args.repeats}, torch threads {torch.get_num_threads()}, ONNX Runtime {runner.segments['public_0'].session.get_providers()[0]}")
    for label, sample in (("decode step (1 token after a 32-token prompt)", decode), ("prefill step (32 tokens)", prefill)):
        time_step(label, sample, loaded.model, split, runner, args.repeats)


def time_step(label, sample, model, split, runner, repeats) -> None:
    arguments = segment_arguments(split, [sample])[0]
    public = [name for name in arguments if name.startswith("public_")]

    @torch.no_grad()
    def torch_public():
        for name in public:
            split.get_submodule(name)(*arguments[name])

    def ort_public():
        for name in public:
            runner.segments[name](list(arguments[name]))

    @torch.no_grad()
    def torch_full():
        model(*sample.args())

    def compiled_full():
        runner(*(tensor.numpy() for tensor in sample.args()))  # the client takes numpy arrays

    rows = [("public part, torch (fx segments)", median_ms(torch_public, repeats)),
            ("public part, ONNX Runtime", median_ms(ort_public, repeats)),
            ("whole step, torch eager model", median_ms(torch_full, repeats)),
            ("whole step, compiled (ORT + plain rounds)", median_ms(compiled_full, repeats))]
    print(f"{label}:")
    for name, ms in rows:
        print(f"  {name:<44} {ms:8.1f} ms")
    print(f"  ONNX Runtime / torch (public part): {rows[1][1] / rows[0][1]:.2f}")


if __name__ == "__main__":
    main()
