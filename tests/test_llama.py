"""The traceable Llama definition against transformers' LlamaForCausalLM on tiny random configs."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from conftest import TINY_VARIANTS, step_inputs, write_tiny_llama
from privlora.errors import UnsupportedModelError
from privlora.models.checkpoint import build_model

TOLERANCE = 1e-4


def reference_logits(checkpoint, input_ids, attention_mask=None):
    model = transformers.LlamaForCausalLM.from_pretrained(str(checkpoint), attn_implementation="eager").eval()
    with torch.no_grad():
        return model(input_ids, attention_mask=attention_mask).logits


def full_logits(model, input_ids):
    positions, mask = step_inputs(input_ids)
    with torch.no_grad():
        return model(input_ids, positions, mask, *model.empty_cache(input_ids.shape[0]))[0]


@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_logits_match_transformers(tmp_path, variant):
    checkpoint = write_tiny_llama(tmp_path / variant, **TINY_VARIANTS[variant])
    input_ids = torch.randint(0, 160, (2, 11))
    ours = full_logits(build_model(checkpoint), input_ids)
    reference = reference_logits(checkpoint, input_ids)
    assert reference.abs().max() > 1.0  # the comparison is not between near-zero tensors
    assert (ours - reference).abs().max() < TOLERANCE


@pytest.mark.parametrize("variant", ["gqa", "mqa-bias"])
def test_cached_decode_equals_recomputation(tmp_path, variant):
    model = build_model(write_tiny_llama(tmp_path / variant, **TINY_VARIANTS[variant]))
    input_ids = torch.randint(0, 160, (1, 9))
    expected = full_logits(model, input_ids)
    with torch.no_grad():
        keys, values = model.empty_cache(1)
        prefix = input_ids[:, :5]
        logits, keys, values = model(prefix, *step_inputs(prefix), keys, values)
        steps = [logits]
        for position in range(5, 9):
            token = input_ids[:, position : position + 1]
            logits, keys, values = model(token, *step_inputs(token, position), keys, values)
            steps.append(logits)
    assert keys.shape == (3, 1, TINY_VARIANTS[variant].get("num_key_value_heads", 2), 9, 16)
    assert (torch.cat(steps, dim=1) - expected).abs().max() < TOLERANCE


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


def test_symbolic_trace_covers_prefill_and_decode(tiny_llama):
    model = build_model(tiny_llama)
    graph_module = torch.fx.symbolic_trace(model)
    ops = {node.op for node in graph_module.graph.nodes}
    assert ops <= {"placeholder", "call_module", "call_function", "call_method", "get_attr", "output"}
    input_ids = torch.randint(0, 160, (1, 6))
    with torch.no_grad():
        prefill_eager = model(input_ids, *step_inputs(input_ids), *model.empty_cache(1))
        prefill_traced = graph_module(input_ids, *step_inputs(input_ids), *model.empty_cache(1))
        token = torch.tensor([[7]])
        decode_eager = model(token, *step_inputs(token, 6), *prefill_eager[1:])
        decode_traced = graph_module(token, *step_inputs(token, 6), *prefill_traced[1:])
    for eager, traced in zip(prefill_eager + decode_eager, prefill_traced + decode_traced):
        assert torch.equal(eager, traced)
    placeholders = [n.name for n in graph_module.graph.nodes if n.op == "placeholder"]
    assert placeholders == ["input_ids", "position_ids", "attention_mask", "past_keys", "past_values"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"model_type": "gpt2"}, "model_type"),
    ],
)
def test_unsupported_configs_are_rejected(tiny_llama, override, message):
    config_file = tiny_llama / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **override}))
    with pytest.raises(UnsupportedModelError, match=message):
        build_model(tiny_llama)
