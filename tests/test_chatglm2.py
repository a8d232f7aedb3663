"""ChatGLM2 on tiny random-weight checkpoints in THUDM's format: our definition against a
literal re-implementation of THUDM's forward pass, KV-cache decode against recomputation, the
traced graph against eager, safetensors and PyTorch bin loading, peft adapters on
query_key_value, and compile + secure generation through the same pipeline as Llama."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

from conftest import step_inputs
from privlora.compiler.driver import compile_artifact
from privlora.compiler.frontend import trace
from privlora.errors import UnsupportedModelError
from privlora.models import chatglm2
from privlora.models.checkpoint import build_model
from privlora.models.loading import load_model
from privlora.runtime.client import open_local
from privlora.runtime.generation import GenerationConfig, generate

TINY = {"model_type": "chatglm", "num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 96, "kv_channels": 16,
        "num_attention_heads": 4, "multi_query_attention": True, "multi_query_group_num": 2,
        "padded_vocab_size": 160, "layernorm_epsilon": 1e-5, "rmsnorm": True, "add_qkv_bias": True,
        "add_bias_linear": False, "post_layer_norm": True, "original_rope": True,
        "apply_residual_connection_post_layernorm": False, "torch_dtype": "float32"}


def write_tiny_chatglm2(directory: Path, bin_format: bool = False, seed: int = 0, **overrides) -> Path:
    """A THUDM-format checkpoint: config.json + THUDM parameter names (rotary inv_freq included)."""
    torch.manual_seed(seed)
    config = {**TINY, **overrides}
    model = chatglm2.build(config)
    state = {name: (t.normal_(0, 0.1) * 3).contiguous() for name, t in model.state_dict().items()}
    state["transformer.rotary_pos_emb.inv_freq"] = model.transformer.rotary_pos_emb.inv_freq.clone()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    if bin_format:
        torch.save(state, directory / "pytorch_model.bin")
    else:
        save_file(state, str(directory / "model.safetensors"))
    return directory


def thudm_reference(model: chatglm2.ChatGLM2ForCausalLM, input_ids: torch.Tensor) -> torch.Tensor:
    """THUDM's modeling_chatglm.py forward, transcribed: sequence-first tensors, a [sq, rot/2, 2]
    rope cache, interleaved rotation, expand-based multi-query attention, causal SDPA."""
    c, t = model.config, model.transformer
    sq = input_ids.shape[1]
    n_elem = c.head_dim // 2
    theta = 1.0 / (10000 ** (torch.arange(0, n_elem, 2, dtype=torch.float) / n_elem))
    idx_theta = torch.outer(torch.arange(sq, dtype=torch.float), theta)
    rope_cache = torch.stack([torch.cos(idx_theta), torch.sin(idx_theta)], dim=-1)  # [sq, n_elem/2, 2]

    def rope(x):  # x: [sq, b, np, hn]
        rot_dim = rope_cache.shape[-2] * 2
        x, x_pass = x[..., :rot_dim], x[..., rot_dim:]
        xshaped = x.reshape(sq, -1, x.size(2), rot_dim // 2, 2)
        cache = rope_cache.view(sq, -1, 1, xshaped.size(3), 2)
        out = torch.stack([xshaped[..., 0] * cache[..., 0] - xshaped[..., 1] * cache[..., 1],
                           xshaped[..., 1] * cache[..., 0] + xshaped[..., 0] * cache[..., 1]], -1).flatten(3)
        return torch.cat((out, x_pass), dim=-1)

    def rms(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.layernorm_epsilon))

    hidden = t.embedding.word_embeddings(input_ids).transpose(0, 1)  # [sq, b, h]
    for layer in t.encoder.layers:
        ln = rms(hidden, layer.input_layernorm.weight)
        mixed = layer.self_attention.query_key_value(ln)
        q, k, v = mixed.split([c.num_attention_heads * c.head_dim, c.kv_groups * c.head_dim,
                               c.kv_groups * c.head_dim], dim=-1)
        q = q.view(sq, -1, c.num_attention_heads, c.head_dim)
        k = k.view(sq, -1, c.kv_groups, c.head_dim)
        v = v.view(sq, -1, c.kv_groups, c.head_dim)
        q, k = rope(q), rope(k)
        repeat = c.num_attention_heads // c.kv_groups
        k = k.unsqueeze(-2).expand(-1, -1, -1, repeat, -1).reshape(sq, -1, c.num_attention_heads, c.head_dim)
        v = v.unsqueeze(-2).expand(-1, -1, -1, repeat, -1).reshape(sq, -1, c.num_attention_heads, c.head_dim)
        q, k, v = (x.permute(1, 2, 0, 3) for x in (q, k, v))
        context = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        context = context.permute(2, 0, 1, 3).reshape(sq, -1, c.num_attention_heads * c.head_dim)
        hidden = hidden + layer.self_attention.dense(context)
        ln = rms(hidden, layer.post_attention_layernorm.weight)
        gate, up = layer.mlp.dense_h_to_4h(ln).chunk(2, dim=-1)
        hidden = hidden + layer.mlp.dense_4h_to_h(torch.nn.functional.silu(gate) * up)
    hidden = rms(hidden, t.encoder.final_layernorm.weight)
    return t.output_layer(hidden).transpose(0, 1)


def full_logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids, *step_inputs(input_ids), *model.empty_cache(input_ids.shape[0]))[0]


@pytest.mark.parametrize("bin_format", [False, True], ids=["safetensors", "bin"])
def test_matches_thudm_forward(tmp_path, bin_format):
    model = build_model(write_tiny_chatglm2(tmp_path / "glm", bin_format=bin_format))
    input_ids = torch.randint(0, 160, (2, 10))
    with torch.no_grad():
        expected = thudm_reference(model, input_ids)
    assert expected.abs().max() > 1.0
    assert (full_logits(model, input_ids) - expected).abs().max() < 1e-4


def test_cached_decode_equals_recomputation_and_trace_equals_eager(tmp_path):
    model = build_model(write_tiny_chatglm2(tmp_path / "glm"))
    input_ids = torch.randint(0, 160, (1, 8))
    expected = full_logits(model, input_ids)
    traced = trace(model)
    with torch.no_grad():
        keys, values = model.empty_cache(1)
        assert keys.shape == (2, 1, 2, 0, 16)
        logits, keys, values = model(input_ids[:, :5], *step_inputs(input_ids[:, :5]), keys, values)
        steps = [logits]
        for position in range(5, 8):
            token = input_ids[:, position:position + 1]
            logits, keys, values = model(token, *step_inputs(token, position), keys, values)
            steps.append(logits)
        traced_logits = traced(input_ids, *step_inputs(input_ids), *model.empty_cache(1))[0]
    assert (torch.cat(steps, dim=1) - expected).abs().max() < 1e-4
    assert (traced_logits - expected).abs().max() < 1e-5


def write_adapter(base: Path, directory: Path) -> Path:
    torch.manual_seed(1)
    model = build_model(base)
    model.config = {"model_type": "chatglm"}  # peft reads a HF-style config dict; the adapter is all we keep
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["query_key_value"],
                                                  init_lora_weights=False))
    peft_model.save_pretrained(str(directory), safe_serialization=True)
    return directory


def test_query_key_value_adapter_compiles_and_generates_securely(tmp_path):
    base = write_tiny_chatglm2(tmp_path / "glm")
    adapter = write_adapter(base, tmp_path / "adapter")
    loaded = load_model(base, adapter)
    assert loaded.lora_sites == [f"transformer.encoder.layers.{i}.self_attention.query_key_value" for i in range(2)]
    assert (full_logits(loaded.model, torch.tensor([[3, 4, 5]])) - full_logits(build_model(base), torch.tensor([[3, 4, 5]]))).abs().max() > 1e-3
    report = compile_artifact(str(base), adapter, tmp_path / "artifact", backend="ckks")
    assert (report.sites, report.rounds) == (2, 2)
    config = GenerationConfig(max_new_tokens=6)
    secure = list(generate(open_local(report.artifact), [7, 8, 9, 10], config))
    assert secure == list(generate(loaded.model, [7, 8, 9, 10], config))


def test_unsupported_variants_are_refused(tmp_path):
    with pytest.raises(UnsupportedModelError, match="add_bias_linear"):
        build_model(write_tiny_chatglm2(tmp_path / "bias", add_bias_linear=True))
