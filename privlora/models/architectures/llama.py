"""Traceable Llama-family decoder (Llama 2/3-style: RMSNorm, RoPE with the ``rope_scaling`` types
default, linear, dynamic and llama3, grouped-query attention, SwiGLU MLP, optionally tied
embeddings). Qwen2, Mistral, Gemma and Phi-3 map onto it: :class:`LlamaConfig` holds what they
change (biases, activation, embedding scale, norm offset) and Phi-3 swaps in fused projections.

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

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from privlora.core.types import ModelShape
from privlora.errors import UnsupportedModelError
from privlora.models.contract import Architecture
from privlora.models.layers import ACTIVATIONS, RMSNorm, attend, attention_allowed, run_layers
from privlora.models.rope import Rope, RotaryEmbedding, apply_rope, llama_rope

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
    tie_word_embeddings: bool
    context_length: int  # max_position_embeddings, else the family's default
    rope: Rope
    qkv_bias: bool = False  # q_proj, k_proj, v_proj (Llama: attention_bias; Qwen2: always)
    o_bias: bool = False  # o_proj (Llama: attention_bias; Qwen2: never)
    mlp_bias: bool = False
    hidden_act: str = "silu"  # a key of layers.ACTIVATIONS
    embed_scale: float | None = None  # Gemma multiplies the embeddings by sqrt(hidden_size)
    norm_unit_offset: bool = False  # Gemma's RMSNorm scales by (1 + weight)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "LlamaConfig":
        """Build from a Llama ``config.json`` dict; reject features this definition lacks."""
        expect_model_type(hf, MODEL_TYPE)
        require_silu(hf)
        if hf.get("pretraining_tp", 1) != 1:
            raise UnsupportedModelError("pretraining_tp != 1 is not supported")
        sizes = common_sizes(hf, DEFAULT_CONTEXT_LENGTH)
        bias = hf.get("attention_bias", False)
        return cls(**sizes, rope=llama_rope(hf, sizes["head_dim"], sizes["context_length"]),
                   qkv_bias=bias, o_bias=bias, mlp_bias=hf.get("mlp_bias", False))


def expect_model_type(hf: dict[str, Any], model_type: str) -> None:
    if hf.get("model_type") != model_type:
        raise UnsupportedModelError(f"expected model_type {model_type!r}, got {hf.get('model_type')!r}")


def require_silu(hf: dict[str, Any]) -> None:
    if hf.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"hidden_act {hf['hidden_act']!r} is not supported (only silu)")


def common_sizes(hf: dict[str, Any], context_length: int, rms_norm_eps: float = 1e-6, tied: bool = False,
                 head_dim: int | None = None) -> dict[str, Any]:
    """The LlamaConfig fields every Llama-like family names the same way. The keyword arguments
    are the family's defaults for fields its ``config.json`` may omit (``head_dim``: else
    hidden_size / heads)."""
    heads = hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise UnsupportedModelError(f"{heads} attention heads are not a multiple of {kv_heads} KV heads")
    return dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hf.get("head_dim") or head_dim or hf["hidden_size"] // heads,
        rms_norm_eps=hf.get("rms_norm_eps", rms_norm_eps),
        tie_word_embeddings=hf.get("tie_word_embeddings", tied),
        context_length=hf.get("max_position_embeddings", context_length),
    )


def refuse_sliding_window(hf: dict[str, Any], context_length: int, default: int | None = None) -> None:
    """A sliding window at least as long as the context never masks a key: plain causal attention.
    ``default`` is the family's window when ``config.json`` omits the field."""
    window = hf.get("sliding_window", default)
    if window is not None and window < context_length:
        raise UnsupportedModelError(f"sliding_window {window} (shorter than the context length {context_length}) "
                                    "is not supported")


