"""Traceable ChatGLM2 (THUDM ChatGLM2-6B, ``model_type`` "chatglm").

Differences from the Llama definition:
- multi-query attention with ``multi_query_group_num`` key/value groups, from one fused
  ``query_key_value`` Linear with a bias;
- ChatGLM2's rotary embedding: only the first half of each head's dimensions rotate, as
  interleaved pairs (x0, x1), (x2, x3), ... rather than Llama's two halves;
- a fused SwiGLU ``dense_h_to_4h`` (gate and up concatenated) and ``dense_4h_to_h``;
- ``final_layernorm`` and ``output_layer``.

Module names follow THUDM's checkpoints (``transformer.encoder.layers.N.self_attention.
query_key_value`` ...), so their safetensors or PyTorch bin files load by name, and peft adapters
with ``target_modules=["query_key_value"]`` attach. The step signature and the KV-cache layout
are the Llama definition's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from privlora.core.types import ModelShape
from privlora.errors import UnsupportedModelError
from privlora.models.contract import Architecture
from privlora.models.layers import RMSNorm, attend, attention_allowed, run_layers

MODEL_TYPE = "chatglm"
LORA_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")

# THUDM's ChatGLMConfig default, which applies when config.json omits seq_length.
DEFAULT_CONTEXT_LENGTH = 2048


@dataclass(frozen=True)
class ChatGLM2Config:
    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_attention_heads: int
    kv_groups: int
    head_dim: int
    layernorm_epsilon: float
    rope_base: float
    qkv_bias: bool

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ChatGLM2Config":
        if hf.get("model_type") != MODEL_TYPE:
            raise UnsupportedModelError(f"expected model_type 'chatglm', got {hf.get('model_type')!r}")
        unsupported = {"rmsnorm": True, "post_layer_norm": True, "apply_residual_connection_post_layernorm": False,
                       "add_bias_linear": False, "original_rope": True}
        for key, required in unsupported.items():
            if hf.get(key, required) != required:
                raise UnsupportedModelError(f"ChatGLM2 with {key}={hf[key]!r} is not supported")
        heads = hf["num_attention_heads"]
        groups = hf.get("multi_query_group_num", heads) if hf.get("multi_query_attention", False) else heads
        if heads % groups:
            raise UnsupportedModelError(f"{heads} attention heads are not a multiple of {groups} key/value groups")
        return cls(
            vocab_size=hf["padded_vocab_size"],
            hidden_size=hf["hidden_size"],
            ffn_hidden_size=hf["ffn_hidden_size"],
            num_layers=hf["num_layers"],
            num_attention_heads=heads,
            kv_groups=groups,
            head_dim=hf.get("kv_channels") or hf["hidden_size"] // heads,
            layernorm_epsilon=hf.get("layernorm_epsilon", 1e-5),
            rope_base=10000.0 * hf.get("rope_ratio", 1.0),
            qkv_bias=hf.get("add_qkv_bias", True),
        )


class RotaryEmbedding(nn.Module):
    """cos/sin per position for the rotated half of a head: ``head_dim / 4`` frequencies."""

    def __init__(self, head_dim: int, base: float) -> None:
        super().__init__()
        rotated = head_dim // 2
        inv_freq = 1.0 / (base ** (torch.arange(0, rotated, 2, dtype=torch.float32) / rotated))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        angles = (position_ids.float().unsqueeze(-1) * self.inv_freq).unsqueeze(1)  # [B, 1, S, D/4]
        return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs of the first half of ``x [B, H, S, D]``; the second half passes."""
    half = x.shape[-1] // 2
    rotated, passed = x[..., :half], x[..., half:]
    pairs = rotated.unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    turned = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)
    return torch.cat((turned, passed), dim=-1)


