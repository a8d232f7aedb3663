"""What is particular to Phi-3 (the conformance suite covers the tiny config with and without
LongRoPE): peft adapters on subsets of the fused projections against peft, LongRoPE decoding past
the original context against transformers' cached decoding, the su alias, and the refused
configurations."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from peft import PeftModel

from conftest import cached_greedy, step_inputs, write_tiny_adapter, write_tiny_llama, write_tiny_phi3
from privlora.errors import AdapterError, UnsupportedModelError
from privlora.models.checkpoint import build_model
from privlora.models.loading import load_model
from privlora.models.step import TorchStep
from privlora.client.generation import GenerationConfig, generate

TOLERANCE = 1e-4
LONGROPE = {"type": "longrope", "short_factor": [1.0 + i / 4 for i in range(8)],
            "long_factor": [2.0 + i for i in range(8)]}


def reference_model(checkpoint):
    return transformers.Phi3ForCausalLM.from_pretrained(str(checkpoint), attn_implementation="eager").eval()


def full_logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids, *step_inputs(input_ids), *model.empty_cache(input_ids.shape[0]))[0]


def rewrite_config(checkpoint, **fields):
    config_file = checkpoint / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **fields}))


@pytest.mark.parametrize("targets", [["qkv_proj"], ["o_proj", "gate_up_proj"], ["down_proj"]])
def test_adapters_on_fused_projections_match_peft(tmp_path, targets):
    base = write_tiny_phi3(tmp_path / "base")
    adapter = write_tiny_adapter(base, tmp_path / "adapter", targets)
    input_ids = torch.randint(0, 160, (1, 9))
    reference = PeftModel.from_pretrained(reference_model(base), str(adapter)).eval()
    with torch.no_grad():
        expected = reference(input_ids).logits
    assert (full_logits(load_model(base, adapter).model, input_ids) - expected).abs().max() < TOLERANCE


def test_an_adapter_for_separate_projections_is_refused(tmp_path):
    """Phi-3 has no q_proj: an adapter trained on a Llama names a Linear it lacks."""
    llama_adapter = write_tiny_adapter(write_tiny_llama(tmp_path / "llama"), tmp_path / "adapter", ["q_proj"])
    with pytest.raises(AdapterError, match=r"targets \['q_proj'\].*qkv_proj"):
        load_model(write_tiny_phi3(tmp_path / "base"), llama_adapter)


def test_longrope_decoding_past_the_original_context_matches_transformers(tmp_path):
    """Phi-3.5-mini's shape: LongRoPE and a sliding window longer than the context (no effect).
    Past original_max_position_embeddings each step uses the long factors for its new keys."""
    checkpoint = write_tiny_phi3(tmp_path / "longrope", rope_scaling=LONGROPE, original_max_position_embeddings=8,
                                 sliding_window=512)
    prompt = [4, 8, 15, 16, 23, 42]
    ours = list(generate(TorchStep(build_model(checkpoint)), prompt, GenerationConfig(max_new_tokens=8)))
    assert ours == cached_greedy(reference_model(checkpoint), prompt, 8)


def test_su_alias_is_longrope(tmp_path):
    checkpoint = write_tiny_phi3(tmp_path / "su", rope_scaling=LONGROPE, original_max_position_embeddings=8)
    rewrite_config(checkpoint, rope_scaling={**LONGROPE, "type": "su"})  # older Phi-3 configs
    input_ids = torch.randint(0, 160, (1, 11))
    with torch.no_grad():
        expected = reference_model(checkpoint)(input_ids).logits
    assert (full_logits(build_model(checkpoint), input_ids) - expected).abs().max() < TOLERANCE


@pytest.mark.parametrize(("fields", "message"), [
    ({"sliding_window": 2047, "max_position_embeddings": 4096}, "sliding_window 2047"),  # Phi-3-mini-4k
    ({"partial_rotary_factor": 0.75}, "partial_rotary_factor"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling type 'dynamic' is not supported for phi3"),
    ({"rope_scaling": {**LONGROPE, "long_factor": [1.0]}}, "short_factor and long_factor need 8 entries"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_unsupported_configs_are_refused(tmp_path, fields, message):
    checkpoint = write_tiny_phi3(tmp_path / "base")
    rewrite_config(checkpoint, **fields)
    with pytest.raises(UnsupportedModelError, match=message):
        build_model(checkpoint)
