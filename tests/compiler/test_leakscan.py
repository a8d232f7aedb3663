"""The client-bundle leak scan (tests/support/leakscan.py) on real ONNX exports: every backend's client
bundle reports nothing and holds only the crypto.json keys its backend declares, and each detector
finds the leak it is for, planted into a copy of a real client bundle."""

from __future__ import annotations

import base64
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from safetensors.numpy import save_file

from conftest import write_tiny_adapter
from support.leakscan import PublicBase, adapter_secrets, find_leaks, public_base
from privlora.backends import available, load
from privlora.compiler.driver import compile_artifact
from privlora.core.artifact import CLIENT, CRYPTO
from privlora.models.lora import read_adapter


@dataclass(frozen=True)
class Build:
    """A tiny Llama with a rank-8 q+v adapter compiled with the reference backend, and the first
    q_proj site's matrices: rank 8 gives A columns long enough to compare one by one."""

    client: Path
    secrets: dict[str, np.ndarray]
    base: PublicBase
    a: np.ndarray  # [8, 64]
    b: np.ndarray  # [64, 8]
    dw: np.ndarray  # [64, 64]
    w0: np.ndarray  # the public weight of the same module


@pytest.fixture(scope="module")
def build(tiny_build, tmp_path_factory) -> Build:
    root = tmp_path_factory.mktemp("leakscan")
    adapter = write_tiny_adapter(tiny_build.base, root / "adapter", ["q_proj", "v_proj"], rank=8, seed=3)
    artifact = compile_artifact(str(tiny_build.base), adapter, root / "artifact", backend="reference").artifact
    site = next(s for s in read_adapter(adapter).sites if s.module.endswith("q_proj"))
    base = public_base(tiny_build.base, adapter)
    return Build(artifact / CLIENT, adapter_secrets(adapter), base, site.lora_A.numpy(), site.lora_B.numpy(),
                 site.delta_weight().numpy(), base.weights[f"{site.module}.weight"])


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_the_real_client_bundle_reports_nothing(build):
    assert files_under(build.client) and find_leaks(files_under(build.client), build.secrets, build.base) == []


# Each plant writes one leak into a copy of the client bundle and returns the file it wrote.

def merge_dw_into_the_public_weight(client: Path, build: Build) -> Path:
    """q_proj's initializer (W0^T, as torch.onnx stores a Linear) becomes (W0 + dW)^T."""
    for segment in sorted((client / "segments").glob("*.onnx")):
        model = onnx.load(str(segment))
        for tensor in model.graph.initializer:
            if np.array_equal(numpy_helper.to_array(tensor), build.w0.T):
                tensor.CopyFrom(numpy_helper.from_array((build.w0 + build.dw).T.astype(np.float32), tensor.name))
                onnx.save(model, str(segment))
                return segment
    raise AssertionError("no segment holds q_proj's W0^T")


def add_a_scaled_transposed_initializer(client: Path, build: Build) -> Path:
    """A^T as torch.onnx would store it, times 0.37 so that no byte pattern matches."""
    segment = client / "segments" / "public_1.onnx"
    model = onnx.load(str(segment))
    model.graph.initializer.append(numpy_helper.from_array((0.37 * build.a.T).astype(np.float32), "lora_a_t"))
    onnx.save(model, str(segment))
    return segment


def add_a_constant_with_a_scale_per_input_channel(client: Path, build: Build) -> Path:
    """A Constant node holding A^T with one factor per row (per input channel of A)."""
    segment = client / "segments" / "public_2.onnx"
    model = onnx.load(str(segment))
    factors = np.linspace(0.5, 3.0, build.a.shape[1])[:, None]
    value = numpy_helper.from_array((build.a.T * factors).astype(np.float32), "lora_a_value")
    model.graph.node.append(helper.make_node("Constant", [], ["lora_a_const"], value=value))
    onnx.save(model, str(segment))
    return segment


def write_a_into_crypto_json(client: Path, build: Build) -> Path:
    crypto = client.parent / CRYPTO
    crypto.write_text(json.dumps({**json.loads(crypto.read_text()), "lora_A": build.a.tolist()}))
    return crypto


