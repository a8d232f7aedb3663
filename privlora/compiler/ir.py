"""The compiler's IR: torch.fx GraphModules plus privlora's node metadata and the PLL node.

A PLL (Private Linear Layer) node is a ``call_module`` node whose module is a
:class:`PrivateLinear`. In the graph it computes the LoRA deltas of one or more sites that read
the same input, concatenated along the last dimension, in plaintext. This is the reference
semantics that the FHE backends implement under encryption. Its weights are the only private
tensors in a rewritten graph.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Node

from privlora.core.types import PLLSite
from privlora.models.lora import LoraLinear

# node.meta keys
PRIVACY = "privlora_privacy"  # PUBLIC or PRIVATE
ROUND = "privlora_round"  # PLL nodes: the client<->server round that evaluates them
STAGE = "privlora_stage"  # public nodes: how many rounds must finish before they can run
PUBLIC, PRIVATE = "public", "private"

PLL_CONTAINER = "pll"  # GraphModule attribute holding every PrivateLinear
PUBLIC_PREFIX, ROUND_PREFIX = "public_", "round_"  # partitioned graph: public_k segments, round_k PLLs


class PrivateLinear(nn.Module):
    """Plaintext reference of a PLL node: concatenated LoRA deltas of sites sharing one input."""

    def __init__(self, sites: list[PLLSite], lora_A: list[Tensor], lora_B: list[Tensor]) -> None:
        super().__init__()
        self.sites = tuple(sites)
        self.lora_A = nn.ParameterList(nn.Parameter(a.clone(), requires_grad=False) for a in lora_A)
        self.lora_B = nn.ParameterList(nn.Parameter(b.clone(), requires_grad=False) for b in lora_B)

    @property
    def d_out(self) -> int:
        return sum(site.d_out for site in self.sites)

    def forward(self, x: Tensor) -> Tensor:
        deltas = [
            torch.nn.functional.linear(torch.nn.functional.linear(x, a), b) * site.scaling
            for site, a, b in zip(self.sites, self.lora_A, self.lora_B)
        ]
        return deltas[0] if len(deltas) == 1 else torch.cat(deltas, dim=-1)


def is_pll(gm: GraphModule, node: Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), PrivateLinear)


def is_lora_site(gm: GraphModule, node: Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), LoraLinear)


def pll_nodes(gm: GraphModule) -> list[Node]:
    return [node for node in gm.graph.nodes if is_pll(gm, node)]


def pll_container(gm: GraphModule) -> nn.ModuleDict:
    """The ModuleDict that owns the graph's PrivateLinear modules (created on first use)."""
    if not hasattr(gm, PLL_CONTAINER):
        gm.add_module(PLL_CONTAINER, nn.ModuleDict())
    return getattr(gm, PLL_CONTAINER)
