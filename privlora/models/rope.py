"""Rotary position embeddings with Hugging Face's ``rope_scaling`` variants, computed as
transformers 4.47.1 computes them (``modeling_rope_utils.py``; Phi-3's LongRoPE class).

``default``, ``linear`` and ``llama3`` fix the frequencies when the model is built. Two variants
depend on the length of the sequence a step reaches, ``max(position_ids) + 1``, as transformers
reads it on every forward call:

- ``dynamic`` (NTK): beyond ``max_position_embeddings`` the base grows with the length;
- ``longrope`` (Phi-3): beyond ``original_max_position_embeddings`` the long factors replace
  the short ones, and cos/sin are scaled by a constant attention factor.

Both compute the other frequencies in the graph and pick with ``torch.where``, so one traced
graph serves every length without Python control flow on data. Each step rotates its new keys
with its own frequencies and the cache keeps them, which is what transformers' KV cache holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from privlora.errors import UnsupportedModelError

LLAMA_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
LONGROPE_ALIASES = ("longrope", "su", "yarn")  # transformers 4.47.1's Phi3Config maps su and yarn to longrope


@dataclass(frozen=True)
class Rope:
    """A resolved rotary embedding: the rotated dimension, the base and the scaling variant."""

    dim: int
    theta: float
    rope_type: str = "default"
    factor: float = 1.0  # linear, dynamic, llama3
    original_context: int = 0  # dynamic: max_position_embeddings; llama3, longrope: original_max_position_embeddings
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    short_factor: tuple[float, ...] = ()  # longrope, up to original_context
    long_factor: tuple[float, ...] = ()  # longrope, beyond it
    attention_scaling: float = 1.0  # longrope: cos and sin are multiplied by it

    @property
    def length_dependent(self) -> bool:
        return self.rope_type in ("dynamic", "longrope")


def scaling_type(hf: dict[str, Any]) -> str:
    """The ``rope_scaling`` type, from ``rope_type`` or the legacy ``type`` key as transformers reads it."""
    scaling = hf.get("rope_scaling")
    if not scaling:
        return "default"
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind is None:
        raise UnsupportedModelError(f"rope_scaling {scaling!r} has neither 'rope_type' nor 'type'")
    return kind


def rotary_dim(hf: dict[str, Any], head_dim: int) -> int:
    """The rotated dimensions of a head; partial rotation is not implemented."""
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError(f"partial_rotary_factor {hf['partial_rotary_factor']!r} is not supported (only 1)")
    return head_dim


def _field(hf: dict[str, Any], key: str) -> Any:
    scaling = hf["rope_scaling"]
    if key not in scaling:
        raise UnsupportedModelError(f"rope_scaling of type {scaling_type(hf)!r} lacks the field {key!r}")
    return scaling[key]


def unscaled_rope(hf: dict[str, Any], head_dim: int) -> Rope:
    """The plain rotary embedding every variant starts from."""
    return Rope(rotary_dim(hf, head_dim), hf.get("rope_theta", 10000.0))


def unscalable_rope(hf: dict[str, Any], head_dim: int) -> Rope:
    """For families whose transformers implementation ignores ``rope_scaling`` (Mistral, Gemma):
    a checkpoint that sets it expects positions that neither transformers nor privlora compute."""
    if hf.get("rope_scaling"):
        raise UnsupportedModelError(f"rope_scaling is not supported for {hf.get('model_type')} "
                                    "(transformers 4.47.1 ignores it)")
    return unscaled_rope(hf, head_dim)


def llama_rope(hf: dict[str, Any], head_dim: int, context_length: int) -> Rope:
    """Llama's (and Qwen2's) rotary embedding: ``rope_scaling`` of type default, linear, dynamic or
    llama3. ``context_length`` is the config's ``max_position_embeddings`` or the family's default."""
    kind = scaling_type(hf)
    if kind not in LLAMA_ROPE_TYPES:
        raise UnsupportedModelError(f"rope_scaling type {kind!r} is not supported "
                                    f"(supported: {', '.join(LLAMA_ROPE_TYPES)})")
    rope = unscaled_rope(hf, head_dim)
    if kind == "default":
        return rope
    scaled = replace(rope, rope_type=kind, factor=float(_field(hf, "factor")))
    if kind == "linear":
        return scaled
    if kind == "dynamic":
        return replace(scaled, original_context=context_length)
    return replace(scaled, original_context=_field(hf, "original_max_position_embeddings"),
                   low_freq_factor=_field(hf, "low_freq_factor"), high_freq_factor=_field(hf, "high_freq_factor"))


def longrope(hf: dict[str, Any], head_dim: int, context_length: int, original_context: int) -> Rope:
    """Phi-3's LongRoPE (``rope_scaling`` type longrope, or su/yarn which transformers maps to it)."""
    rope = unscaled_rope(hf, head_dim)
    short, long = tuple(_field(hf, "short_factor")), tuple(_field(hf, "long_factor"))
    if len(short) != rope.dim // 2 or len(long) != rope.dim // 2:
        raise UnsupportedModelError(f"rope_scaling short_factor and long_factor need {rope.dim // 2} entries each")
    scale = context_length / original_context
    attention = 1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(original_context))
    return replace(rope, rope_type="longrope", original_context=original_context, short_factor=short,
                   long_factor=long, attention_scaling=attention)


