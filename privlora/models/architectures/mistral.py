"""Mistral (Hugging Face ``MistralForCausalLM``): a Llama whose attention may use a sliding window.

Without a window (``sliding_window`` null, as in Mistral 7B v0.2 and later), or with one at least
as long as the context, no key is ever out of reach and the model is the Llama definition with
no biases, so this module is only the configuration mapping. A real window (Mistral 7B v0.1:
4096 of 32768 positions) masks keys that the Llama attention would read: refused.
"""

from __future__ import annotations

from typing import Any

from privlora.models.architectures import llama
from privlora.models.rope import unscalable_rope

MODEL_TYPE = "mistral"

# transformers' MistralConfig default, which applies when config.json omits max_position_embeddings.
DEFAULT_CONTEXT_LENGTH = 4096 * 32
DEFAULT_SLIDING_WINDOW = 4096  # likewise for sliding_window


def config_from_hf(hf: dict[str, Any]) -> llama.LlamaConfig:
    llama.expect_model_type(hf, MODEL_TYPE)
    llama.require_silu(hf)
    sizes = llama.common_sizes(hf, DEFAULT_CONTEXT_LENGTH)
    llama.refuse_sliding_window(hf, sizes["context_length"], DEFAULT_SLIDING_WINDOW)
    return llama.LlamaConfig(**sizes, rope=unscalable_rope(hf, sizes["head_dim"]))


ARCHITECTURE = llama.llama_family(MODEL_TYPE, config_from_hf)
