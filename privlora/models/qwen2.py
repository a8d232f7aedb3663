"""Qwen2 (Hugging Face ``Qwen2ForCausalLM``): the Llama decoder with biases on q/k/v only.

Everything else (RMSNorm, rotary embedding, GQA attention, SwiGLU MLP, the KV-cache step
signature, the LoRA targets, the checkpoint names) is the Llama definition's, so this module is
only the configuration mapping. Sliding-window attention is rejected (off in the released Qwen2
configs).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from privlora.core.types import ModelShape
from privlora.errors import UnsupportedModelError
from privlora.models import llama
from privlora.models.contract import Architecture

MODEL_TYPE = "qwen2"

# transformers' Qwen2Config default, which applies when config.json omits max_position_embeddings.
DEFAULT_CONTEXT_LENGTH = 32768


def config_from_hf(hf: dict[str, Any]) -> llama.LlamaConfig:
    if hf.get("model_type") != MODEL_TYPE:
        raise UnsupportedModelError(f"expected model_type 'qwen2', got {hf.get('model_type')!r}")
    if hf.get("use_sliding_window"):
        raise UnsupportedModelError("Qwen2 sliding-window attention is not supported")
    base = llama.LlamaConfig.from_hf({**hf, "model_type": llama.MODEL_TYPE, "attention_bias": False, "mlp_bias": False})
    return dataclasses.replace(base, qkv_bias=True, o_bias=False)


def build(hf_config: dict[str, Any]) -> llama.LlamaForCausalLM:
    return llama.LlamaForCausalLM(config_from_hf(hf_config))


def describe(hf_config: dict[str, Any]) -> ModelShape:
    """Sizes from the same parsing as :func:`build` (Qwen2 derives head_dim from the hidden size)."""
    return llama.shape_of(config_from_hf(hf_config), MODEL_TYPE,
                          hf_config.get("max_position_embeddings", DEFAULT_CONTEXT_LENGTH))


ARCHITECTURE = Architecture(model_type=MODEL_TYPE, lora_targets=llama.LORA_TARGETS, build=build,
                            adapt_state_dict=llama.adapt_state_dict, describe=describe)
