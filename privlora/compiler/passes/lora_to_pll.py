"""lora_to_pll: rewrite each LoRA Linear into its public base Linear + a PLL node + an add.

Before: ``y = q_proj(x)`` where ``q_proj`` is a LoraLinear (base W0 plus private A, B).
After:  ``y = add(q_proj(x), pll.site_N(x))``. ``q_proj`` is now the plain base Linear
(public), and ``pll.site_N`` is a PrivateLinear that owns the only copy of A and B. The
LoraLinear is removed from the module tree, so no private weight stays reachable from the
public side.
"""

from __future__ import annotations

import operator

from torch.fx import GraphModule

from privlora.compiler.ir import PLL_CONTAINER, PRIVACY, PRIVATE, PUBLIC, PLLSite, PrivateLinear, is_lora_site, pll_container
from privlora.compiler.pass_manager import Analyses, compiler_pass
from privlora.models.lora import LoraLinear


def _replace_module(gm: GraphModule, path: str, module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, child, module)


@compiler_pass(requires={"privacy"}, provides={"sites"})
def lora_to_pll(gm: GraphModule, analyses: Analyses) -> GraphModule:
    container = pll_container(gm)
    sites: list[PLLSite] = []
    for node in [n for n in gm.graph.nodes if is_lora_site(gm, n)]:
        lora: LoraLinear = gm.get_submodule(node.target)
        site = PLLSite(site_id=len(sites), module=str(node.target), d_in=lora.base_layer.in_features,
                       d_out=lora.base_layer.out_features, rank=lora.lora_A.out_features, scaling=lora.scaling)
        sites.append(site)
        name = f"site_{site.site_id}"
        container[name] = PrivateLinear([site], [lora.lora_A.weight], [lora.lora_B.weight])
        _replace_module(gm, node.target, lora.base_layer)
        (x,) = node.args
        with gm.graph.inserting_before(node):
            base = gm.graph.call_module(node.target, (x,))
            delta = gm.graph.call_module(f"{PLL_CONTAINER}.{name}", (x,))
            total = gm.graph.call_function(operator.add, (base, delta))
        base.meta[PRIVACY], delta.meta[PRIVACY], total.meta[PRIVACY] = PUBLIC, PRIVATE, PUBLIC
        node.replace_all_uses_with(total)
        gm.graph.erase_node(node)
    analyses.sites = sites
    return gm
