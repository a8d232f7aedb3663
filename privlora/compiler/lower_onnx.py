"""Public lowering: export each public segment to ONNX and check it.

Every segment is exported with opset 17. Dimensions whose size differs between the sample
prefill and decode steps (sequence length, cache length) are dynamic. Each file is checked by
``onnx.checker``, then by ONNX Runtime against torch on both samples.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from torch.fx import GraphModule, Interpreter

from privlora.compiler.frontend import SampleStep
from privlora.compiler.pass_manager import CompileError
from privlora.client.segments import Segment

OPSET = 17
PARITY_TOLERANCE = 1e-4  # max |onnx - torch| / max(1, max |torch|) per output


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int | str, ...]  # a string names a dynamic dimension


@dataclass(frozen=True)
class LoweredSegment:
    name: str
    path: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    op_counts: dict[str, int]
    max_error: float


class _ArgumentRecorder(Interpreter):
    """Runs the partitioned graph and keeps the arguments each submodule call received."""

    def __init__(self, module: GraphModule) -> None:
        super().__init__(module)
        self.arguments: dict[str, tuple[Any, ...]] = {}

    def call_module(self, target, args, kwargs):
        self.arguments[str(target)] = tuple(args)
        return super().call_module(target, args, kwargs)


@torch.no_grad()
def segment_arguments(split: GraphModule, samples: Sequence[SampleStep]) -> list[dict[str, tuple[Any, ...]]]:
    """For each sample step, the arguments of every submodule call."""
    recorded = []
    for sample in samples:
        recorder = _ArgumentRecorder(split)
        recorder.run(*sample.args())
        recorded.append(recorder.arguments)
    return recorded


def _require_tensors(segment: str, role: str, names: Sequence[str], values: Sequence[Any]) -> None:
    """ONNX passes tensors only; partition keeps Python values (dtypes, sizes) inside segments."""
    for name, value in zip(names, values):
        if not isinstance(value, torch.Tensor):
            raise CompileError(f"{segment}: {role} {name} is a {type(value).__name__}, not a tensor "
                               "(only tensors may cross a segment boundary)")


def _specs(names: Sequence[str], per_sample: Sequence[Sequence[torch.Tensor]]) -> tuple[TensorSpec, ...]:
    """Shapes with the dimensions that vary across samples named ``<tensor>_dim<axis>``."""
    specs = []
    for index, name in enumerate(names):
        tensors = [values[index] for values in per_sample]
        shape = tuple(size if all(t.shape[axis] == size for t in tensors) else f"{name}_dim{axis}"
                      for axis, size in enumerate(tensors[0].shape))
        specs.append(TensorSpec(name, str(tensors[0].dtype).removeprefix("torch."), shape))
    return tuple(specs)


def _dynamic_axes(specs: Sequence[TensorSpec]) -> dict[str, dict[int, str]]:
    return {spec.name: {axis: dim for axis, dim in enumerate(spec.shape) if isinstance(dim, str)}
            for spec in specs if any(isinstance(dim, str) for dim in spec.shape)}


def _as_tuple(result: Any) -> tuple[torch.Tensor, ...]:
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)


@torch.no_grad()
def lower_segment(module: GraphModule, name: str, arguments: Sequence[tuple[torch.Tensor, ...]],
                  path: Path) -> LoweredSegment:
    """Export one public segment to ``path`` and check it with onnx.checker and ONNX Runtime."""
    input_names = tuple(node.name for node in module.graph.nodes if node.op == "placeholder")
    expected = [_as_tuple(module(*args)) for args in arguments]
    output_names = tuple(f"out_{i}" for i in range(len(expected[0])))
    _require_tensors(name, "input", input_names, arguments[0])
    _require_tensors(name, "output", output_names, expected[0])
    inputs, outputs = _specs(input_names, arguments), _specs(output_names, expected)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(module, arguments[0], str(path), input_names=list(input_names),
                      output_names=list(output_names), dynamic_axes=_dynamic_axes(inputs + outputs),
                      opset_version=OPSET, do_constant_folding=True)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    segment = Segment(path, input_names)
    max_error, max_relative = 0.0, 0.0
    for args, reference in zip(arguments, expected):
        actual = [torch.from_numpy(out) for out in segment([arg.numpy() for arg in args])]
        for out_name, want, got in zip(output_names, reference, actual):
            if tuple(want.shape) != tuple(got.shape):
                raise CompileError(f"{name}: ONNX output {out_name} has shape {tuple(got.shape)}, torch {tuple(want.shape)}")
            if want.numel() and want.is_floating_point():
                error = (want.double() - got.double()).abs().max().item()
                max_error = max(max_error, error)
                max_relative = max(max_relative, error / max(1.0, want.abs().max().item()))
            elif want.numel() and not torch.equal(want, got):
                raise CompileError(f"{name}: ONNX output {out_name} differs from torch")
    if max_relative > PARITY_TOLERANCE:
        raise CompileError(f"{name}: ONNX Runtime differs from torch by {max_error:.2e} "
                           f"({max_relative:.2e} relative to the output's magnitude)")
    op_counts = dict(Counter(node.op_type for node in model.graph.node).most_common())
    return LoweredSegment(name, path, inputs, outputs, op_counts, max_error)
