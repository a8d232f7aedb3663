"""Autoregressive generation over a step function with an explicit KV cache.

The loop is independent of how a step is computed: the plaintext model, and later the secure
client (public ONNX segments + encrypted private rounds), expose the same step signature.
Conventions follow Hugging Face ``generate``: greedy by default; with sampling, temperature then
top-p (nucleus) filtering; generation stops after an eos token (which is yielded) or
``max_new_tokens``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor


class CausalStep(Protocol):
    """``logits, keys, values = step(input_ids, position_ids, attention_mask, past_k, past_v)``."""

    def __call__(
        self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor, past_keys: Tensor, past_values: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]: ...

    def empty_cache(self, batch_size: int = 1) -> tuple[Tensor, Tensor]: ...


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if self.do_sample and self.temperature <= 0:
            raise ValueError("temperature must be positive when sampling")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")


def next_token(logits: Tensor, config: GenerationConfig, generator: torch.Generator | None) -> int:
    """Pick the next token from the last position's logits ``[vocab]``."""
    if not config.do_sample:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / config.temperature, dim=-1)
    if config.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        outside = sorted_probs.cumsum(-1) - sorted_probs >= config.top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


@torch.no_grad()
def generate(step: CausalStep, prompt_ids: list[int], config: GenerationConfig) -> Iterator[int]:
    """Yield new token ids one at a time: the whole prompt is prefilled in one step, then one
    token per step reusing the KV cache."""
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    generator = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
    past_keys, past_values = step.empty_cache(1)
    input_ids = torch.tensor([prompt_ids], dtype=torch.int64)
    position_ids = torch.arange(len(prompt_ids), dtype=torch.int64).unsqueeze(0)
    for _ in range(config.max_new_tokens):
        length = int(position_ids[0, -1]) + 1
        attention_mask = torch.ones((1, length), dtype=torch.int64)
        logits, past_keys, past_values = step(input_ids, position_ids, attention_mask, past_keys, past_values)
        token = next_token(logits[0, -1], config, generator)
        yield token
        if token in config.eos_token_ids:
            return
        input_ids = torch.tensor([[token]], dtype=torch.int64)
        position_ids = torch.tensor([[length]], dtype=torch.int64)
