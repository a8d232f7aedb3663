"""annotate_privacy: tag every node public or private by provenance.

Adapter parameters are private; everything else is public. A node is private exactly when it is
a *boundary*: a PLL node, or a LoRA site that ``lora_to_pll`` will split into a public base
Linear and a PLL node. The client receives a boundary's result only in protected form. Any other
node that reads a private parameter would put a private weight into the public graph, so it is a
compile error.
"""

from __future__ import annotations

from torch import nn
from torch.fx import GraphModule, Node

from privlora.compiler.ir import PRIVACY, PRIVATE, PUBLIC, PrivateLinear, is_lora_site, is_pll
from privlora.compiler.pass_manager import CompileError, PassContext
from privlora.models.lora import LoraLinear


class PrivateWeightLeakError(CompileError):
    """A public node would compute with a private (adapter) weight."""


def private_parameter_ids(root: nn.Module) -> set[int]:
    """``id`` of every adapter tensor: LoRA A/B of LoraLinear and the weights of PrivateLinear."""
    ids: set[int] = set()
    for module in root.modules():
        if isinstance(module, LoraLinear):
            ids.update(id(p) for p in (*module.lora_A.parameters(), *module.lora_B.parameters()))
        elif isinstance(module, PrivateLinear):
            ids.update(id(p) for p in module.parameters())
    return ids


def _reads_private(gm: GraphModule, node: Node, private: set[int]) -> bool:
    if node.op == "get_attr":
        target = gm
        for part in str(node.target).split("."):
            target = getattr(target, part)
        return id(target) in private
    if node.op == "call_module":
        return any(id(p) in private for p in gm.get_submodule(node.target).parameters())
    return False


def annotate_privacy(gm: GraphModule, context: PassContext) -> GraphModule:
    private = private_parameter_ids(gm)
    for node in gm.graph.nodes:
        if is_pll(gm, node) or is_lora_site(gm, node):
            node.meta[PRIVACY] = PRIVATE
        elif _reads_private(gm, node, private):
            users = ", ".join(user.name for user in node.users) or "nothing"
            raise PrivateWeightLeakError(
                f"node {node.name} ({node.op} {node.target}) reads an adapter weight outside a PLL "
                f"boundary (used by {users}): a private weight would leak into the public graph"
            )
        else:
            node.meta[PRIVACY] = PUBLIC
    context.analyses["privacy"] = {
        "public": sum(node.meta[PRIVACY] == PUBLIC for node in gm.graph.nodes),
        "private": sum(node.meta[PRIVACY] == PRIVATE for node in gm.graph.nodes),
    }
    return gm
