"""Traceable Llama-family decoder (Llama 2/3-style: RMSNorm, RoPE, grouped-query attention,
SwiGLU MLP, optionally tied embeddings).

Why a project-owned definition: the compiler needs one ``torch.fx.symbolic_trace`` graph for
prefill and decode. Hugging Face's implementation has data-dependent Python control flow and a
cache object; here the KV cache is an explicit tensor input and output and every shape is derived
by tensor ops, so the same graph serves prefill (empty past) and decode (one new token) and
exports to ONNX with dynamic sequence and cache lengths.

Module names equal Hugging Face's (``model.layers.N.self_attn.q_proj`` ...), so ``LlamaForCausalLM``
state dicts load by name and peft adapters attach to the named Linear layers.

Step signature (see :class:`LlamaForCausalLM.forward`)::

    logits, present_keys, present_values = model(input_ids, position_ids, attention_mask,
                                                  past_keys, past_values)

with caches shaped ``[num_layers, batch, num_kv_heads, cache_len, head_dim]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from privlora.core.types import ModelShape
from privlora.errors import UnsupportedModelError
from privlora.models.contract import Architecture
from privlora.models.layers import MASKED_SCORE, RMSNorm, attend, attention_allowed, run_layers  # noqa: F401 (re-exported)

MODEL_TYPE = "llama"

# Linear layers a LoRA adapter may target, by their Hugging Face names.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# transformers' LlamaConfig default, which applies when config.json omits max_position_embeddings.
DEFAULT_CONTEXT_LENGTH = 2048


@dataclass(frozen=True)
class LlamaConfig:
    """The hyper-parameters the forward pass depends on, read from a Hugging Face config."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    qkv_bias: bool = False  # q_proj, k_proj, v_proj (Llama: attention_bias; Qwen2: always)
    o_bias: bool = False  # o_proj (Llama: attention_bias; Qwen2: never)
    mlp_bias: bool = False

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "LlamaConfig":
        """Build from a Hugging Face ``config.json`` dict; reject features this definition lacks."""
        if hf.get("model_type") != MODEL_TYPE:
            raise UnsupportedModelError(f"expected model_type 'llama', got {hf.get('model_type')!r}")
        if hf.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"hidden_act {hf['hidden_act']!r} is not supported (only silu)")
        if hf.get("rope_scaling"):
            raise UnsupportedModelError(f"rope_scaling {hf['rope_scaling']!r} is not supported")
        if hf.get("pretraining_tp", 1) != 1:
            raise UnsupportedModelError("pretraining_tp != 1 is not supported")
        heads = hf["num_attention_heads"]
        kv_heads = hf.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise UnsupportedModelError(f"{heads} attention heads are not a multiple of {kv_heads} KV heads")
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=hf.get("rope_theta", 10000.0),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            qkv_bias=hf.get("attention_bias", False),
            o_bias=hf.get("attention_bias", False),
            mlp_bias=hf.get("mlp_bias", False),
        )


class RotaryEmbedding(nn.Module):
    """RoPE cos/sin tables computed from explicit position ids (no cached max length)."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        freqs = position_ids.float().unsqueeze(-1) * self.inv_freq  # [B, S, D/2]
        angles = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)  # [B, 1, S, D]
        return angles.cos(), angles.sin()


def rotate_half(x: Tensor) -> Tensor:
    """Swap the two halves of the last dimension, negating the second (Llama RoPE convention)."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return x * cos + rotate_half(x) * sin


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden, bias = config.hidden_size, config.qkv_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=config.o_bias)

    def _heads(self, x: Tensor, count: int) -> Tensor:
        """[B, S, count*D] -> [B, count, S, D]."""
        return x.unflatten(-1, (count, self.head_dim)).transpose(1, 2)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, allowed: Tensor, past_k: Tensor, past_v: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        q = apply_rope(self._heads(self.q_proj(x), self.num_heads), cos, sin)
        k = apply_rope(self._heads(self.k_proj(x), self.num_kv_heads), cos, sin)
        v = self._heads(self.v_proj(x), self.num_kv_heads)
        present_k = torch.cat((past_k, k), dim=2)
        present_v = torch.cat((past_v, v), dim=2)
        groups = self.num_heads // self.num_kv_heads
        return self.o_proj(attend(q, present_k, present_v, allowed, groups, self.head_dim)), present_k, present_v


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        hidden, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(hidden, inner, bias=bias)
        self.up_proj = nn.Linear(hidden, inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, allowed: Tensor, past_k: Tensor, past_v: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        attn, present_k, present_v = self.self_attn(self.input_layernorm(x), cos, sin, allowed, past_k, past_v)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, present_k, present_v


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)


class LlamaForCausalLM(nn.Module):
    """Decoder with an explicit KV cache; see the module docstring for the step signature."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        attention_mask: Tensor,
        past_keys: Tensor,
        past_values: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One step over ``S`` new tokens.

        input_ids, position_ids: ``[B, S]`` int64; attention_mask: ``[B, T + S]`` (1 = real token)
        covering the cached and the new tokens; past_keys/past_values: ``[L, B, H_kv, T, D]``.
        Returns logits ``[B, S, vocab]`` and the caches extended to ``T + S``.
        """
        cos, sin = self.model.rotary_emb(position_ids)
        allowed = attention_allowed(position_ids, attention_mask)
        x, keys, values = run_layers(self.model.layers, self.model.embed_tokens(input_ids), cos, sin, allowed,
                                     past_keys, past_values)
        return self.lm_head(self.model.norm(x)), keys, values

    def empty_cache(self, batch_size: int = 1) -> tuple[Tensor, Tensor]:
        """Zero-length past keys and values for a prefill step."""
        c = self.config
        shape = (c.num_hidden_layers, batch_size, c.num_key_value_heads, 0, c.head_dim)
        dtype = self.lm_head.weight.dtype
        return torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)


def build(hf_config: dict[str, Any]) -> LlamaForCausalLM:
    """Instantiate the architecture from a Hugging Face config dict (weights uninitialised)."""
    return LlamaForCausalLM(LlamaConfig.from_hf(hf_config))


def adapt_state_dict(model: LlamaForCausalLM, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Hugging Face names already match; tied checkpoints often omit ``lm_head.weight``."""
    if model.config.tie_word_embeddings and "model.embed_tokens.weight" in state:
        state = {**state, "lm_head.weight": state["model.embed_tokens.weight"]}
    return state


def shape_of(config: LlamaConfig, model_type: str, context_length: int) -> ModelShape:
    """The :class:`ModelShape` of a parsed config (shared with the families mapped onto Llama)."""
    return ModelShape(architecture=model_type, layers=config.num_hidden_layers, hidden_size=config.hidden_size,
                      heads=config.num_attention_heads, kv_heads=config.num_key_value_heads,
                      head_dim=config.head_dim, vocab_size=config.vocab_size, context_length=context_length)


def describe(hf_config: dict[str, Any]) -> ModelShape:
    """Sizes from the same parsing as :func:`build`, so defaults (KV heads, head_dim) agree."""
    return shape_of(LlamaConfig.from_hf(hf_config), MODEL_TYPE,
                    hf_config.get("max_position_embeddings", DEFAULT_CONTEXT_LENGTH))


ARCHITECTURE = Architecture(model_type=MODEL_TYPE, lora_targets=LORA_TARGETS, build=build,
                            adapt_state_dict=adapt_state_dict, describe=describe)
