"""The execution plan: the partitioned graph's top level as data.

The runtime does not need torch.fx. It needs the order of the steps (public segments and
private rounds) and, for each step, which named values it reads and writes. ``Plan`` is that
information. It is serialised into the artifact's manifest, and :func:`run_plan` executes it with
any step implementation (ONNX Runtime sessions for public segments, a backend for rounds).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from torch.fx import GraphModule, Node

from privlora.compiler.ir import ROUND_PREFIX
from privlora.errors import PrivloraError

@dataclass(frozen=True)
class PlanStep:
    name: str  # "public_3" or "round_2"
    kind: str  # "public" or "private"
    inputs: tuple[str, ...]  # value names, in the step's argument order
    outputs: tuple[str, ...]  # value names it defines


@dataclass(frozen=True)
class Plan:
    inputs: tuple[str, ...]
    steps: tuple[PlanStep, ...]
    outputs: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Plan":
        try:
            steps = tuple(PlanStep(s["name"], s["kind"], tuple(s["inputs"]), tuple(s["outputs"])) for s in data["steps"])
            return cls(tuple(data["inputs"]), steps, tuple(data["outputs"]))
        except (KeyError, TypeError) as exc:
            raise PrivloraError(f"malformed execution plan: {exc}") from None

    @property
    def rounds(self) -> int:
        return sum(step.kind == "private" for step in self.steps)


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
    """Read the plan off a partitioned GraphModule (see ``privlora.passes.partition``)."""
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
            kind = "private" if str(node.target).startswith(ROUND_PREFIX) else "public"
            steps.append(PlanStep(str(node.target), kind, tuple(names[arg] for arg in node.args), result_names))
        elif node.op == "output":
            outputs = tuple(names[value] for value in node.args[0])
        elif not (node.op == "call_function" and node.target is operator.getitem):
            raise PrivloraError(f"unexpected top-level node {node.format_node()} in a partitioned graph")
    return Plan(tuple(inputs), tuple(steps), outputs)


StepRunner = Callable[[PlanStep, Sequence[Any]], Sequence[Any]]


def run_plan(plan: Plan, run_step: StepRunner, inputs: Sequence[Any]) -> tuple[Any, ...]:
    """Execute the plan: ``run_step(step, args)`` returns the step's results in order."""
    if len(inputs) != len(plan.inputs):
        raise PrivloraError(f"the plan takes {len(plan.inputs)} inputs, got {len(inputs)}")
    values = dict(zip(plan.inputs, inputs))
    for step in plan.steps:
        results = run_step(step, [values[name] for name in step.inputs])
        if len(results) != len(step.outputs):
            raise PrivloraError(f"{step.name} returned {len(results)} values, expected {len(step.outputs)}")
        values.update(zip(step.outputs, results))
    return tuple(values[name] for name in plan.outputs)
