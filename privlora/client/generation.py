"""Autoregressive generation over a step function with an explicit KV cache, on numpy arrays.

The loop is independent of how a step is computed: the secure client (public ONNX segments +
encrypted private rounds) and the plaintext torch model (through ``privlora.models.step.TorchStep``)
expose the same step signature. It runs on numpy so that a client needs no torch.
Conventions follow Hugging Face ``generate``: greedy by default; with sampling, temperature then
top-p (nucleus) filtering; generation stops after an eos token (which is yielded) or
``max_new_tokens``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from privlora.errors import UsageError


class ContextLengthError(UsageError):
    """The prompt and the tokens asked for do not fit the model's context."""


DEFAULT_MAX_NEW_TOKENS = 256  # one default for generate, chat and the gateway
MAX_NEW_TOKENS = 1024  # the longest answer one request may ask for: minutes at the slowest backend, not hours


def answer_length(requested: int | None, prompt_tokens: int, context_length: int) -> int:
    """The tokens an answer may take: as many as asked, else the default or the rest of the
    context, whichever is less (at least 1: a full context is then refused by check_context)."""
    if requested is not None:
        return requested
    return max(1, min(DEFAULT_MAX_NEW_TOKENS, context_length - prompt_tokens))


def check_context(prompt_tokens: int, max_new_tokens: int, context_length: int) -> None:
    """Refuse, before any work, a generation that would run past the model's positions."""
    if prompt_tokens >= context_length:
        raise ContextLengthError(f"a {prompt_tokens}-token prompt leaves no room for an answer in the model's context "
                                 f"of {context_length} positions: shorten the prompt")
    if prompt_tokens + max_new_tokens > context_length:
        raise ContextLengthError(f"a {prompt_tokens}-token prompt and up to {max_new_tokens} new tokens exceed the "
                                 f"model's context of {context_length} positions: shorten the prompt or ask for fewer "
                                 "new tokens")


class CausalStep(Protocol):
    """``logits, keys, values = step(input_ids, position_ids, attention_mask, past_k, past_v)``."""

    def __call__(self, input_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray,
                 past_keys: np.ndarray, past_values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...

    def empty_cache(self, batch_size: int = 1) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
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


def next_token(logits: np.ndarray, config: GenerationConfig, rng: np.random.Generator) -> int:
    """Pick the next token from the last position's logits ``[vocab]``."""
    if not config.do_sample:
        return int(np.argmax(logits))
    scaled = np.asarray(logits, dtype=np.float64) / config.temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if config.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        sorted_probs = probs[order]
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        sorted_probs[np.cumsum(sorted_probs) - sorted_probs >= config.top_p] = 0.0
        probs = np.zeros_like(probs)
        probs[order] = sorted_probs
    return int(rng.choice(probs.size, p=probs / probs.sum()))


def _left_padded(prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Input ids, attention mask and position ids for prompts of different lengths."""
    if not prompts or any(not prompt for prompt in prompts):
        raise ValueError("the prompt is empty")
    width = max(len(prompt) for prompt in prompts)
    input_ids = np.zeros((len(prompts), width), dtype=np.int64)
    attention_mask = np.zeros((len(prompts), width), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = prompt
        attention_mask[row, width - len(prompt):] = 1
    return input_ids, attention_mask, np.maximum(attention_mask.cumsum(-1) - 1, 0)


def decode_steps(step: CausalStep, prompts: list[list[int]], config: GenerationConfig) -> Iterator[np.ndarray]:
    """Yield the next token of every row (``[B]``) at each step until every row has produced an
    eos or ``max_new_tokens`` is reached. The prompts are left-padded and prefilled in one step;
    later steps feed one token per row and reuse the KV cache."""
    rng = np.random.default_rng(config.seed)
    input_ids, attention_mask, position_ids = _left_padded(prompts)
    past_keys, past_values = step.empty_cache(len(prompts))
    eos = np.asarray(config.eos_token_ids, dtype=np.int64)
    finished = np.zeros(len(prompts), dtype=bool)
    for _ in range(config.max_new_tokens):
        logits, past_keys, past_values = step(input_ids, position_ids, attention_mask, past_keys, past_values)
        tokens = np.array([next_token(row, config, rng) for row in logits[:, -1]], dtype=np.int64)
        yield tokens
        finished |= np.isin(tokens, eos)
        if finished.all():
            return
        input_ids = tokens[:, None]
        position_ids = position_ids[:, -1:] + 1
        attention_mask = np.concatenate((attention_mask, np.ones_like(input_ids)), axis=1)


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
