"""The generation loop: KV-cached greedy decoding equals recomputation; sampling conventions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import step_inputs
from privlora.models.checkpoint import build_model
from privlora.models.step import TorchStep
from privlora.client.generation import GenerationConfig, generate, generate_batch, next_token


def recompute_greedy(model, prompt, steps):
    tokens = list(prompt)
    for _ in range(steps):
        input_ids = torch.tensor([tokens])
        with torch.no_grad():
            logits = model.model(input_ids, *step_inputs(input_ids), *model.model.empty_cache(1))[0]
        tokens.append(int(logits[0, -1].argmax()))
    return tokens[len(prompt):]


def test_greedy_with_cache_equals_recomputation(tiny_llama):
    model = TorchStep(build_model(tiny_llama))
    prompt = [5, 17, 42, 8]
    generated = list(generate(model, prompt, GenerationConfig(max_new_tokens=12)))
    assert generated == recompute_greedy(model, prompt, 12)


def test_generation_stops_at_eos_and_yields_it(tiny_llama):
    model = TorchStep(build_model(tiny_llama))
    free_run = list(generate(model, [3, 4, 5], GenerationConfig(max_new_tokens=10)))
    eos = free_run[4]
    stopped = list(generate(model, [3, 4, 5], GenerationConfig(max_new_tokens=10, eos_token_ids=(eos,))))
    assert stopped == free_run[: free_run.index(eos) + 1]


def test_sampling_is_seeded_and_top_p_keeps_the_nucleus(tiny_llama):
    model = TorchStep(build_model(tiny_llama))
    sample = GenerationConfig(max_new_tokens=8, do_sample=True, temperature=1.5, seed=7)
    assert list(generate(model, [1, 2], sample)) == list(generate(model, [1, 2], sample))
    tiny_nucleus = GenerationConfig(max_new_tokens=8, do_sample=True, top_p=1e-6, seed=3)
    greedy = GenerationConfig(max_new_tokens=8)
    assert list(generate(model, [1, 2], tiny_nucleus)) == list(generate(model, [1, 2], greedy))


def test_top_p_never_samples_outside_the_nucleus():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    config = GenerationConfig(do_sample=True, top_p=0.7)
    generator = np.random.default_rng(0)
    assert {next_token(logits, config, generator) for _ in range(300)} == {0, 1}


@pytest.mark.parametrize("options", [dict(max_new_tokens=0), dict(do_sample=True, temperature=0.0), dict(top_p=0.0)])
def test_invalid_generation_options(options):
    with pytest.raises(ValueError):
        GenerationConfig(**options)


def test_empty_prompt_is_an_error(tiny_llama):
    with pytest.raises(ValueError, match="empty"):
        next(generate(TorchStep(build_model(tiny_llama)), [], GenerationConfig()))


def test_batched_generation_equals_one_prompt_at_a_time(tiny_llama):
    model = TorchStep(build_model(tiny_llama))
    prompts = [[5, 17, 42, 8], [3], [9, 9, 1, 2, 4, 120, 7]]
    config = GenerationConfig(max_new_tokens=9)
    expected = [list(generate(model, prompt, config)) for prompt in prompts]
    assert generate_batch(model, prompts, config) == expected
    eos = expected[0][2]
    with_eos = GenerationConfig(max_new_tokens=9, eos_token_ids=(eos,))
    rows = generate_batch(model, prompts, with_eos)
    assert rows == [list(generate(model, prompt, with_eos)) for prompt in prompts]
    assert rows[0][-1] == eos and len(rows[0]) == 3
