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


def _left_padded(prompts: list[list[int]]) -> tuple[Tensor, Tensor, Tensor]:
    """Input ids, attention mask and position ids for prompts of different lengths."""
    if not prompts or any(not prompt for prompt in prompts):
        raise ValueError("the prompt is empty")
    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.zeros((len(prompts), width), dtype=torch.int64)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.int64)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids, attention_mask, (attention_mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def decode_steps(step: CausalStep, prompts: list[list[int]], config: GenerationConfig) -> Iterator[Tensor]:
    """Yield the next token of every row (``[B]``) at each step until every row has produced an
    eos or ``max_new_tokens`` is reached. The prompts are left-padded and prefilled in one step;
    later steps feed one token per row and reuse the KV cache."""
    generator = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
    input_ids, attention_mask, position_ids = _left_padded(prompts)
    past_keys, past_values = step.empty_cache(len(prompts))
    eos = torch.tensor(config.eos_token_ids, dtype=torch.int64)
    finished = torch.zeros(len(prompts), dtype=torch.bool)
    for _ in range(config.max_new_tokens):
        logits, past_keys, past_values = step(input_ids, position_ids, attention_mask, past_keys, past_values)
        tokens = torch.tensor([next_token(row, config, generator) for row in logits[:, -1]], dtype=torch.int64)
        yield tokens
        finished |= torch.isin(tokens, eos)
        if bool(finished.all()):
            return
        input_ids = tokens.unsqueeze(1)
        position_ids = position_ids[:, -1:] + 1
        attention_mask = torch.cat((attention_mask, torch.ones_like(input_ids)), dim=1)


def generate(step: CausalStep, prompt_ids: list[int], config: GenerationConfig) -> Iterator[int]:
    """Stream the new tokens of one prompt (the eos, if reached, is the last one yielded)."""
    for tokens in decode_steps(step, [prompt_ids], config):
        yield int(tokens[0])


def generate_batch(step: CausalStep, prompts: list[list[int]], config: GenerationConfig) -> list[list[int]]:
    """New tokens of several prompts decoded together; each row stops after its own eos."""
    rows: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for tokens in decode_steps(step, prompts, config):
        for row, token in enumerate(tokens.tolist()):
            if not done[row]:
                rows[row].append(token)
                done[row] = token in config.eos_token_ids
    return rows
