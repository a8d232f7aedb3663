"""What is particular to Mistral (the conformance suite covers a config without a sliding window):
a window at least as long as the context is plain causal attention, against transformers'
MistralForCausalLM, and the refused configurations (a real window, rope_scaling)."""

from __future__ import annotations

import json

import pytest
import transformers

from conftest import logits_and_reference, write_tiny_mistral
from privlora.errors import UnsupportedModelError
from privlora.models.checkpoint import build_model, read_config
from privlora.models.registry import describe

TOLERANCE = 1e-4


def test_window_as_long_as_the_context_matches_transformers(tmp_path):
    checkpoint = write_tiny_mistral(tmp_path / "window", sliding_window=256)  # = max_position_embeddings
    ours, expected = logits_and_reference(checkpoint, transformers.MistralForCausalLM)
    assert (ours - expected).abs().max() < TOLERANCE


@pytest.mark.parametrize(("fields", "message"), [
    ({"sliding_window": 4}, "sliding_window 4 .shorter than the context length 256"),
    ({"sliding_window": 4096, "max_position_embeddings": 32768}, "sliding_window 4096"),  # Mistral 7B v0.1
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling is not supported for mistral"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_unsupported_configs_are_refused(tmp_path, fields, message):
    checkpoint = write_tiny_mistral(tmp_path / "base")
    config_file = checkpoint / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **fields}))
    with pytest.raises(UnsupportedModelError, match=message):
        build_model(checkpoint)
    with pytest.raises(UnsupportedModelError, match=message):
        describe(read_config(checkpoint))


def test_omitted_window_is_transformers_default(tmp_path):
    """MistralConfig's default window (4096) applies when config.json has no sliding_window."""
    config = {key: value for key, value in read_config(write_tiny_mistral(tmp_path / "base")).items()
              if key != "sliding_window"}
    assert describe(config).context_length == 256  # 4096 >= 256: no window in reach
    with pytest.raises(UnsupportedModelError, match="sliding_window 4096"):
        describe({**config, "max_position_embeddings": 8192})
