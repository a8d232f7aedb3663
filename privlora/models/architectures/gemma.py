"""Gemma (Hugging Face ``GemmaForCausalLM``, Gemma 1): the Llama decoder with four differences,
each a field of :class:`~privlora.models.architectures.llama.LlamaConfig`:

- the embeddings are multiplied by ``sqrt(hidden_size)``, rounded to the embeddings' dtype
  (float32 here) as transformers does;
- RMSNorm scales by ``1 + weight``;
- the MLP gate uses GeLU, tanh-approximated: transformers reads ``hidden_activation`` and, when it
  is null, uses ``gelu_pytorch_tanh`` whatever ``hidden_act`` says;
- ``head_dim`` is its own field (256 by default, not hidden_size / heads), and the embeddings
  are tied by default.

``attention_bias`` puts a bias on all four attention projections. Module and checkpoint names
are Llama's, so the LoRA targets are too.
"""

from __future__ import annotations

from typing import Any

import torch

from privlora.errors import UnsupportedModelError
from privlora.models.architectures import llama
from privlora.models.rope import unscalable_rope

MODEL_TYPE = "gemma"

# transformers' GemmaConfig defaults, which apply when config.json omits the field.
DEFAULT_CONTEXT_LENGTH = 8192
DEFAULT_HEAD_DIM = 256
DEFAULT_ACTIVATION = "gelu_pytorch_tanh"
SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu")  # keys of layers.ACTIVATIONS


def config_from_hf(hf: dict[str, Any]) -> llama.LlamaConfig:
    llama.expect_model_type(hf, MODEL_TYPE)
    activation = hf.get("hidden_activation") or DEFAULT_ACTIVATION
    if activation not in SUPPORTED_ACTIVATIONS:
        raise UnsupportedModelError(f"hidden_activation {activation!r} is not supported "
                                    f"(supported: {', '.join(SUPPORTED_ACTIVATIONS)})")
    sizes = llama.common_sizes(hf, DEFAULT_CONTEXT_LENGTH, tied=True, head_dim=DEFAULT_HEAD_DIM)
    bias = hf.get("attention_bias", False)
    return llama.LlamaConfig(
        **sizes, rope=unscalable_rope(hf, sizes["head_dim"]),
        qkv_bias=bias, o_bias=bias, hidden_act=activation, norm_unit_offset=True,
        embed_scale=torch.tensor(sizes["hidden_size"] ** 0.5, dtype=torch.float32).item())


ARCHITECTURE = llama.llama_family(MODEL_TYPE, config_from_hf)