def exponents(dim: int) -> Tensor:
    """``2i / dim`` for each rotated pair, in float32 as transformers computes it."""
    return torch.arange(0, dim, 2, dtype=torch.int64).float() / dim


def dynamic_theta(rope: Rope, length: Any) -> Any:
    """The NTK-scaled base for a sequence of ``length`` (a Python number or a 0-d float tensor)."""
    ratio = rope.factor * length / rope.original_context - (rope.factor - 1)
    return rope.theta * ratio ** (rope.dim / (rope.dim - 2))


def llama3_scaled(rope: Rope, inv_freq: Tensor) -> Tensor:
    """Llama 3.1's frequencies: long wavelengths divided by ``factor``, short ones kept, a smooth
    interpolation between ``original_context / high_freq_factor`` and ``/ low_freq_factor``."""
    low_wavelen = rope.original_context / rope.low_freq_factor
    high_wavelen = rope.original_context / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (rope.original_context / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def longrope_inv_freq(rope: Rope, factors: tuple[float, ...]) -> Tensor:
    """LongRoPE's frequencies: the plain ones, each divided by its factor."""
    return 1.0 / (torch.tensor(factors, dtype=torch.float32) * rope.theta ** exponents(rope.dim))


def initial_inv_freq(rope: Rope) -> Tensor:
    """The inverse frequencies up to the original context (all lengths for the static variants)."""
    if rope.rope_type == "longrope":
        return longrope_inv_freq(rope, rope.short_factor)
    theta = dynamic_theta(rope, rope.original_context) if rope.rope_type == "dynamic" else rope.theta
    inv_freq = 1.0 / (theta ** exponents(rope.dim))
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    return llama3_scaled(rope, inv_freq) if rope.rope_type == "llama3" else inv_freq


class RotaryEmbedding(nn.Module):
    """cos/sin tables ``[B, 1, S, dim]`` from explicit position ids (no cached maximum length)."""

    def __init__(self, rope: Rope) -> None:
        super().__init__()
        self.rope = rope
        self.register_buffer("inv_freq", initial_inv_freq(rope), persistent=False)
        if rope.rope_type == "dynamic":
            self.register_buffer("exponents", exponents(rope.dim), persistent=False)
        if rope.rope_type == "longrope":
            self.register_buffer("long_inv_freq", longrope_inv_freq(rope, rope.long_factor), persistent=False)

    def frequencies(self, position_ids: Tensor) -> Tensor:
        """The step's inverse frequencies: fixed, or picked by the length the step reaches."""
        if not self.rope.length_dependent:
            return self.inv_freq
        length = (position_ids.max() + 1).float()
        if self.rope.rope_type == "dynamic":
            longer = 1.0 / (dynamic_theta(self.rope, length) ** self.exponents)
        else:
            longer = self.long_inv_freq
        return torch.where(length > self.rope.original_context, longer, self.inv_freq)

    def forward(self, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        freqs = position_ids.float().unsqueeze(-1) * self.frequencies(position_ids)  # [B, S, D/2]
        angles = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)  # [B, 1, S, D]
        if self.rope.attention_scaling == 1.0:
            return angles.cos(), angles.sin()
        return angles.cos() * self.rope.attention_scaling, angles.sin() * self.rope.attention_scaling


def rotate_half(x: Tensor) -> Tensor:
    """Swap the two halves of the last dimension, negating the second (Llama RoPE convention)."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return x * cos + rotate_half(x) * sin
