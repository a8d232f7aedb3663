"""Pass manager: an ordered list of passes over a GraphModule, with lint, optional numeric checks
and instrumentation (IR dumps after every pass, like MLIR's ``--print-ir-after-all``).

A pass is a function ``(GraphModule, PassContext) -> GraphModule``. It may rewrite the graph and
record analysis results in ``context.analyses``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.fx import GraphModule

from privlora.compiler.frontend import SampleStep
from privlora.compiler.ir import PRIVACY, PRIVATE, PUBLIC, ROUND, STAGE, pll_nodes
from privlora.errors import PrivloraError

NUMERIC_TOLERANCE = 1e-5


class CompileError(PrivloraError):
    """The model cannot be compiled as asked (e.g. a private weight would leak)."""


@dataclass
class PassContext:
    """What passes share: sample inputs for numeric checks and the analyses passes record."""

    samples: Sequence[SampleStep] = ()
    debug: bool = False
    analyses: dict[str, Any] = field(default_factory=dict)


Pass = Callable[[GraphModule, PassContext], GraphModule]


class Instrument(Protocol):
    def after_pass(self, index: int, name: str, gm: GraphModule, context: PassContext) -> None: ...


def graph_summary(gm: GraphModule, context: PassContext) -> dict[str, Any]:
    """Node counts by privacy, the number of PLL nodes, sites and rounds."""
    nodes = list(gm.graph.nodes)
    plls = pll_nodes(gm)
    return {
        "nodes": len(nodes),
        "public_nodes": sum(node.meta.get(PRIVACY) == PUBLIC for node in nodes),
        "private_nodes": sum(node.meta.get(PRIVACY) == PRIVATE for node in nodes),
        "pll_nodes": len(plls),
        "sites": sum(len(gm.get_submodule(node.target).sites) for node in plls),
        "rounds": context.analyses["rounds"]["count"] if "rounds" in context.analyses else None,
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


class IRDumper:
    """Writes ``NN-<pass>.txt`` (node table), ``NN-<pass>.py`` (generated code) and
    ``summary.json`` (per-pass counts) into a directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.summary: list[dict[str, Any]] = []

    def after_pass(self, index: int, name: str, gm: GraphModule, context: PassContext) -> None:
        stem = f"{index:02d}-{name}"
        (self.directory / f"{stem}.txt").write_text(node_table(gm))
        (self.directory / f"{stem}.py").write_text(gm.code)
        self.summary.append({"index": index, "pass": name, **graph_summary(gm, context)})
        (self.directory / "summary.json").write_text(json.dumps(self.summary, indent=2) + "\n")


@torch.no_grad()
def _outputs(gm: GraphModule, samples: Sequence[SampleStep]) -> list[tuple[torch.Tensor, ...]]:
    return [tuple(gm(*sample.args())) for sample in samples]


def _check_numerics(name: str, before: list, after: list) -> None:
    for step, (old, new) in enumerate(zip(before, after)):
        for index, (a, b) in enumerate(zip(old, new)):
            error = (a - b).abs().max().item() if a.numel() else 0.0
            if a.shape != b.shape or error > NUMERIC_TOLERANCE:
                raise CompileError(f"pass {name} changed output {index} of sample {step}: "
                                   f"shape {tuple(a.shape)} -> {tuple(b.shape)}, max error {error:.2e}")


@dataclass
class PassManager:
    passes: list[tuple[str, Pass]]
    instruments: list[Instrument] = field(default_factory=list)

    def run(self, gm: GraphModule, context: PassContext) -> GraphModule:
        """Run every pass in order; lint after each. In debug mode, compare each stage's outputs on
        the sample steps with the input graph's (stricter than stage-to-stage: no drift adds up)."""
        reference = _outputs(gm, context.samples) if context.debug else []
        for instrument in self.instruments:
            instrument.after_pass(0, "input", gm, context)
        for number, (name, run_pass) in enumerate(self.passes, start=1):
            gm = run_pass(gm, context)
            gm.graph.lint()
            gm.recompile()
            if context.debug:
                _check_numerics(name, reference, _outputs(gm, context.samples))
            for instrument in self.instruments:
                instrument.after_pass(number, name, gm, context)
        return gm
