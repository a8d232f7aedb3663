"""The execution plan: the partitioned graph's top level as data.

The runtime does not need torch.fx. It needs the order of the steps (public segments and
private rounds) and, for each step, which named values it reads and writes. ``Plan`` is that
information. The compiler reads it off the partitioned graph (``privlora.compiler.plan_builder``) and
serialises it into the manifest; :func:`run_plan` executes it with any step implementation (ONNX
Runtime sessions for public segments, a backend for rounds).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from privlora.errors import PrivloraError

PUBLIC, PRIVATE = "public", "private"


@dataclass(frozen=True)
class PlanStep:
    name: str  # "public_3" or "round_2"
    kind: str  # PUBLIC or PRIVATE
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
        return sum(step.kind == PRIVATE for step in self.steps)


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
