"""Phi-3 (Hugging Face ``Phi3ForCausalLM``): the Llama decoder with fused projections.

- ``qkv_proj`` computes q, k and v in one Linear (in that order along its output);
- ``gate_up_proj`` computes the MLP's gate and up halves in one Linear: ``down(up * act(gate))``;
- ``head_dim`` is always hidden_size / heads, and there are no biases;
- ``rope_scaling`` is null or LongRoPE (``longrope``, or ``su``/``yarn``, which transformers
  4.47.1's Phi3Config maps to it): short factors up to ``original_max_position_embeddings``,
  long ones beyond, and cos/sin scaled by ``sqrt(1 + ln(s) / ln(original))`` with
  ``s = max_position_embeddings / original_max_position_embeddings``
  (:mod:`privlora.models.rope`).

peft adapters attach to the fused Linears by name, as ChatGLM2's ``query_key_value`` does: one
LoRA site covers q, k and v. A sliding window shorter than the context (Phi-3-mini-4k's 2047
of 4096) is refused, as for Mistral.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from privlora.core.types import ModelShape
from privlora.errors import UnsupportedModelError
from privlora.models.architectures import llama
from privlora.models.contract import Architecture
from privlora.models.layers import ACTIVATIONS
from privlora.models.rope import LONGROPE_ALIASES, Rope, longrope, scaling_type, unscaled_rope

MODEL_TYPE = "phi3"
LORA_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")

# transformers' Phi3Config defaults, which apply when config.json omits the field.
DEFAULT_CONTEXT_LENGTH = 4096
DEFAULT_ORIGINAL_CONTEXT_LENGTH = 4096


def rope_of(hf: dict[str, Any], head_dim: int, context_length: int) -> Rope:
    kind = scaling_type(hf)
    if kind == "default":
        return unscaled_rope(hf, head_dim)
    if kind not in LONGROPE_ALIASES:
        raise UnsupportedModelError(f"rope_scaling type {kind!r} is not supported for phi3 "
                                    f"(supported: {', '.join(LONGROPE_ALIASES)})")
    return longrope(hf, head_dim, context_length,
                    hf.get("original_max_position_embeddings", DEFAULT_ORIGINAL_CONTEXT_LENGTH))


def config_from_hf(hf: dict[str, Any]) -> llama.LlamaConfig:
    llama.expect_model_type(hf, MODEL_TYPE)
    llama.require_silu(hf)
    sizes = llama.common_sizes({**hf, "head_dim": None}, DEFAULT_CONTEXT_LENGTH, rms_norm_eps=1e-5)
    llama.refuse_sliding_window(hf, sizes["context_length"])
    return llama.LlamaConfig(**sizes, rope=rope_of(hf, sizes["head_dim"], sizes["context_length"]))


class Phi3Attention(llama.Attention):
    def __init__(self, config: llama.LlamaConfig) -> None:
        super().__init__(config)
        self.sizes = [self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim,
                      self.num_kv_heads * self.head_dim]
        self.qkv_proj = nn.Linear(config.hidden_size, sum(self.sizes), bias=False)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = self.qkv_proj(x).split(self.sizes, dim=-1)
        return q, k, v


class Phi3MLP(nn.Module):
    def __init__(self, config: llama.LlamaConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * self.act(gate))


class Phi3DecoderLayer(llama.LlamaDecoderLayer):
    attention_class = Phi3Attention
    mlp_class = Phi3MLP


class Phi3ForCausalLM(llama.LlamaForCausalLM):
    """The Llama step function over Phi-3's fused layers."""

    layer_class = Phi3DecoderLayer


def build(hf_config: dict[str, Any]) -> Phi3ForCausalLM:
    return Phi3ForCausalLM(config_from_hf(hf_config))


def describe(hf_config: dict[str, Any]) -> ModelShape:
    return llama.shape_of(config_from_hf(hf_config), MODEL_TYPE)


ARCHITECTURE = Architecture(model_type=MODEL_TYPE, lora_targets=LORA_TARGETS, build=build,
                            adapt_state_dict=llama.adapt_state_dict, describe=describe)