class Attention(nn.Module):
    """Grouped-query attention with RoPE over the explicit cache. Subclasses own the q/k/v
    projections (separate or fused) and return them from :meth:`project`."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.o_bias)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def _heads(self, x: Tensor, count: int) -> Tensor:
        """[B, S, count*D] -> [B, count, S, D]."""
        return x.unflatten(-1, (count, self.head_dim)).transpose(1, 2)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, allowed: Tensor, past_k: Tensor, past_v: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = self.project(x)
        q = apply_rope(self._heads(q, self.num_heads), cos, sin)
        k = apply_rope(self._heads(k, self.num_kv_heads), cos, sin)
        present_k = torch.cat((past_k, k), dim=2)
        present_v = torch.cat((past_v, self._heads(v, self.num_kv_heads)), dim=2)
        groups = self.num_heads // self.num_kv_heads
        return self.o_proj(attend(q, present_k, present_v, allowed, groups, self.head_dim)), present_k, present_v


class LlamaAttention(Attention):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(config)
        hidden, bias = config.hidden_size, config.qkv_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


class LlamaMLP(nn.Module):
    """Gated MLP: ``down(act(gate(x)) * up(x))`` (SwiGLU with silu, GeGLU with gelu)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        hidden, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(hidden, inner, bias=bias)
        self.up_proj = nn.Linear(hidden, inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)
        self.act: Callable[[Tensor], Tensor] = ACTIVATIONS[config.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def norm(config: LlamaConfig) -> RMSNorm:
    return RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_unit_offset)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm attention and MLP blocks; a family with fused projections swaps the two classes."""

    attention_class: type[Attention] = LlamaAttention
    mlp_class: type[nn.Module] = LlamaMLP

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = norm(config)
        self.self_attn = self.attention_class(config)
        self.post_attention_layernorm = norm(config)
        self.mlp = self.mlp_class(config)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, allowed: Tensor, past_k: Tensor, past_v: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        attn, present_k, present_v = self.self_attn(self.input_layernorm(x), cos, sin, allowed, past_k, past_v)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, present_k, present_v


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig, layer_class: type[LlamaDecoderLayer]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layer_class(config) for _ in range(config.num_hidden_layers))
        self.norm = norm(config)
        self.rotary_emb = RotaryEmbedding(config.rope)


class LlamaForCausalLM(nn.Module):
    """Decoder with an explicit KV cache; see the module docstring for the step signature."""

    layer_class: type[LlamaDecoderLayer] = LlamaDecoderLayer

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, self.layer_class)
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
        x, keys, values = run_layers(self.model.layers, self.embed(input_ids), cos, sin, allowed,
                                     past_keys, past_values)
        return self.lm_head(self.model.norm(x)), keys, values

    def embed(self, input_ids: Tensor) -> Tensor:
        x = self.model.embed_tokens(input_ids)
        return x if self.config.embed_scale is None else x * self.config.embed_scale

    def empty_cache(self, batch_size: int = 1) -> tuple[Tensor, Tensor]:
        """Zero-length past keys and values for a prefill step."""
        c = self.config
        shape = (c.num_hidden_layers, batch_size, c.num_key_value_heads, 0, c.head_dim)
        dtype = self.lm_head.weight.dtype
        return torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)


def adapt_state_dict(model: LlamaForCausalLM, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Hugging Face names already match; tied checkpoints often omit ``lm_head.weight``."""
    if model.config.tie_word_embeddings and "model.embed_tokens.weight" in state:
        state = {**state, "lm_head.weight": state["model.embed_tokens.weight"]}
    return state


def shape_of(config: LlamaConfig, model_type: str) -> ModelShape:
    """The :class:`ModelShape` of a parsed config (shared with the families mapped onto Llama)."""
    return ModelShape(architecture=model_type, layers=config.num_hidden_layers, hidden_size=config.hidden_size,
                      heads=config.num_attention_heads, kv_heads=config.num_key_value_heads,
                      head_dim=config.head_dim, vocab_size=config.vocab_size, context_length=config.context_length)


def llama_family(model_type: str, config_from_hf: Callable[[dict[str, Any]], LlamaConfig]) -> Architecture:
    """The record of a family that runs on this definition once its config is read: the same
    ``config_from_hf`` parses for ``build`` and ``describe``, so their defaults always agree."""

    def build(hf_config: dict[str, Any]) -> LlamaForCausalLM:
        return LlamaForCausalLM(config_from_hf(hf_config))

    def describe(hf_config: dict[str, Any]) -> ModelShape:
        return shape_of(config_from_hf(hf_config), model_type)

    return Architecture(model_type=model_type, lora_targets=LORA_TARGETS, build=build,
                        adapt_state_dict=adapt_state_dict, describe=describe)


ARCHITECTURE = llama_family(MODEL_TYPE, LlamaConfig.from_hf)
