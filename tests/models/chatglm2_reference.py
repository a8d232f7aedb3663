"""ChatGLM2's test material, written without privlora: THUDM's checkpoint format (every tensor
name and shape, as a function of config.json), tiny random-weight checkpoints in that format,
peft adapters on them, and the reference forward pass.

transformers has no ChatGLM2 (it ships as remote code and nothing is downloaded here), so two
things stand in for it:

- :func:`thudm_checkpoint_shapes` writes down the names and shapes of THUDM/chatglm2-6b's
  ``pytorch_model.bin.index.json``, ``transformer.rotary_pos_emb.inv_freq`` buffer included. On
  chatglm2-6b's own config it gives that index's ``total_size`` to the byte (see
  ``tests/models/test_chatglm2.py``).
- :func:`thudm_forward` is a transcription of THUDM's modeling_chatglm.py forward pass. It keeps
  the original's sequence-first tensors, rope cache, expand-based multi-query attention and
  causal SDPA, and it reads its weights from a dict keyed by those checkpoint names. It never
  uses privlora's modules, state_dict or checkpoint reader.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.nn import functional as F

from privlora.models.checkpoint import build_model

# head_dim (kv_channels) 8 differs from hidden_size / heads = 16, so a definition or a describe()
# that derived it from the hidden size would fail.
TINY: dict[str, Any] = {
    "model_type": "chatglm", "num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 96, "kv_channels": 8,
    "num_attention_heads": 4, "multi_query_attention": True, "multi_query_group_num": 2,
    "padded_vocab_size": 160, "seq_length": 256, "layernorm_epsilon": 1e-5, "rmsnorm": True,
    "add_qkv_bias": True, "add_bias_linear": False, "post_layer_norm": True, "original_rope": True,
    "apply_residual_connection_post_layernorm": False, "torch_dtype": "float32",
}

# The rotary buffer THUDM's checkpoints carry. It is not a parameter: THUDM's forward recomputes
# the frequencies and reads only the buffer's dtype and device.
INV_FREQ = "transformer.rotary_pos_emb.inv_freq"

# Config fields that would change the tensor list or the forward pass in ways not written down here.
_TRANSCRIBED = {"rmsnorm": True, "post_layer_norm": True, "original_rope": True,
                "apply_residual_connection_post_layernorm": False}


def _check_transcribed(config: dict[str, Any]) -> None:
    for key, value in _TRANSCRIBED.items():
        if config.get(key, value) != value:
            raise ValueError(f"the reference does not transcribe ChatGLM2 with {key}={config[key]!r}")
    if config.get("rope_ratio", 1) != 1:
        raise ValueError("rope_ratio is ChatGLM3's, not ChatGLM2's; the reference does not transcribe it")


def thudm_checkpoint_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of a THUDM ChatGLM2 checkpoint for ``config`` (config.json's fields), by name,
    in the order of THUDM's modules. Written from the published format, not from privlora.

    ``add_bias_linear`` adds biases to every Linear (and to query_key_value); privlora refuses
    that variant, but its checkpoint is still written down as THUDM lays it out."""
    _check_transcribed(config)
    hidden, ffn = config["hidden_size"], config["ffn_hidden_size"]
    vocab, kv_channels, heads = config["padded_vocab_size"], config["kv_channels"], config["num_attention_heads"]
    groups = config["multi_query_group_num"] if config["multi_query_attention"] else heads
    qkv = (heads + 2 * groups) * kv_channels
    linear_bias = config["add_bias_linear"]
    qkv_bias = linear_bias or config["add_qkv_bias"]

    shapes: dict[str, tuple[int, ...]] = {
        "transformer.embedding.word_embeddings.weight": (vocab, hidden),
        # RotaryEmbedding(kv_channels // 2) registers 1 / base^(arange(0, dim, 2) / dim): dim / 2 entries.
        "transformer.rotary_pos_emb.inv_freq": (kv_channels // 4,),
    }
    for i in range(config["num_layers"]):
        layer = f"transformer.encoder.layers.{i}"
        shapes[f"{layer}.input_layernorm.weight"] = (hidden,)
        shapes[f"{layer}.self_attention.query_key_value.weight"] = (qkv, hidden)
        if qkv_bias:
            shapes[f"{layer}.self_attention.query_key_value.bias"] = (qkv,)
        shapes[f"{layer}.self_attention.dense.weight"] = (hidden, heads * kv_channels)
        if linear_bias:
            shapes[f"{layer}.self_attention.dense.bias"] = (hidden,)
        shapes[f"{layer}.post_attention_layernorm.weight"] = (hidden,)
        shapes[f"{layer}.mlp.dense_h_to_4h.weight"] = (2 * ffn, hidden)
        if linear_bias:
            shapes[f"{layer}.mlp.dense_h_to_4h.bias"] = (2 * ffn,)
        shapes[f"{layer}.mlp.dense_4h_to_h.weight"] = (hidden, ffn)
        if linear_bias:
            shapes[f"{layer}.mlp.dense_4h_to_h.bias"] = (hidden,)
    shapes["transformer.encoder.final_layernorm.weight"] = (hidden,)
    shapes["transformer.output_layer.weight"] = (vocab, hidden)
    return shapes


def thudm_inv_freq(config: dict[str, Any]) -> Tensor:
    """The values THUDM's RotaryEmbedding stores in ``inv_freq`` (base 10000, dim kv_channels // 2)."""
    dim = config["kv_channels"] // 2
    return 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def thudm_checkpoint(config: dict[str, Any], seed: int = 0) -> dict[str, Tensor]:
    """Random float32 tensors under the names and shapes of :func:`thudm_checkpoint_shapes` (std
    0.3, so that a mistake shows in the logits), with THUDM's real ``inv_freq`` values."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, Tensor] = {}
    for name, shape in thudm_checkpoint_shapes(config).items():
        state[name] = thudm_inv_freq(config) if name == INV_FREQ else torch.randn(shape, generator=generator) * 0.3
    return state


def save_thudm_checkpoint(directory: Path, config: dict[str, Any], state: dict[str, Tensor],
                          bin_format: bool = False) -> Path:
    """config.json plus ``state`` as model.safetensors, or as pytorch_model.bin with ``bin_format``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    if bin_format:
        torch.save(state, directory / "pytorch_model.bin")
    else:
        save_file(state, str(directory / "model.safetensors"))
    return directory


def write_tiny_chatglm2(directory: Path, bin_format: bool = False, seed: int = 0, **overrides: Any) -> Path:
    """A tiny THUDM-format checkpoint: TINY (with ``overrides``) and :func:`thudm_checkpoint`."""
    config = {**TINY, **overrides}
    return save_thudm_checkpoint(directory, config, thudm_checkpoint(config, seed), bin_format)


def read_thudm_checkpoint(base: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """config.json and the tensors of a checkpoint written by :func:`save_thudm_checkpoint`, read
    with safetensors / torch directly (not with privlora's reader)."""
    config = json.loads((base / "config.json").read_text())
    if (base / "model.safetensors").is_file():
        return config, load_file(str(base / "model.safetensors"))
    return config, torch.load(base / "pytorch_model.bin", map_location="cpu", weights_only=True)


def write_chatglm2_adapter(base: Path, directory: Path, targets: list[str], seed: int = 1) -> Path:
    """A peft adapter with random (non-zero) A and B on the checkpoint at ``base``."""
    torch.manual_seed(seed)
    model = build_model(base)
    model.config = {"model_type": "chatglm"}  # peft reads a HF-style config dict; the adapter is all we keep
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                  init_lora_weights=False))
    peft_model.save_pretrained(str(directory), safe_serialization=True)
    return directory