class SelfAttention(nn.Module):
    def __init__(self, config: ChatGLM2Config) -> None:
        super().__init__()
        self.heads, self.groups, self.head_dim = config.num_attention_heads, config.kv_groups, config.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, (self.heads + 2 * self.groups) * self.head_dim,
                                         bias=config.qkv_bias)
        self.dense = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=False)

    def _heads(self, x: Tensor, count: int) -> Tensor:
        return x.unflatten(-1, (count, self.head_dim)).transpose(1, 2)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, allowed: Tensor, past_k: Tensor,
                past_v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = self.query_key_value(x).split(
            [self.heads * self.head_dim, self.groups * self.head_dim, self.groups * self.head_dim], dim=-1)
        q = apply_rope(self._heads(q, self.heads), cos, sin)
        k = apply_rope(self._heads(k, self.groups), cos, sin)
        present_k = torch.cat((past_k, k), dim=2)
        present_v = torch.cat((past_v, self._heads(v, self.groups)), dim=2)
        out = attend(q, present_k, present_v, allowed, self.heads // self.groups, self.head_dim)
        return self.dense(out), present_k, present_v


class MLP(nn.Module):
    def __init__(self, config: ChatGLM2Config) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=False)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.dense_h_to_4h(x).chunk(2, dim=-1)
        return self.dense_4h_to_h(nn.functional.silu(gate) * up)


class GLMBlock(nn.Module):
    def __init__(self, config: ChatGLM2Config) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.self_attention = SelfAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, allowed: Tensor, past_k: Tensor,
                past_v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        attn, present_k, present_v = self.self_attention(self.input_layernorm(x), cos, sin, allowed, past_k, past_v)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), present_k, present_v


class Embedding(nn.Module):
    def __init__(self, config: ChatGLM2Config) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)


class Encoder(nn.Module):
    def __init__(self, config: ChatGLM2Config) -> None:
        super().__init__()
        self.layers = nn.ModuleList(GLMBlock(config) for _ in range(config.num_layers))
        self.final_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)


class Transformer(nn.Module):
    def __init__(self, config: ChatGLM2Config) -> None:
        super().__init__()
        self.embedding = Embedding(config)
        self.rotary_pos_emb = RotaryEmbedding(config.head_dim, config.rope_base)
        self.encoder = Encoder(config)
        self.output_layer = nn.Linear(config.hidden_size, config.vocab_size, bias=False)


class ChatGLM2ForCausalLM(nn.Module):
    """Decoder with an explicit KV cache; the step signature of ``llama.LlamaForCausalLM``."""

    def __init__(self, config: ChatGLM2Config) -> None:
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)

    def forward(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor, past_keys: Tensor,
                past_values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        t = self.transformer
        cos, sin = t.rotary_pos_emb(position_ids)
        allowed = attention_allowed(position_ids, attention_mask)
        x, keys, values = run_layers(t.encoder.layers, t.embedding.word_embeddings(input_ids), cos, sin, allowed,
                                     past_keys, past_values)
        return t.output_layer(t.encoder.final_layernorm(x)), keys, values

    def empty_cache(self, batch_size: int = 1) -> tuple[Tensor, Tensor]:
        c = self.config
        shape = (c.num_layers, batch_size, c.kv_groups, 0, c.head_dim)
        return torch.zeros(shape), torch.zeros(shape)


def build(hf_config: dict[str, Any]) -> ChatGLM2ForCausalLM:
    return ChatGLM2ForCausalLM(ChatGLM2Config.from_hf(hf_config))


def adapt_state_dict(model: ChatGLM2ForCausalLM, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """THUDM checkpoints also store the rotary ``inv_freq`` buffer, which is recomputed here."""
    return {name: tensor for name, tensor in state.items() if not name.endswith("rotary_pos_emb.inv_freq")}


def describe(hf_config: dict[str, Any]) -> ModelShape:
    """Sizes under ChatGLM2's field names (num_layers, multi_query_group_num when
    multi_query_attention, kv_channels, padded_vocab_size, seq_length), parsed as :func:`build` does."""
    c = ChatGLM2Config.from_hf(hf_config)
    return ModelShape(architecture=MODEL_TYPE, layers=c.num_layers, hidden_size=c.hidden_size,
                      heads=c.num_attention_heads, kv_heads=c.kv_groups, head_dim=c.head_dim,
                      vocab_size=c.vocab_size, context_length=hf_config.get("seq_length", DEFAULT_CONTEXT_LENGTH))


ARCHITECTURE = Architecture(model_type=MODEL_TYPE, lora_targets=LORA_TARGETS, build=build,
                            adapt_state_dict=adapt_state_dict, describe=describe)
