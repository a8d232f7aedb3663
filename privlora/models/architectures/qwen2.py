"""Qwen2 (Hugging Face ``Qwen2ForCausalLM``): the Llama decoder with biases on q/k/v only.

Everything else (RMSNorm, rotary embedding and its ``rope_scaling`` variants, GQA attention,
SwiGLU MLP, the KV-cache step signature, the LoRA targets, the checkpoint names) is the Llama
definition's, so this module is only the configuration mapping. Sliding-window attention is
rejected (off in the released Qwen2 configs).
"""

from __future__ import annotations

from typing import Any

from privlora.errors import UnsupportedModelError
from privlora.models.architectures import llama
from privlora.models.rope import llama_rope

MODEL_TYPE = "qwen2"

# transformers' Qwen2Config default, which applies when config.json omits max_position_embeddings.
DEFAULT_CONTEXT_LENGTH = 32768


def config_from_hf(hf: dict[str, Any]) -> llama.LlamaConfig:
    llama.expect_model_type(hf, MODEL_TYPE)
    if hf.get("use_sliding_window"):
        raise UnsupportedModelError("Qwen2 sliding-window attention is not supported")
    llama.require_silu(hf)
    sizes = llama.common_sizes({**hf, "head_dim": None}, DEFAULT_CONTEXT_LENGTH)  # Qwen2 derives head_dim
    return llama.LlamaConfig(**sizes, rope=llama_rope(hf, sizes["head_dim"], sizes["context_length"]),
                             qkv_bias=True)


ARCHITECTURE = llama.llama_family(MODEL_TYPE, config_from_hf)
