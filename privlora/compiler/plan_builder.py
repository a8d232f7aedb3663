"""Reading the execution plan (``privlora.core.plan.Plan``) off a partitioned GraphModule."""

from __future__ import annotations

import operator

from torch.fx import GraphModule, Node

from privlora.compiler.ir import ROUND_PREFIX
from privlora.core.plan import PRIVATE, PUBLIC, Plan, PlanStep
from privlora.errors import PrivloraError


def result_count(submodule: GraphModule) -> int:
    """How many values a submodule returns (a bare tensor counts as one)."""
    result = next(node for node in submodule.graph.nodes if node.op == "output").args[0]
    return len(result) if isinstance(result, (tuple, list)) else 1


def _output_names(call: Node) -> dict[Node, str]:
    """Names of a call's results: ``<step>.<i>`` for tuple outputs read through getitem."""
    users = {user: f"{call.target}.{user.args[1]}" for user in call.users
             if user.op == "call_function" and user.target is operator.getitem}
    return users or {call: f"{call.target}.0"}


def plan_from_graph(split: GraphModule) -> Plan:
    """Read the plan off a partitioned GraphModule (see ``privlora.compiler.passes.partition``)."""
    names: dict[Node, str] = {}
    steps, inputs, outputs = [], [], ()
    for node in split.graph.nodes:
        if node.op == "placeholder":
            names[node] = node.name
            inputs.append(node.name)
        elif node.op == "call_module":
            names.update(_output_names(node))
            count = result_count(split.get_submodule(node.target))
            result_names = tuple(f"{node.target}.{i}" for i in range(count))
            kind = PRIVATE if str(node.target).startswith(ROUND_PREFIX) else PUBLIC
            steps.append(PlanStep(str(node.target), kind, tuple(names[arg] for arg in node.args), result_names))
        elif node.op == "output":
            outputs = tuple(names[value] for value in node.args[0])
        elif not (node.op == "call_function" and node.target is operator.getitem):
            raise PrivloraError(f"unexpected top-level node {node.format_node()} in a partitioned graph")
    return Plan(tuple(inputs), tuple(steps), outputs)