@torch.no_grad()
def thudm_forward(config: dict[str, Any], weights: dict[str, Tensor], input_ids: Tensor) -> Tensor:
    """THUDM's ChatGLM2 forward pass without a cache or mask (causal SDPA), transcribed, over
    ``weights`` keyed by THUDM's checkpoint names: sequence-first tensors, a [sq, rot/2, 2] rope
    cache, interleaved rotation of the first half of each head, expand-based multi-query
    attention. Returns logits [batch, sq, padded_vocab_size]."""
    _check_transcribed(config)
    heads, kv_channels = config["num_attention_heads"], config["kv_channels"]
    groups = config["multi_query_group_num"] if config["multi_query_attention"] else heads
    eps = config["layernorm_epsilon"]
    given = {name: tuple(tensor.shape) for name, tensor in weights.items()}
    if given != thudm_checkpoint_shapes(config):
        raise ValueError("the weights are not a THUDM ChatGLM2 checkpoint for this config")
    w = {name: tensor.float() for name, tensor in weights.items()}
    sq = input_ids.shape[1]

    # RotaryEmbedding(kv_channels // 2).forward_impl: theta over n_elem = kv_channels // 2.
    n_elem = kv_channels // 2
    theta = 1.0 / (10000 ** (torch.arange(0, n_elem, 2, dtype=torch.float) / n_elem))
    idx_theta = torch.outer(torch.arange(sq, dtype=torch.float), theta).float()
    rope_cache = torch.stack([torch.cos(idx_theta), torch.sin(idx_theta)], dim=-1)  # [sq, n_elem/2, 2]

    def rope(x: Tensor) -> Tensor:  # apply_rotary_pos_emb; x: [sq, b, np, hn]
        rot_dim = rope_cache.shape[-2] * 2
        x, x_pass = x[..., :rot_dim], x[..., rot_dim:]
        xshaped = x.reshape(sq, -1, x.size(2), rot_dim // 2, 2)
        cache = rope_cache.view(sq, -1, 1, xshaped.size(3), 2)
        out = torch.stack([xshaped[..., 0] * cache[..., 0] - xshaped[..., 1] * cache[..., 1],
                           xshaped[..., 1] * cache[..., 0] + xshaped[..., 0] * cache[..., 1]], -1).flatten(3)
        return torch.cat((out, x_pass), dim=-1)

    def rms(x: Tensor, name: str) -> Tensor:  # RMSNorm
        variance = x.pow(2).mean(-1, keepdim=True)
        return w[f"{name}.weight"] * (x * torch.rsqrt(variance + eps))

    def linear(x: Tensor, name: str) -> Tensor:
        return F.linear(x, w[f"{name}.weight"], w.get(f"{name}.bias"))

    # Embedding: word embeddings, then sequence-first.
    hidden = F.embedding(input_ids, w["transformer.embedding.word_embeddings.weight"]).transpose(0, 1)
    for i in range(config["num_layers"]):
        layer = f"transformer.encoder.layers.{i}"
        # GLMBlock: pre-norm attention with the residual taken before the norm.
        mixed = linear(rms(hidden, f"{layer}.input_layernorm"), f"{layer}.self_attention.query_key_value")
        q, k, v = mixed.split([heads * kv_channels, groups * kv_channels, groups * kv_channels], dim=-1)
        q = q.view(sq, -1, heads, kv_channels)
        k = k.view(sq, -1, groups, kv_channels)
        v = v.view(sq, -1, groups, kv_channels)
        q, k = rope(q), rope(k)
        repeat = heads // groups
        k = k.unsqueeze(-2).expand(-1, -1, -1, repeat, -1).contiguous().view(sq, -1, heads, kv_channels)
        v = v.unsqueeze(-2).expand(-1, -1, -1, repeat, -1).contiguous().view(sq, -1, heads, kv_channels)
        q, k, v = (x.permute(1, 2, 0, 3) for x in (q, k, v))  # CoreAttention: [b, np, sq, hn]
        context = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        context = context.permute(2, 0, 1, 3).reshape(sq, -1, heads * kv_channels)
        hidden = hidden + linear(context, f"{layer}.self_attention.dense")
        # MLP: swiglu over the two halves of dense_h_to_4h (the first half is the gate).
        gate, up = torch.chunk(linear(rms(hidden, f"{layer}.post_attention_layernorm"),
                                      f"{layer}.mlp.dense_h_to_4h"), 2, dim=-1)
        hidden = hidden + linear(F.silu(gate) * up, f"{layer}.mlp.dense_4h_to_h")
    hidden = rms(hidden, "transformer.encoder.final_layernorm")
    return linear(hidden, "transformer.output_layer").transpose(0, 1).contiguous()


def thudm_logits(base: Path, input_ids: Tensor) -> Tensor:
    """The reference's logits for the checkpoint at ``base``, read from its files directly."""
    return thudm_forward(*read_thudm_checkpoint(base), input_ids)
