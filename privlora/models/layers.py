"""Building blocks shared by the architecture modules: RMSNorm, the MLP activations, the
attention mask from explicit positions, and grouped-query attention over an explicit KV cache.
All traceable with ``torch.fx.symbolic_trace`` and exportable to ONNX with dynamic lengths."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn

# Score of a key a query may not attend to (the model runs in float32; a constant keeps the
# graph free of dtype-dependent Python).
MASKED_SCORE = torch.finfo(torch.float32).min

# MLP activations by their transformers ACT2FN names.
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": nn.functional.silu,
    "gelu": nn.functional.gelu,
    "gelu_pytorch_tanh": partial(nn.functional.gelu, approximate="tanh"),
}


class RMSNorm(nn.Module):
    """Root-mean-square layer norm in float32. ``x / sqrt(.)`` rather than transformers'
    ``x * rsqrt(.)``: ONNX has no Rsqrt, and the exporter's Sqrt + Reciprocal rounds twice, which
    SmolLM2's large activations amplify to 1.2e-4 on the logits. Sqrt + Div rounds the same
    way in torch and ONNX Runtime (8.9e-5); transformers parity stays within 1e-4.

    With ``unit_offset`` (Gemma) the scale is ``1 + weight``: Gemma stores the offset from one."""

    def __init__(self, size: int, eps: float, unit_offset: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.unit_offset = unit_offset

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        scale = 1.0 + self.weight if self.unit_offset else self.weight
        return scale * x.to(dtype)


def attention_allowed(position_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Boolean ``[B, 1, S, T]`` mask: query i may read key j when j is a real token at a position
    not after i. Key positions come from the mask's running count, so left padding works."""
    key_positions = attention_mask.cumsum(-1) - 1
    causal = key_positions.unsqueeze(1) <= position_ids.unsqueeze(-1)  # [B, S, T]
    return (causal & attention_mask.bool().unsqueeze(1)).unsqueeze(1)


def attend(q: Tensor, present_k: Tensor, present_v: Tensor, allowed: Tensor, groups: int, head_dim: int) -> Tensor:
    """Scaled dot-product attention of ``q [B, H, S, D]`` over the cache ``[B, H_kv, T, D]``
    (each KV head shared by ``groups`` = H / H_kv query heads, in order), masked by ``allowed``;
    returns ``[B, S, H * D]``. ``groups`` and ``head_dim`` are Python ints so that the traced
    graph holds constants, not shape computations."""
    keys = present_k.repeat_interleave(groups, dim=1)
    values = present_v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, keys.transpose(2, 3)) / math.sqrt(head_dim)
    scores = scores.masked_fill(~allowed, MASKED_SCORE)
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.matmul(probs, values).transpose(1, 2).flatten(2)


def run_layers(layers: nn.ModuleList, x: Tensor, cos: Tensor, sin: Tensor, allowed: Tensor, past_keys: Tensor,
               past_values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Every decoder layer over one step, each with its slice of the stacked caches
    ``[L, B, H_kv, T, D]``; returns the hidden state and the extended caches, stacked again."""
    present_keys, present_values = [], []
    for index, layer in enumerate(layers):
        x, k, v = layer(x, cos, sin, allowed, past_keys[index], past_values[index])
        present_keys.append(k)
        present_values.append(v)
    return x, torch.stack(present_keys), torch.stack(present_values)