def write_b_columns_as_base64_into_crypto_json(client: Path, build: Build) -> Path:
    crypto = client.parent / CRYPTO
    blob = base64.b64encode(build.b.T.astype("<f4").tobytes()).decode()
    crypto.write_text(json.dumps({**json.loads(crypto.read_text()), "cache": blob}))
    return crypto


def write_int8_quantised_a_rows(client: Path, build: Build) -> Path:
    """round(row / max|row| * 127) as int8, after a 13-byte header (no alignment)."""
    path = client / "calibration.bin"
    rows = np.round(build.a / np.abs(build.a).max(axis=1, keepdims=True) * 127).astype(np.int8)
    path.write_bytes(b"privlora-cal\n" + rows.tobytes())
    return path


def write_float16_dw(client: Path, build: Build) -> Path:
    path = client / "delta.bin"
    path.write_bytes(build.dw.astype("<f2").tobytes())
    return path


def write_transposed_float64_a(client: Path, build: Build) -> Path:
    path = client / "a_t.bin"
    path.write_bytes(build.a.T.astype("<f8").tobytes())
    return path


def save_dw_quantised_per_row_as_npy(client: Path, build: Build) -> Path:
    """int8 rows of dW over 1.5 max|row|: neither the values nor a byte pattern of the scan's."""
    path = client / "delta.npy"
    scale = 1.5 * np.abs(build.dw).max(axis=1, keepdims=True)
    np.save(path, np.round(build.dw / scale * 127).astype(np.int8))
    return path


def save_b_with_a_factor_per_column_as_safetensors(client: Path, build: Build) -> Path:
    path = client / "b.safetensors"
    factors = np.array([0.3, 2.0, 0.9, 1.7, 0.6, 1.1, 2.5, 0.8])
    save_file({"b": (build.b * factors).astype(np.float16)}, str(path))
    return path


PLANTS: list[tuple[Callable[[Path, Build], Path], set[str]]] = [
    (merge_dw_into_the_public_weight, {"merged"}),
    (add_a_scaled_transposed_initializer, {"vector"}),
    (add_a_constant_with_a_scale_per_input_channel, {"vector"}),
    (write_a_into_crypto_json, {"vector"}),
    (write_b_columns_as_base64_into_crypto_json, {"bytes"}),
    (write_int8_quantised_a_rows, {"bytes"}),
    (write_float16_dw, {"bytes"}),
    (write_transposed_float64_a, {"bytes"}),
    (save_dw_quantised_per_row_as_npy, {"vector", "merged"}),  # 64 x 64: q_proj's shape, not its W0
    (save_b_with_a_factor_per_column_as_safetensors, {"vector"}),
]


@pytest.mark.parametrize("plant, detectors", PLANTS, ids=[plant.__name__ for plant, _ in PLANTS])
def test_each_detector_finds_its_planted_leak(build, tmp_path, plant, detectors):
    client = tmp_path / CLIENT
    shutil.copytree(build.client, client)
    planted = plant(client, build)
    leaks = find_leaks(files_under(client), build.secrets, build.base)
    assert leaks and {leak.split(":")[0] for leak in leaks} == detectors, leaks
    assert all(str(planted) in leak for leak in leaks), leaks


@pytest.mark.parametrize("backend", available())
def test_every_backends_client_bundle_reports_nothing(tiny_build, backend):
    client = tiny_build.artifact(backend) / CLIENT
    secrets, base = adapter_secrets(tiny_build.adapter), public_base(tiny_build.base, tiny_build.adapter)
    assert find_leaks(files_under(client), secrets, base) == []


def undeclared_keys(crypto: Path, declared: frozenset[str]) -> set[str]:
    return set(json.loads(crypto.read_text())) - declared


@pytest.mark.parametrize("backend", available())
def test_crypto_json_holds_only_the_keys_its_backend_declares(tiny_build, backend):
    assert undeclared_keys(tiny_build.artifact(backend) / CRYPTO, load(backend).CLIENT_PARAMS) == set()


def test_an_undeclared_crypto_key_is_caught(tiny_build, tmp_path):
    crypto = tmp_path / "crypto.json"
    params = json.loads((tiny_build.artifact("plain") / CRYPTO).read_text())
    crypto.write_text(json.dumps({**params, "out_scale_debug": [1.0, 2.0]}))
    assert undeclared_keys(crypto, load("plain").CLIENT_PARAMS) == {"out_scale_debug"}
