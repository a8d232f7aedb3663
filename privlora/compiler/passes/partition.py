"""partition: cut the graph into public segments and private rounds.

Public nodes at stage s go to segment ``public_s``; the PLL nodes of round r go to ``round_r``.
The order is public_0, round_0, public_1, round_1, ... public_R. ``torch.fx``'s
``split_module`` turns each group into a submodule. The tensors that cross a cut (the residual
stream, the KV cache pieces, the sites' inputs and results) become the submodules' inputs and
outputs. The result computes the same function: a top-level graph that calls the submodules in
order, which is what the runtime executes (public segments on ONNX Runtime, rounds on the
server).

Only tensors may cross a cut: a segment's inputs and outputs are ONNX values. A value computed
from a tensor's metadata (``x.dtype``, ``x.shape[-1]``) is a Python object, so each segment that
uses one recomputes it from the tensor instead (:func:`localize_metadata`). With LoRA on k_proj but
not q_proj, for example, q is computed before the round and its dtype read after it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule, Node
from torch.fx.passes.split_module import split_module

from privlora.compiler.ir import PUBLIC_PREFIX, ROUND, ROUND_PREFIX, STAGE
from privlora.compiler.plan_builder import plan_from_graph
from privlora.compiler.pass_manager import Analyses, compiler_pass

METADATA_ATTRIBUTES = frozenset({"dtype", "shape", "device", "ndim"})  # x.dtype, x.shape, ...
METADATA_METHODS = frozenset({"size", "dim"})  # x.size(-1), x.dim()


def _partition_id(node: Node) -> int:
    """Interleave: public stage s -> 2s, round r -> 2r + 1 (so ids are topologically ordered)."""
    return 2 * node.meta[ROUND] + 1 if ROUND in node.meta else 2 * node.meta[STAGE]


def _reads_metadata(node: Node, metadata: set[Node]) -> bool:
    """Whether ``node`` computes its value from tensor metadata only: ``x.dtype``, ``x.size(i)``,
    or an operation whose every input is such a value (``x.shape[-1] // 2``)."""
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in METADATA_ATTRIBUTES
    if node.op == "call_method" and node.target in METADATA_METHODS:
        return True
    inputs = node.all_input_nodes
    return node.op in ("call_function", "call_method") and bool(inputs) and all(n in metadata for n in inputs)


def localize_metadata(gm: GraphModule) -> None:
    """Give each public stage that reads a metadata value its own copy of the nodes computing it,
    so the value never crosses a cut: the copy reads the tensor itself, which may cross."""
    metadata: set[Node] = set()
    for node in gm.graph.nodes:
        if _reads_metadata(node, metadata):
            metadata.add(node)
    for node in reversed(list(gm.graph.nodes)):  # users first, so a copy's inputs are copied after it
        if node not in metadata:
            continue
        elsewhere: dict[int, list[Node]] = {}  # users in other stages (PLL nodes read tensors only)
        for user in node.users:
            if user.meta[STAGE] != node.meta[STAGE]:
                elsewhere.setdefault(user.meta[STAGE], []).append(user)
        for stage, users in elsewhere.items():
            with gm.graph.inserting_before(_first(gm, users)):
                copy = gm.graph.node_copy(node)
            copy.meta[STAGE] = stage
            for user in users:
                user.replace_input_with(node, copy)
        if not node.users:
            gm.graph.erase_node(node)


def _first(gm: GraphModule, nodes: list[Node]) -> Node:
    """The earliest of ``nodes`` in the graph's (topological) order."""
    wanted = set(nodes)
    return next(node for node in gm.graph.nodes if node in wanted)


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
    localize_metadata(gm)
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
