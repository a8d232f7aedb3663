"""schedule_rounds: group PLL nodes into client<->server rounds by dependency level.

A PLL node's round is the number of PLL results its input depends on transitively along the
longest chain, so PLL nodes with no path between them at the same depth share one round. Every
public node gets a *stage*: the number of rounds that must finish before it can run. The
partition pass cuts the public graph at these stages.

For a Llama with LoRA on q_proj and v_proj (fused into one site per layer), layer n's site
depends on layer n-1's attention output, so there is one round per layer. With LoRA on all
seven projections there are four rounds per layer: {q, k, v} -> o -> {gate, up} -> down. Each
one reads the result of the one before.

The schedule names the final PLL nodes, so it requires fusion to have run.
"""

from __future__ import annotations

from torch.fx import GraphModule, Node

from privlora.compiler.ir import ROUND, STAGE, is_pll
from privlora.compiler.pass_manager import Analyses, RoundSchedule, compiler_pass


def _depth(node: Node, depth: dict[Node, int]) -> int:
    """Rounds needed before ``node``'s inputs are all available."""
    return max((depth[arg] for arg in node.all_input_nodes), default=0)


@compiler_pass(requires={"fused_groups"}, provides={"schedule"})
def schedule_rounds(gm: GraphModule, analyses: Analyses) -> GraphModule:
    depth: dict[Node, int] = {}
    rounds: dict[int, list[str]] = {}
    for node in gm.graph.nodes:  # fx graphs are kept in topological order
        level = _depth(node, depth)
        if is_pll(gm, node):
            node.meta[ROUND] = level
            node.meta.pop(STAGE, None)
            rounds.setdefault(level, []).append(str(node.target))
            depth[node] = level + 1
        else:
            node.meta[STAGE] = level
            node.meta.pop(ROUND, None)
            depth[node] = level
    analyses.schedule = RoundSchedule(tuple(tuple(rounds[level]) for level in sorted(rounds)))
    return gm
