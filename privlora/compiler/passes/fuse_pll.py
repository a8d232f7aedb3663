"""fuse_pll: PLL nodes that read the same tensor become one PLL node with concatenated outputs.

q_proj and v_proj (and k_proj) read the same normalised hidden state. Evaluated separately, they
cost one encrypted message each. Fused, the client encrypts the input once and the server returns
one result. Each former consumer reads its slice through ``torch.narrow``.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch.fx import GraphModule, Node

from privlora.compiler.ir import PLL_CONTAINER, PRIVACY, PRIVATE, PUBLIC, PrivateLinear, pll_container, pll_nodes
from privlora.compiler.pass_manager import Analyses, compiler_pass


def _fuse_group(gm: GraphModule, group: list[Node]) -> None:
    container = pll_container(gm)
    modules: list[PrivateLinear] = [gm.get_submodule(node.target) for node in group]
    sites = [site for module in modules for site in module.sites]
    name = "fused_" + "_".join(str(site.site_id) for site in sites)
    container[name] = PrivateLinear(sites, [a for m in modules for a in m.lora_A], [b for m in modules for b in m.lora_B])
    (x,) = group[0].args
    with gm.graph.inserting_before(group[0]):
        fused = gm.graph.call_module(f"{PLL_CONTAINER}.{name}", (x,))
    fused.meta[PRIVACY] = PRIVATE
    offset = 0
    for node, module in zip(group, modules):
        with gm.graph.inserting_after(fused):
            piece = gm.graph.call_function(torch.narrow, (fused, -1, offset, module.d_out))
        piece.meta[PRIVACY] = PUBLIC
        offset += module.d_out
        node.replace_all_uses_with(piece)
        gm.graph.erase_node(node)
        del container[str(node.target).removeprefix(f"{PLL_CONTAINER}.")]


@compiler_pass(requires={"privacy", "sites"}, provides={"fused_groups"})
def fuse_pll(gm: GraphModule, analyses: Analyses) -> GraphModule:
    groups: dict[Node, list[Node]] = defaultdict(list)
    for node in pll_nodes(gm):
        groups[node.args[0]].append(node)
    for group in groups.values():
        if len(group) > 1:
            _fuse_group(gm, group)
    analyses.fused_groups = [len(group) for group in groups.values()]
    return gm
