"""Scan files for private adapter weights: raw float32 bytes and near-equal ONNX initializers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper


def _onnx_arrays(path: Path) -> list[np.ndarray]:
    model = onnx.load(str(path))
    arrays = [numpy_helper.to_array(init) for init in model.graph.initializer]
    for node in model.graph.node:  # constants folded into Constant nodes
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                arrays.append(numpy_helper.to_array(attribute.t))
    return arrays


def _near(candidate: np.ndarray, secret: np.ndarray) -> bool:
    for shaped in (secret, secret.T):
        if candidate.shape == shaped.shape and np.allclose(candidate, shaped, rtol=1e-3, atol=1e-4 * np.abs(shaped).max()):
            return True
    return False


def find_leaks(files: list[Path], secrets: dict[str, np.ndarray]) -> list[str]:
    """Descriptions of every place a secret tensor (or a row of it) appears in ``files``."""
    leaks = []
    rows = {name: [row.astype(np.float32).tobytes() for row in np.atleast_2d(t)[:4]] for name, t in secrets.items()}
    for path in files:
        data = path.read_bytes()
        for name, needles in rows.items():
            if any(needle in data for needle in needles):
                leaks.append(f"{path}: raw bytes of {name}")
        if path.suffix == ".onnx":
            for array in _onnx_arrays(path):
                leaks.extend(f"{path}: initializer close to {name}" for name, secret in secrets.items()
                             if _near(array.astype(np.float64), secret.astype(np.float64)))
    return leaks
