"""ONNX Runtime sessions for the public segments: CUDA when available, tuned CPU otherwise."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort


def providers() -> list[str]:
    """``CUDAExecutionProvider`` first when this onnxruntime build has it, CPU always."""
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def session_options() -> ort.SessionOptions:
    """All graph optimisations; one intra-op thread per core; sequential (segments are chains).

    A model is dozens of sessions run one after another; a session's idle pool threads must not
    spin, or they steal the cores from the session that is running (measured: 8x slower)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = os.cpu_count() or 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class Segment:
    """One public segment: runs an ONNX file on numpy arrays in the segment's argument order."""

    def __init__(self, path: Path, input_names: tuple[str, ...]) -> None:
        self.session = ort.InferenceSession(str(path), session_options(), providers=providers())
        self.input_names = input_names
        self.used = {i.name for i in self.session.get_inputs()}  # the exporter drops unused inputs

    def __call__(self, args: list[np.ndarray]) -> list[np.ndarray]:
        feed = {name: np.ascontiguousarray(value) for name, value in zip(self.input_names, args) if name in self.used}
        return self.session.run(None, feed)
