"""What is particular to Qwen2 (the conformance suite covers the default tiny config): tied
embeddings with one KV head per head and the rope_scaling types (Llama's rotary embedding) against
transformers' Qwen2ForCausalLM, peft adapters on any subset of the projections against peft, and
the refused sliding-window attention."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from peft import PeftModel

from conftest import step_inputs, write_tiny_adapter, write_tiny_qwen2
from privlora.errors import UnsupportedModelError
from privlora.models.checkpoint import build_model
from privlora.models.loading import load_model

TOLERANCE = 1e-4


def ours(model, input_ids):
    with torch.no_grad():
        return model(input_ids, *step_inputs(input_ids), *model.empty_cache(input_ids.shape[0]))[0]


def test_tied_mha_logits_match_transformers(tmp_path):
    checkpoint = write_tiny_qwen2(tmp_path / "tied-mha", num_key_value_heads=4, tie_word_embeddings=True)
    input_ids = torch.randint(0, 160, (2, 11))
    reference = transformers.Qwen2ForCausalLM.from_pretrained(str(checkpoint), attn_implementation="eager").eval()
    with torch.no_grad():
        expected = reference(input_ids).logits
    assert expected.abs().max() > 1.0
    assert (ours(build_model(checkpoint), input_ids) - expected).abs().max() < TOLERANCE


@pytest.mark.parametrize("rope_scaling", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "dynamic", "factor": 2.0},  # past the context of 8 below
    {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0},
], ids=lambda scaling: scaling["rope_type"])
def test_rope_scaling_matches_transformers(tmp_path, rope_scaling):
    checkpoint = write_tiny_qwen2(tmp_path / "rope", rope_scaling=rope_scaling, max_position_embeddings=8)
    input_ids = torch.randint(0, 160, (1, 11))
    reference = transformers.Qwen2ForCausalLM.from_pretrained(str(checkpoint), attn_implementation="eager").eval()
    with torch.no_grad():
        expected = reference(input_ids).logits
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


def test_sliding_window_is_refused(tmp_path):
    checkpoint = write_tiny_qwen2(tmp_path / "sw", use_sliding_window=True, sliding_window=4)
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["use_sliding_window"]
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        build_model(checkpoint)
