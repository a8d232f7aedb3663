"""annotate_privacy: tag every node public or private by provenance.

Adapter parameters are private; everything else is public. A node is private exactly when it is
a *boundary*: a PLL node, or a LoRA site that ``lora_to_pll`` will split into a public base
Linear and a PLL node. The client receives a boundary's result only in protected form. Any other
node that reads a private parameter would put a private weight into the public graph, so it is a
compile error.
"""

from __future__ import annotations

from torch.fx import GraphModule, Node

from privlora.compiler.ir import PRIVACY, PRIVATE, PUBLIC, is_lora_site, is_pll
from privlora.compiler.pass_manager import Analyses, CompileError, PrivacyCounts, compiler_pass


class PrivateWeightLeakError(CompileError):
    """A public node would compute with a private (adapter) weight."""


PRIVATE_COMPONENTS = frozenset({"lora_A", "lora_B"})


def is_private_name(qualified_name: str) -> bool:
    """Adapter tensors live under ``lora_A``/``lora_B`` (peft's names, kept by LoraLinear and
    PrivateLinear). Names survive tracing, module types do not: a GraphModule rebuilds the
    module tree from the paths it uses."""
    return not PRIVATE_COMPONENTS.isdisjoint(qualified_name.split("."))


def _reads_private(gm: GraphModule, node: Node) -> bool:
    if node.op == "get_attr":
        return is_private_name(str(node.target))
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return any(is_private_name(f"{node.target}.{name}") for name, _ in module.named_parameters())
    return False


@compiler_pass(provides={"privacy"})
def annotate_privacy(gm: GraphModule, analyses: Analyses) -> GraphModule:
    for node in gm.graph.nodes:
        if is_pll(gm, node) or is_lora_site(gm, node):
            node.meta[PRIVACY] = PRIVATE
        elif _reads_private(gm, node):
            users = ", ".join(user.name for user in node.users) or "nothing"
            raise PrivateWeightLeakError(
                f"node {node.name} ({node.op} {node.target}) reads an adapter weight outside a PLL "
                f"boundary (used by {users}): a private weight would leak into the public graph"
            )
        else:
            node.meta[PRIVACY] = PUBLIC
    analyses.privacy = PrivacyCounts(
        public=sum(node.meta[PRIVACY] == PUBLIC for node in gm.graph.nodes),
        private=sum(node.meta[PRIVACY] == PRIVATE for node in gm.graph.nodes),
    )
    return gm
