"""What is particular to Llama (the conformance suite covers the default tiny config and the
rope_scaling types): the variants (MHA, MQA, tied embeddings, biases, SmolLM2's shape) and a
left-padded batch against transformers' LlamaForCausalLM, a legacy ``type`` rope_scaling key,
dynamic NTK decoding past the context against transformers' cached decoding, and the refused
configurations."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from conftest import TINY_VARIANTS, cached_greedy, step_inputs, write_tiny_llama
from privlora.errors import UnsupportedModelError
from privlora.models.checkpoint import build_model
from privlora.models.step import TorchStep
from privlora.client.generation import GenerationConfig, generate

TOLERANCE = 1e-4
# The default (GQA) configuration is the conformance suite's.
VARIANTS = {name: overrides for name, overrides in TINY_VARIANTS.items() if overrides}


def reference_logits(checkpoint, input_ids, attention_mask=None):
    model = transformers.LlamaForCausalLM.from_pretrained(str(checkpoint), attn_implementation="eager").eval()
    with torch.no_grad():
        return model(input_ids, attention_mask=attention_mask).logits


def full_logits(model, input_ids):
    positions, mask = step_inputs(input_ids)
    with torch.no_grad():
        return model(input_ids, positions, mask, *model.empty_cache(input_ids.shape[0]))[0]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_logits_match_transformers(tmp_path, variant):
    checkpoint = write_tiny_llama(tmp_path / variant, **VARIANTS[variant])
    input_ids = torch.randint(0, 160, (2, 11))
    ours = full_logits(build_model(checkpoint), input_ids)
    reference = reference_logits(checkpoint, input_ids)
    assert reference.abs().max() > 1.0  # the comparison is not between near-zero tensors
    assert (ours - reference).abs().max() < TOLERANCE


def test_left_padded_batch_matches_transformers(tiny_llama):
    input_ids = torch.randint(1, 160, (2, 7))
    mask = torch.ones_like(input_ids)
    mask[1, :3] = 0  # second row is left-padded
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    model = build_model(tiny_llama)
    with torch.no_grad():
        ours = model(input_ids, positions, mask, *model.empty_cache(2))[0]
    reference = reference_logits(tiny_llama, input_ids, mask)
    real = mask.bool()
    assert (ours[real] - reference[real]).abs().max() < TOLERANCE


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_scaling type 'yarn'"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"model_type": "gpt2"}, "model_type"),
    ],
)
def test_unsupported_configs_are_rejected(tiny_llama, override, message):
    config_file = tiny_llama / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **override}))
    with pytest.raises(UnsupportedModelError, match=message):
        build_model(tiny_llama)


def rewrite_config(checkpoint, **fields):
    config_file = checkpoint / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **fields}))


def test_legacy_rope_scaling_type_key_matches_transformers(tmp_path):
    checkpoint = write_tiny_llama(tmp_path / "legacy")
    rewrite_config(checkpoint, rope_scaling={"type": "linear", "factor": 2.0})  # no rope_type, as older configs
    input_ids = torch.randint(0, 160, (1, 11))
    reference = reference_logits(checkpoint, input_ids)
    assert (reference - reference_logits(write_tiny_llama(tmp_path / "unscaled"), input_ids)).abs().max() > 1e-3
    assert (full_logits(build_model(checkpoint), input_ids) - reference).abs().max() < TOLERANCE


def test_dynamic_rope_decoding_past_the_context_matches_transformers(tmp_path):
    """Past max_position_embeddings, dynamic NTK rescales at every step: each step's keys keep the
    frequencies of their step in the cache, in transformers' cache as in ours."""
    checkpoint = write_tiny_llama(tmp_path / "dynamic", max_position_embeddings=8,
                                  rope_scaling={"rope_type": "dynamic", "factor": 4.0})
    prompt = [4, 8, 15, 16, 23, 42]
    ours = list(generate(TorchStep(build_model(checkpoint)), prompt, GenerationConfig(max_new_tokens=10)))
    reference = transformers.LlamaForCausalLM.from_pretrained(str(checkpoint), attn_implementation="eager").eval()
    assert ours == cached_greedy(reference, prompt, 10)
