"""partition: cut the graph into public segments and private rounds.

Public nodes at stage s go to segment ``public_s``; the PLL nodes of round r go to ``round_r``.
The order is public_0, round_0, public_1, round_1, ... public_R. ``torch.fx``'s
``split_module`` turns each group into a submodule. The tensors that cross a cut (the residual
stream, the KV cache pieces, the sites' inputs and results) become the submodules' inputs and
outputs. The result computes the same function: a top-level graph that calls the submodules in
order, which is what the runtime executes (public segments on ONNX Runtime, rounds on the
server).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule, Node
from torch.fx.passes.split_module import split_module

from privlora.compiler.ir import PUBLIC_PREFIX, ROUND, ROUND_PREFIX, STAGE
from privlora.compiler.plan import plan_from_graph
from privlora.compiler.pass_manager import Analyses, compiler_pass


def _partition_id(node: Node) -> int:
    """Interleave: public stage s -> 2s, round r -> 2r + 1 (so ids are topologically ordered)."""
    return 2 * node.meta[ROUND] + 1 if ROUND in node.meta else 2 * node.meta[STAGE]


def _readable(target: str) -> str:
    number = int(target.removeprefix("submod_"))
    return f"{ROUND_PREFIX if number % 2 else PUBLIC_PREFIX}{number // 2}"


def _fetch(root: nn.Module, target: str) -> torch.Tensor:
    value = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _inline_constants(split: GraphModule) -> None:
    """``split_module`` passes parameters read by ``get_attr`` (norm weights, RoPE frequencies)
    into submodules as inputs. Move them inside the submodule that reads them instead, so that
    a segment's inputs are only the activations that cross a cut."""
    for call in [n for n in split.graph.nodes if n.op == "call_module"]:
        submodule = split.get_submodule(call.target)
        placeholders = [n for n in submodule.graph.nodes if n.op == "placeholder"]
        kept_args = []
        for arg, placeholder in zip(call.args, placeholders):
            if not (isinstance(arg, Node) and arg.op == "get_attr"):
                kept_args.append(arg)
                continue
            name = str(arg.target).replace(".", "_")
            tensor = _fetch(split, str(arg.target))
            if isinstance(tensor, nn.Parameter):
                submodule.register_parameter(name, tensor)
            else:
                submodule.register_buffer(name, tensor)
            with submodule.graph.inserting_before(placeholder):
                constant = submodule.graph.get_attr(name)
            placeholder.replace_all_uses_with(constant)
            submodule.graph.erase_node(placeholder)
        call.args = tuple(kept_args)
        submodule.recompile()
    split.graph.eliminate_dead_code()


@compiler_pass(requires={"schedule"}, provides={"plan"})
def partition(gm: GraphModule, analyses: Analyses) -> GraphModule:
    split = split_module(gm, gm, _partition_id)
    _inline_constants(split)
    for node in split.graph.nodes:
        if node.op == "call_module":
            name = _readable(str(node.target))
            split.add_module(name, split.get_submodule(node.target))
            delattr(split, node.target)
            node.target = name
    split.recompile()
    analyses.plan = plan_from_graph(split)
    return split
