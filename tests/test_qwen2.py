"""Qwen2, the second Hugging Face family: parity with transformers' Qwen2ForCausalLM and with
peft adapters on any subset of the projections, and the same compile + secure generation
pipeline as Llama, with no architecture-specific code outside privlora/models."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from peft import PeftModel

from conftest import step_inputs, write_tiny_adapter, write_tiny_qwen2
from privlora.compiler.driver import compile_artifact
from privlora.errors import UnsupportedModelError
from privlora.models.checkpoint import build_model
from privlora.models.loading import load_model
from privlora.runtime.client import open_local
from privlora.runtime.generation import GenerationConfig, generate

TOLERANCE = 1e-4
VARIANTS = {"gqa": {}, "tied-mha": dict(num_key_value_heads=4, tie_word_embeddings=True)}


def ours(model, input_ids):
    with torch.no_grad():
        return model(input_ids, *step_inputs(input_ids), *model.empty_cache(input_ids.shape[0]))[0]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(tmp_path, variant):
    checkpoint = write_tiny_qwen2(tmp_path / variant, **VARIANTS[variant])
    input_ids = torch.randint(0, 160, (2, 11))
    reference = transformers.Qwen2ForCausalLM.from_pretrained(str(checkpoint), attn_implementation="eager").eval()
    with torch.no_grad():
        expected = reference(input_ids).logits
    assert expected.abs().max() > 1.0
    assert (ours(build_model(checkpoint), input_ids) - expected).abs().max() < TOLERANCE


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["k_proj", "o_proj", "gate_proj"], ["up_proj", "down_proj"],
                                     ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]])
def test_adapters_match_peft(tmp_path, targets):
    base = write_tiny_qwen2(tmp_path / "base")
    adapter = write_tiny_adapter(base, tmp_path / "adapter", targets)
    input_ids = torch.randint(0, 160, (1, 9))
    reference = PeftModel.from_pretrained(
        transformers.Qwen2ForCausalLM.from_pretrained(str(base), attn_implementation="eager"), str(adapter)).eval()
    with torch.no_grad():
        expected = reference(input_ids).logits
    assert (ours(load_model(base, adapter).model, input_ids) - expected).abs().max() < TOLERANCE


def test_compiles_and_generates_securely(tmp_path):
    base = write_tiny_qwen2(tmp_path / "base")
    adapter = write_tiny_adapter(base, tmp_path / "adapter", ["q_proj", "v_proj", "down_proj"])
    report = compile_artifact(str(base), adapter, tmp_path / "artifact", backend="ckks")
    assert (report.sites, report.rounds) == (9, 6)
    config = GenerationConfig(max_new_tokens=6)
    model = load_model(base, adapter).model
    assert list(generate(open_local(report.artifact), [4, 8, 15, 16], config)) == list(generate(model, [4, 8, 15, 16], config))


def test_sliding_window_is_refused(tmp_path):
    checkpoint = write_tiny_qwen2(tmp_path / "sw", use_sliding_window=True, sliding_window=4)
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["use_sliding_window"]
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        build_model(checkpoint)
