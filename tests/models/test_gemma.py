"""What is particular to Gemma (the conformance suite covers the tiny tied config): the
activation transformers picks (``hidden_activation``, else GeLU-tanh whatever ``hidden_act``
says), attention biases and untied embeddings against transformers' GemmaForCausalLM, and the
refused configurations."""

from __future__ import annotations

import json

import pytest
import transformers

from conftest import logits_and_reference, write_tiny_gemma
from privlora.errors import UnsupportedModelError
from privlora.models.checkpoint import build_model

TOLERANCE = 1e-4
VARIANTS = {
    "exact-gelu": dict(hidden_activation="gelu"),
    "hidden-act-ignored": dict(hidden_activation=None, hidden_act="silu"),  # transformers uses GeLU-tanh
    "attention-bias-untied": dict(attention_bias=True, tie_word_embeddings=False),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_logits_match_transformers(tmp_path, variant):
    checkpoint = write_tiny_gemma(tmp_path / variant, **VARIANTS[variant])
    ours, expected = logits_and_reference(checkpoint, transformers.GemmaForCausalLM)
    assert expected.abs().max() > 1.0
    assert (ours - expected).abs().max() < TOLERANCE


@pytest.mark.parametrize(("fields", "message"), [
    ({"hidden_activation": "relu"}, "hidden_activation 'relu'"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling is not supported for gemma"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
])
def test_unsupported_configs_are_refused(tmp_path, fields, message):
    checkpoint = write_tiny_gemma(tmp_path / "base")
    config_file = checkpoint / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **fields}))
    with pytest.raises(UnsupportedModelError, match=message):
        build_model(checkpoint)
