"""What is particular to ChatGLM2 (the conformance suite covers the rest): THUDM's checkpoint
format, written down in ``chatglm2_reference.thudm_checkpoint_shapes`` and checked against the
published chatglm2-6b index; privlora's loader expecting exactly those names; such checkpoints
(safetensors and PyTorch bin) giving THUDM's logits; peft adapters on THUDM's module names;
describe() under ChatGLM2's config field names; ``privlora prepare``; the refused variants."""

from __future__ import annotations

import math

import pytest
import torch

from chatglm2_reference import (INV_FREQ, TINY, save_thudm_checkpoint, thudm_checkpoint, thudm_checkpoint_shapes,
                                thudm_forward, write_chatglm2_adapter, write_tiny_chatglm2)
from conftest import step_inputs
from privlora.cli import main
from privlora.errors import UnsupportedModelError
from privlora.models.checkpoint import build_model
from privlora.models.loading import load_model
from privlora.models.registry import architecture, describe

# THUDM/chatglm2-6b's config.json (the fields that size its tensors).
CHATGLM2_6B = {
    "model_type": "chatglm", "num_layers": 28, "hidden_size": 4096, "ffn_hidden_size": 13696, "kv_channels": 128,
    "num_attention_heads": 32, "multi_query_attention": True, "multi_query_group_num": 2,
    "padded_vocab_size": 65024, "seq_length": 32768, "layernorm_epsilon": 1e-5, "rmsnorm": True,
    "add_qkv_bias": True, "add_bias_linear": False, "post_layer_norm": True, "original_rope": True,
    "apply_residual_connection_post_layernorm": False, "torch_dtype": "float16",
}
# "total_size" of THUDM/chatglm2-6b's pytorch_model.bin.index.json: every tensor in float16.
CHATGLM2_6B_TOTAL_SIZE = 12487168064

# Tiny variants: THUDM's layout, one bias-free multi-head, one with a single key/value group.
VARIANTS = {
    "tiny": {},
    "mha-no-qkv-bias": {"multi_query_attention": False, "add_qkv_bias": False},
    "one-kv-group": {"multi_query_group_num": 1},
}


def test_the_written_down_format_is_chatglm2_6b_s_published_index():
    shapes = thudm_checkpoint_shapes(CHATGLM2_6B)
    assert len(shapes) == 28 * 7 + 4
    assert 2 * sum(math.prod(shape) for shape in shapes.values()) == CHATGLM2_6B_TOTAL_SIZE
    assert shapes["transformer.embedding.word_embeddings.weight"] == (65024, 4096)
    assert shapes["transformer.rotary_pos_emb.inv_freq"] == (32,)
    assert shapes["transformer.encoder.layers.27.self_attention.query_key_value.weight"] == (4608, 4096)
    assert shapes["transformer.encoder.layers.27.self_attention.query_key_value.bias"] == (4608,)
    assert shapes["transformer.encoder.layers.0.self_attention.dense.weight"] == (4096, 4096)
    assert shapes["transformer.encoder.layers.0.mlp.dense_h_to_4h.weight"] == (27392, 4096)
    assert shapes["transformer.encoder.layers.0.mlp.dense_4h_to_h.weight"] == (4096, 13696)
    assert shapes["transformer.output_layer.weight"] == (65024, 4096)


@pytest.mark.parametrize("overrides", VARIANTS.values(), ids=VARIANTS.keys())
def test_the_loader_expects_exactly_thudm_s_names_and_shapes(overrides):
    config = {**TINY, **overrides}
    literal = thudm_checkpoint_shapes(config)
    arch = architecture("chatglm")
    model = arch.build(config)
    kept = arch.adapt_state_dict(model, thudm_checkpoint(config))
    assert set(literal) - set(kept) == {INV_FREQ}  # only the recomputed rotary buffer is dropped
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    assert expected == {name: literal[name] for name in kept}


@pytest.mark.parametrize(("overrides", "bin_format"), [({}, False), ({}, True),
                                                       (VARIANTS["mha-no-qkv-bias"], False)],
                         ids=["safetensors", "bin", "mha-no-qkv-bias"])
def test_a_thudm_checkpoint_loads_and_gives_thudm_s_logits(tmp_path, overrides, bin_format):
    config = {**TINY, **overrides}
    state = thudm_checkpoint(config)
    base = save_thudm_checkpoint(tmp_path / "glm", config, state, bin_format=bin_format)
    assert (base / "pytorch_model.bin").exists() == bin_format
    model = build_model(base)

    loaded = model.state_dict()
    assert set(loaded) == set(state) - {INV_FREQ}
    for name in loaded:
        assert torch.equal(loaded[name], state[name]), name
    assert torch.allclose(dict(model.named_buffers())[INV_FREQ], state[INV_FREQ], rtol=1e-6, atol=0)

    input_ids = torch.randint(0, 160, (2, 10), generator=torch.Generator().manual_seed(0))
    expected = thudm_forward(config, state, input_ids)
    with torch.no_grad():
        ours = model(input_ids, *step_inputs(input_ids), *model.empty_cache(2))[0]
    assert expected.shape == ours.shape == (2, 10, 160)
    assert expected.abs().max() > 1.0
    assert (ours - expected).abs().max() < 1e-4


def test_every_checkpoint_tensor_moves_the_reference_logits():
    """Control: the reference reads each written-down tensor, so the comparison above cannot pass
    with a weight that the reference ignores (inv_freq is recomputed, as in THUDM's code)."""
    state = thudm_checkpoint(TINY)
    input_ids = torch.randint(0, 160, (1, 8), generator=torch.Generator().manual_seed(0))
    expected = thudm_forward(TINY, state, input_ids)
    noise = torch.Generator().manual_seed(1)
    for name, tensor in state.items():
        changed = thudm_forward(TINY, {**state, name: tensor + 0.3 * torch.randn(tensor.shape, generator=noise)},
                                input_ids)
        assert ((changed - expected).abs().max() > 1e-3) == (name != INV_FREQ), name


def test_adapter_attaches_by_thudm_module_names(tmp_path):
    base = write_tiny_chatglm2(tmp_path / "glm")
    loaded = load_model(base, write_chatglm2_adapter(base, tmp_path / "adapter", ["query_key_value"]))
    assert loaded.lora_sites == [f"transformer.encoder.layers.{i}.self_attention.query_key_value" for i in range(2)]


def test_describe_reads_chatglm2_field_names():
    without_mqa = {**TINY, "multi_query_attention": False}
    del without_mqa["seq_length"]
    shape = describe(without_mqa)
    assert (shape.kv_heads, shape.context_length) == (4, 2048)  # one KV head per head; THUDM's default length


def test_prepare_prints_the_shape(tmp_path, capsys):
    base = write_tiny_chatglm2(tmp_path / "glm")
    assert main(["prepare", "--base", str(base)]) == 0
    assert "architecture chatglm: 2 layers, hidden 64, 4 heads / 2 KV heads, head dim 8, vocab 160, context 256" \
        in capsys.readouterr().out


def test_unsupported_variants_are_refused(tmp_path):
    base = write_tiny_chatglm2(tmp_path / "bias", add_bias_linear=True)  # THUDM's layout, with every bias
    with pytest.raises(UnsupportedModelError, match="add_bias_linear"):
        build_model(base)
