"""The compile pipeline: frontend -> passes. (Lowering and the artifact build on its result.)"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn
from torch.fx import GraphModule

from privlora.compiler.frontend import sample_steps, trace
from privlora.compiler.instruments import IRDumper, NumericCheck
from privlora.compiler.pass_manager import Analyses, Instrument, Pass, PassManager
from privlora.compiler.passes.annotate_privacy import annotate_privacy
from privlora.compiler.passes.fuse_pll import fuse_pll
from privlora.compiler.passes.lora_to_pll import lora_to_pll
from privlora.compiler.passes.partition import partition
from privlora.compiler.passes.schedule_rounds import schedule_rounds

DEFAULT_PASSES: list[Pass] = [annotate_privacy, lora_to_pll, fuse_pll, schedule_rounds, partition]


@dataclass
class CompiledGraph:
    graph_module: GraphModule  # partitioned: public_k segments and round_k PLL groups
    analyses: Analyses


def compile_graph(model: nn.Module, dump_ir: Path | None = None, debug: bool = False,
                  passes: list[Pass] | None = None, observers: Sequence[Instrument] = ()) -> CompiledGraph:
    """Trace ``model`` and run the passes; with ``debug`` every pass is checked numerically on a
    sample prefill and decode step; with ``dump_ir`` the IR after every pass is written there
    (before the numeric check, so a pass that fails it leaves its IR to look at); ``observers``
    (progress) see each pass after both."""
    instruments: list[Instrument] = []
    if dump_ir is not None:
        instruments.append(IRDumper(dump_ir))
    if debug:
        instruments.append(NumericCheck(sample_steps(model)))
    instruments.extend(observers)
    analyses = Analyses()
    manager = PassManager(passes if passes is not None else DEFAULT_PASSES, instruments)
    return CompiledGraph(manager.run(trace(model), analyses), analyses)
