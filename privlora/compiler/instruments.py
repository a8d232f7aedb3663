"""Pass instruments: observers of a PassManager run that are not part of any pass.

``IRDumper`` writes the IR after every pass (like MLIR's ``--print-ir-after-all``) with each
pass's run time; ``NumericCheck`` (``--debug``) checks that every pass keeps the model's outputs;
``PassCount`` counts the passes done on the compile's progress line.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.fx import GraphModule

from privlora.compiler.frontend import SampleStep
from privlora.compiler.ir import PRIVACY, PRIVATE, PUBLIC, ROUND, STAGE, pll_nodes
from privlora.compiler.pass_manager import Analyses, CompileError, Instrument, PassRun

NUMERIC_TOLERANCE = 1e-5
INPUT = "input"  # the name the dumps give the graph before the first pass


def graph_summary(gm: GraphModule, analyses: Analyses) -> dict[str, Any]:
    """Node counts by privacy, the number of PLL nodes, sites and rounds."""
    nodes = list(gm.graph.nodes)
    plls = pll_nodes(gm)
    return {
        "nodes": len(nodes),
        "public_nodes": sum(node.meta.get(PRIVACY) == PUBLIC for node in nodes),
        "private_nodes": sum(node.meta.get(PRIVACY) == PRIVATE for node in nodes),
        "pll_nodes": len(plls),
        "sites": sum(len(gm.get_submodule(node.target).sites) for node in plls),
        "rounds": analyses.schedule.count if "schedule" in analyses else None,
    }


def node_table(gm: GraphModule) -> str:
    """A readable table of the graph: one row per node with its privacy, round and stage."""
    rows = [("#", "name", "op", "target", "privacy", "round", "stage", "args")]
    for index, node in enumerate(gm.graph.nodes):
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        args = ", ".join(str(arg) for arg in node.args)
        rows.append((str(index), node.name, node.op, str(target), str(node.meta.get(PRIVACY, "")),
                     str(node.meta.get(ROUND, "")), str(node.meta.get(STAGE, "")), args[:100]))
    widths = [max(len(row[col]) for row in rows) for col in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1]
                     for row in rows) + "\n"


class IRDumper(Instrument):
    """Writes ``NN-<pass>.txt`` (node table), ``NN-<pass>.py`` (generated code) and
    ``summary.json`` (per-pass counts and run time in seconds; null for the input) into a
    directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.summary: list[dict[str, Any]] = []

    def run_started(self, gm: GraphModule, analyses: Analyses) -> None:
        self._dump(0, INPUT, None, gm, analyses)

    def after_pass(self, run: PassRun, gm: GraphModule, analyses: Analyses) -> None:
        self._dump(run.number, run.info.name, run.seconds, gm, analyses)

    def _dump(self, index: int, name: str, seconds: float | None, gm: GraphModule, analyses: Analyses) -> None:
        stem = f"{index:02d}-{name}"
        (self.directory / f"{stem}.txt").write_text(node_table(gm))
        (self.directory / f"{stem}.py").write_text(gm.code)
        self.summary.append({"index": index, "pass": name, **graph_summary(gm, analyses), "seconds": seconds})
        (self.directory / "summary.json").write_text(json.dumps(self.summary, indent=2) + "\n")


Outputs = list[tuple[Tensor, ...]]


@torch.no_grad()
def sample_outputs(gm: GraphModule, samples: Sequence[SampleStep]) -> Outputs:
    return [tuple(gm(*sample.args())) for sample in samples]


def compare_outputs(name: str, before: Outputs, after: Outputs, tolerance: float) -> None:
    """Raise a CompileError naming the pass, the sample and the output that moved."""
    for step, (old, new) in enumerate(zip(before, after)):
        for index, (a, b) in enumerate(zip(old, new)):
            error = (a - b).abs().max().item() if a.shape == b.shape and a.numel() else 0.0
            if a.shape != b.shape or error > tolerance:
                raise CompileError(f"pass {name} changed output {index} of sample {step}: "
                                   f"shape {tuple(a.shape)} -> {tuple(b.shape)}, max error {error:.2e}")


class NumericCheck(Instrument):
    """Runs the sample steps after every pass and compares the outputs with the input graph's.
    Comparing with the input rather than the previous pass is stricter: drift cannot add up."""

    def __init__(self, samples: Sequence[SampleStep], tolerance: float = NUMERIC_TOLERANCE) -> None:
        self.samples, self.tolerance = samples, tolerance
        self.reference: Outputs = []

    def run_started(self, gm: GraphModule, analyses: Analyses) -> None:
        self.reference = sample_outputs(gm, self.samples)

    def after_pass(self, run: PassRun, gm: GraphModule, analyses: Analyses) -> None:
        compare_outputs(run.info.name, self.reference, sample_outputs(gm, self.samples), self.tolerance)


class PassCount(Instrument):
    """Calls ``advance`` after every pass (and after the instruments before it, such as the numeric
    check), so that a terminal sees which of a long compile's passes it is at."""

    def __init__(self, advance: Callable[[], None]) -> None:
        self.advance = advance

    def after_pass(self, run: PassRun, gm: GraphModule, analyses: Analyses) -> None:
        self.advance()
