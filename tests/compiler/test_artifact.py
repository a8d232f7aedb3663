"""Compile to an artifact and run it: ONNX segments + plain private rounds reproduce the model;
the client bundle holds no private weight; damaged artifacts fail clearly; inspect reports it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import write_tiny_adapter
from support.leakscan import adapter_secrets, find_leaks, public_base
from privlora.cli import main
from privlora.core.artifact import CLIENT, MANIFEST, ArtifactError, load_bundle
from privlora.compiler.driver import compile_artifact
from privlora.compiler.frontend import sample_steps
from privlora.models.loading import load_model
from privlora.models.step import TorchStep
from privlora.local import open_local
from privlora.client.generation import GenerationConfig, generate

TARGETS = ["q_proj", "v_proj", "down_proj"]


def numpy_args(sample):
    return [arg.numpy() for arg in sample.args()]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    from conftest import write_tiny_llama

    root = tmp_path_factory.mktemp("artifact")
    base = write_tiny_llama(root / "base")
    adapter = write_tiny_adapter(base, root / "adapter", TARGETS)
    report = compile_artifact(str(base), adapter, root / "art", backend="reference")
    return base, adapter, report


def test_compiled_artifact_reproduces_the_model(compiled):
    base, adapter, report = compiled
    model = load_model(base, adapter).model
    runner = open_local(report.artifact)
    for sample in sample_steps(model, prompt_length=6, seed=5):
        for want, got in zip(TorchStep(model)(*numpy_args(sample)), runner(*numpy_args(sample))):
            assert want.shape == got.shape
            assert np.abs(want - got).max() <= 1e-4 * max(1.0, np.abs(want).max())
    config = GenerationConfig(max_new_tokens=10)
    assert list(generate(runner, [3, 14, 15], config)) == list(generate(TorchStep(model), [3, 14, 15], config))


def test_report_and_manifest(compiled):
    _, _, report = compiled
    assert (report.sites, report.rounds, report.segments) == (9, 6, 7)  # 3 layers: {q,v} then down
    manifest = json.loads((report.artifact / MANIFEST).read_text())
    assert manifest["format_version"] == 2 and manifest["backend"]["name"] == "reference"
    first = manifest["segments"][0]
    past = next(spec for spec in first["inputs"] if spec["name"] == "past_keys")
    assert past["dtype"] == "float32" and isinstance(past["shape"][3], str)  # dynamic cache length
    assert all(entry["sha256"] and entry["bundle"] in ("client", "server", "ir") for entry in manifest["files"].values())
    listed = set(manifest["files"])
    on_disk = {p.relative_to(report.artifact).as_posix() for b in ("client", "server", "ir")
               for p in (report.artifact / b).rglob("*") if p.is_file()}
    assert listed == on_disk


def test_client_bundle_holds_no_private_weight(compiled):
    base, adapter, report = compiled
    secrets = adapter_secrets(adapter)
    client_files = [p for p in (report.artifact / CLIENT).rglob("*") if p.is_file()]
    assert client_files and find_leaks(client_files, secrets, public_base(base, adapter)) == []
    server_file = report.artifact / "server" / "program.safetensors"
    assert find_leaks([server_file], secrets)  # the scan does find them where they are


def _copy(report, tmp_path):
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(report.artifact, target)
    return target


def test_damaged_artifacts_fail_clearly(compiled, tmp_path):
    _, _, report = compiled
    art = _copy(report, tmp_path)
    segment = art / "client" / "segments" / "public_1.onnx"
    data = bytearray(segment.read_bytes())
    data[len(data) // 2] ^= 0xFF
    segment.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="public_1.onnx is corrupted"):
        load_bundle(art, "client")
    load_bundle(art, "server")  # the server bundle is intact and still loads
    segment.unlink()
    with pytest.raises(ArtifactError, match="public_1.onnx is missing"):
        open_local(art)
    manifest = json.loads((art / MANIFEST).read_text())
    (art / MANIFEST).write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(ArtifactError, match="format version 99"):
        load_bundle(art, "server")
    (art / MANIFEST).write_text("{ truncated")
    with pytest.raises(ArtifactError, match="corrupted"):
        load_bundle(art, "client")
    with pytest.raises(ArtifactError, match="not a privlora artifact"):
        load_bundle(tmp_path, "client")


def test_mismatched_server_weights_are_rejected(compiled, tmp_path):
    _, _, report = compiled
    art = _copy(report, tmp_path)
    other = tmp_path / "other"
    from conftest import write_tiny_llama

    write_tiny_llama(other / "base", seed=4)
    other_report = compile_artifact(str(other / "base"), write_tiny_adapter(other / "base", other / "a", TARGETS, seed=9),
                                    other / "art")
    (art / "server" / "program.safetensors").write_bytes(
        (other_report.artifact / "server" / "program.safetensors").read_bytes())
    with pytest.raises(ArtifactError, match="program.safetensors is corrupted or was replaced"):
        open_local(art)


def test_compile_refuses_to_overwrite_and_cli_reports(compiled, tmp_path, capsys):
    base, adapter, report = compiled
    assert main(["compile", "--base", str(base), "--adapter", str(adapter), "-o", str(report.artifact)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["inspect", str(report.artifact)]) == 0
    text = capsys.readouterr().out
    assert "9 LoRA sites in 6 PLL nodes" in text and "6 client<->server rounds" in text and "public_6" in text
    assert main(["inspect", str(report.artifact), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rounds_per_step"] == 6 and info["bundles"]["server"]["files"] == 1
    assert main(["inspect", str(report.artifact), "--ir"]) == 0
    assert "fuse_pll" in capsys.readouterr().out
    assert main(["inspect", str(report.artifact), "--ir", "fuse_pll"]) == 0
    assert "pll.fused_0_1" in capsys.readouterr().out
    dumps = tmp_path / "dumps"
    assert main(["compile", "--base", str(base), "--adapter", str(adapter), "-o", str(tmp_path / "a2"),
                 "--dump-ir", str(dumps), "--debug"]) == 0
    assert (dumps / "summary.json").is_file() and (dumps / "05-partition.py").is_file()
    (tmp_path / "a2" / "ir" / "03-fuse_pll.txt").write_text("edited by hand")  # the IR is hashed too
    assert main(["inspect", str(tmp_path / "a2"), "--ir", "fuse_pll"]) == 2
    assert "corrupted" in capsys.readouterr().err


@pytest.mark.parametrize("backend, options", [("plain", {}), ("plain", {"protocol": "masked"}), ("ckks", {}),
                                             ("concrete", {})], ids=["plain", "plain-masked", "ckks", "concrete"])
def test_pll_backends_through_the_artifact(compiled, tmp_path, backend, options):
    base, adapter, _ = compiled
    report = compile_artifact(str(base), adapter, tmp_path / backend, backend=backend, backend_options=options)
    manifest = json.loads((report.artifact / MANIFEST).read_text())
    assert manifest["backend"]["name"] == backend
    model = TorchStep(load_model(base, adapter).model)
    base_only = TorchStep(load_model(base).model)
    runner = open_local(report.artifact)
    args = numpy_args(sample_steps(model.model, prompt_length=6, seed=2)[0])
    exact, approx, without = model(*args)[0], runner(*args)[0], base_only(*args)[0]
    again = runner(*args)[0]
    lora_effect = np.linalg.norm(exact - without)
    tolerance = {"plain": 0.1, "ckks": 0.01, "concrete": 0.2}[backend]  # quantised vs approximate-float LoRA
    assert np.linalg.norm(approx - exact) < tolerance * lora_effect
    assert not np.array_equal(approx, again)  # fresh PLL error on every call
    if backend == "ckks":
        config = GenerationConfig(max_new_tokens=8)
        assert list(generate(runner, [3, 14, 15], config)) == list(generate(model, [3, 14, 15], config))
    client_files = [p for p in (report.artifact / CLIENT).rglob("*") if p.is_file()]
    assert find_leaks(client_files, adapter_secrets(adapter), public_base(base, adapter)) == []
