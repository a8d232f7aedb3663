"""Local checkpoint directories: formats that load, and files that fail with a clear message."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import step_inputs
from privlora.errors import PrivloraError, UnsupportedModelError
from privlora.models.checkpoint import build_model
from privlora.models.loading import resolve_base


def logits(model):
    input_ids = torch.arange(5).unsqueeze(0)
    with torch.no_grad():
        return model(input_ids, *step_inputs(input_ids), *model.empty_cache(1))[0]


def test_sharded_and_bin_checkpoints_load_the_same_weights(tiny_llama, tmp_path):
    expected = logits(build_model(tiny_llama))
    state = load_file(str(tiny_llama / "model.safetensors"))
    names = sorted(state)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((tiny_llama / "config.json").read_text())
    weight_map = {}
    for index, half in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        shard = f"model-0000{index + 1}-of-00002.safetensors"
        save_file({name: state[name] for name in half}, str(sharded / shard))
        weight_map.update({name: shard for name in half})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert torch.equal(logits(build_model(sharded)), expected)

    as_bin = tmp_path / "bin"
    as_bin.mkdir()
    (as_bin / "config.json").write_text((tiny_llama / "config.json").read_text())
    torch.save({name: tensor.to(torch.bfloat16) for name, tensor in state.items()}, as_bin / "pytorch_model.bin")
    assert (logits(build_model(as_bin)) - expected).abs().max() < 0.5  # bf16 weights, upcast to fp32


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(PrivloraError, match="never downloads"):
        resolve_base(tmp_path / "nowhere")
    with pytest.raises(PrivloraError, match="never downloads"):
        resolve_base("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_corrupted_and_mismatched_weights(tiny_llama):
    weights = tiny_llama / "model.safetensors"
    state = {name: tensor.clone() for name, tensor in load_file(str(weights)).items()}  # no mmap
    state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(state, str(weights))
    with pytest.raises(UnsupportedModelError, match="up_proj.weight has shape"):
        build_model(tiny_llama)
    del state["model.layers.0.mlp.up_proj.weight"]
    save_file(state, str(weights))
    with pytest.raises(UnsupportedModelError, match="missing .*up_proj"):
        build_model(tiny_llama)
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(PrivloraError, match="cannot read weights"):
        build_model(tiny_llama)
    weights.unlink()
    with pytest.raises(PrivloraError, match="has no model.safetensors"):
        build_model(tiny_llama)
