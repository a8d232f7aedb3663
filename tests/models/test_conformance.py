"""The architecture contract, checked the same way for every registered architecture.

Parametrised over ``privlora.models.registry.ARCHITECTURES``: registering an architecture adds it
here, and the suite fails until FACTORIES has its test material under its ``model_type``. Further
FACTORIES entries run a family's variants (``rope_scaling`` types) through the same checks. For
each one: ``describe`` on the tiny config, parity with the reference implementation, cached decode
against recomputation, the torch.fx trace against eager, and compile + secure generation against
the plaintext tokens.

The length-dependent rope variants get a context shorter than the generated sequence: the parity
pass (11 tokens) and secure generation (4 + 6) then run beyond it, where dynamic NTK rescales and
LongRoPE switches to its long factors, while cached decode stays within it (beyond, transformers'
own cached decode and recomputation differ, as each step's keys keep the frequencies of their step).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from torch import Tensor

from chatglm2_reference import thudm_logits, write_chatglm2_adapter, write_tiny_chatglm2
from conftest import (step_inputs, write_tiny_adapter, write_tiny_gemma, write_tiny_llama, write_tiny_mistral,
                      write_tiny_phi3, write_tiny_qwen2, write_tiny_tokenizer)
from privlora.compiler.driver import CompileReport, compile_artifact
from privlora.compiler.frontend import trace
from privlora.core.artifact import TOKENIZER_DIR
from privlora.core.inspection import render, summary
from privlora.core.types import ModelShape
from privlora.models.checkpoint import build_model, read_config
from privlora.models.loading import load_model
from privlora.models.registry import ARCHITECTURES, Architecture
from privlora.models.step import TorchStep
from privlora.local import open_local
from privlora.client.generation import GenerationConfig, generate
from privlora.client.tokenizer import load_client_tokenizer

TOLERANCE = 1e-4
PROMPT = [4, 8, 15, 16]
GENERATION = GenerationConfig(max_new_tokens=6)


@torch.no_grad()
def transformers_logits(model_class: type[transformers.PreTrainedModel], base: Path, input_ids: Tensor) -> Tensor:
    """The logits of transformers' own implementation of the checkpoint at ``base``."""
    return model_class.from_pretrained(str(base), attn_implementation="eager").eval()(input_ids).logits


@dataclass(frozen=True)
class Factory:
    """One architecture's conformance material. ``write_adapter`` must change the generated tokens,
    or the secure-generation check could not tell whether the private rounds ran."""

    write_base: Callable[[Path], Path]  # a tiny random-weight checkpoint in the family's own format
    write_adapter: Callable[[Path, Path], Path]  # (base, directory) -> a peft adapter on that checkpoint
    reference_logits: Callable[[Path, Tensor], Tensor]  # (base, input_ids) -> the reference's logits
    shape: ModelShape  # what describe() must give for the tiny checkpoint's config


def llama_shape(model_type: str, context_length: int = 256, head_dim: int = 16) -> ModelShape:
    """The tiny Llama-like configs' sizes (conftest.TINY_LLAMA)."""
    return ModelShape(model_type, layers=3, hidden_size=64, heads=4, kv_heads=2, head_dim=head_dim, vocab_size=160,
                      context_length=context_length)


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0}  # the tiny heads' wavelengths fall in all three bands
LONGROPE = {"type": "longrope", "short_factor": [1.0 + i / 4 for i in range(8)],
            "long_factor": [2.0 + i for i in range(8)]}
PHI3_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
llama_logits = partial(transformers_logits, transformers.LlamaForCausalLM)
phi3_logits = partial(transformers_logits, transformers.Phi3ForCausalLM)

FACTORIES: dict[str, Factory] = {
    "llama": Factory(write_tiny_llama, partial(write_tiny_adapter, targets=["v_proj", "o_proj", "up_proj"]),
                     llama_logits, llama_shape("llama")),
    "llama-rope-linear": Factory(partial(write_tiny_llama, rope_scaling={"rope_type": "linear", "factor": 4.0}),
                                 partial(write_tiny_adapter, targets=["k_proj", "v_proj"]),
                                 llama_logits, llama_shape("llama")),
    "llama-rope-dynamic": Factory(partial(write_tiny_llama, rope_scaling={"rope_type": "dynamic", "factor": 3.0},
                                          max_position_embeddings=8),
                                  partial(write_tiny_adapter, targets=["q_proj", "down_proj"]),
                                  llama_logits, llama_shape("llama", context_length=8)),
    "llama-rope-llama3": Factory(partial(write_tiny_llama, rope_scaling=LLAMA3_ROPE),
                                 partial(write_tiny_adapter, targets=["q_proj", "v_proj"]),
                                 llama_logits, llama_shape("llama")),
    "qwen2": Factory(write_tiny_qwen2, partial(write_tiny_adapter, targets=["q_proj", "v_proj", "down_proj"]),
                     partial(transformers_logits, transformers.Qwen2ForCausalLM), llama_shape("qwen2")),
    "mistral": Factory(write_tiny_mistral, partial(write_tiny_adapter, targets=["q_proj", "k_proj", "v_proj", "gate_proj"]),
                       partial(transformers_logits, transformers.MistralForCausalLM), llama_shape("mistral")),
    "phi3": Factory(write_tiny_phi3, partial(write_tiny_adapter, targets=PHI3_TARGETS), phi3_logits,
                    llama_shape("phi3")),
    "phi3-longrope": Factory(partial(write_tiny_phi3, rope_scaling=LONGROPE, original_max_position_embeddings=8),
                             partial(write_tiny_adapter, targets=["qkv_proj", "down_proj"]), phi3_logits,
                             llama_shape("phi3")),
    # Gemma's scaled, tied embeddings make the tiny base repeat its input: a stronger adapter changes that.
    "gemma": Factory(write_tiny_gemma, partial(write_tiny_adapter, targets=["k_proj", "o_proj", "gate_proj"], alpha=32.0),
                     partial(transformers_logits, transformers.GemmaForCausalLM),
                     llama_shape("gemma", head_dim=24)),
    "chatglm": Factory(write_tiny_chatglm2,
                       partial(write_chatglm2_adapter, targets=["query_key_value", "dense_4h_to_h"]),
                       thudm_logits,
                       ModelShape("chatglm", layers=2, hidden_size=64, heads=4, kv_heads=2, head_dim=8,
                                  vocab_size=160, context_length=256)),
}


@dataclass(frozen=True)
class Case:
    """One architecture's tiny checkpoint and adapter, written once per session."""

    record: Architecture
    factory: Factory
    base: Path
    adapter: Path

    @property
    def config(self) -> dict[str, Any]:
        return read_config(self.base)


@pytest.fixture(scope="session", params=sorted(set(ARCHITECTURES) | set(FACTORIES)))
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    name = request.param
    if name not in FACTORIES:
        pytest.fail(f"architecture {name!r} is registered but has no conformance Factory in FACTORIES")
    factory = FACTORIES[name]
    root = tmp_path_factory.mktemp(name)
    base = write_tiny_tokenizer(factory.write_base(root / "base"), factory.shape.vocab_size)
    return Case(ARCHITECTURES[factory.shape.architecture], factory, base, factory.write_adapter(base, root / "adapter"))


@pytest.fixture(scope="session")
def compiled(case: Case, tmp_path_factory: pytest.TempPathFactory) -> CompileReport:
    """The architecture's artifact, with real CKKS encryption (exact to 1e-4, so greedy tokens match)."""
    output = tmp_path_factory.mktemp(f"{case.record.model_type}-artifact") / "artifact"
    return compile_artifact(str(case.base), case.adapter, output, backend="ckks")


@torch.no_grad()
def full_logits(model: torch.nn.Module, input_ids: Tensor) -> Tensor:
    return model(input_ids, *step_inputs(input_ids), *model.empty_cache(input_ids.shape[0]))[0]


def random_ids(vocab_size: int, batch: int, length: int) -> Tensor:
    return torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))


def test_describe_gives_the_tiny_config_sizes(case: Case) -> None:
    assert case.record.describe(case.config) == case.factory.shape


def test_matches_the_reference_implementation(case: Case) -> None:
    input_ids = random_ids(case.factory.shape.vocab_size, 2, 11)
    expected = case.factory.reference_logits(case.base, input_ids)
    assert expected.shape == (2, 11, case.factory.shape.vocab_size)
    assert expected.abs().max() > 1.0  # the comparison is not between near-zero tensors
    assert (full_logits(build_model(case.base), input_ids) - expected).abs().max() < TOLERANCE


def test_cached_decode_equals_recomputation(case: Case) -> None:
    model, shape = load_model(case.base, case.adapter).model, case.factory.shape
    input_ids = random_ids(shape.vocab_size, 1, 8)
    expected = full_logits(model, input_ids)
    assert (expected - full_logits(build_model(case.base), input_ids)).abs().max() > 1e-3  # the adapter matters
    with torch.no_grad():
        keys, values = model.empty_cache(1)
        assert keys.shape == values.shape == (shape.layers, 1, shape.kv_heads, 0, shape.head_dim)
        logits, keys, values = model(input_ids[:, :5], *step_inputs(input_ids[:, :5]), keys, values)
        steps = [logits]
        for position in range(5, 8):
            token = input_ids[:, position:position + 1]
            logits, keys, values = model(token, *step_inputs(token, position), keys, values)
            steps.append(logits)
    assert keys.shape == (shape.layers, 1, shape.kv_heads, 8, shape.head_dim)
    assert (torch.cat(steps, dim=1) - expected).abs().max() < TOLERANCE


def test_trace_equals_eager(case: Case) -> None:
    model = load_model(case.base, case.adapter).model
    traced = trace(model)
    placeholders = [node.name for node in traced.graph.nodes if node.op == "placeholder"]
    assert placeholders == ["input_ids", "position_ids", "attention_mask", "past_keys", "past_values"]
    prompt, token = random_ids(case.factory.shape.vocab_size, 1, 6), torch.tensor([[7]])
    with torch.no_grad():
        eager_prefill = model(prompt, *step_inputs(prompt), *model.empty_cache(1))
        traced_prefill = traced(prompt, *step_inputs(prompt), *model.empty_cache(1))
        eager_decode = model(token, *step_inputs(token, 6), *eager_prefill[1:])
        traced_decode = traced(token, *step_inputs(token, 6), *traced_prefill[1:])
    for eager, traced_out in zip(eager_prefill + eager_decode, traced_prefill + traced_decode):
        assert torch.equal(eager, traced_out)


def test_secure_generation_equals_plaintext(case: Case, compiled: CompileReport) -> None:
    loaded = load_model(case.base, case.adapter)
    assert compiled.sites == len(loaded.lora_sites)
    plaintext = list(generate(TorchStep(loaded.model), PROMPT, GENERATION))
    assert plaintext != list(generate(TorchStep(build_model(case.base)), PROMPT, GENERATION))
    assert list(generate(open_local(compiled.artifact), PROMPT, GENERATION)) == plaintext


SECURE_LOGITS_TOLERANCE = 5e-2  # CKKS end to end on tiny models, every position: measured up to 1.1e-2


def test_chat_prompt_from_the_artifact_tokenizer(case: Case, compiled: CompileReport) -> None:
    """The artifact carries the checkpoint's tokenizer: the client's chat prompt is transformers'
    and fits the vocabulary, and the secure prefill of it gives the plaintext model's logits.
    Logits, not tokens: on a random tiny model a chat prompt's top two logits can be 6e-4 apart
    (llama-rope-llama3), less than CKKS's 2e-3 error, so greedy tokens would flip at random."""
    client = load_client_tokenizer(compiled.artifact / TOKENIZER_DIR)
    reference = transformers.AutoTokenizer.from_pretrained(str(case.base))
    messages = [{"role": "user", "content": "When does the clinic open?"}]
    prompt = client.encode_chat(messages)
    assert prompt == reference.apply_chat_template(messages, add_generation_prompt=True)
    assert max(prompt) < case.factory.shape.vocab_size
    ids = np.array([prompt])
    step_args = (ids, np.arange(len(prompt))[None], np.ones_like(ids))
    plaintext_step, secure_step = TorchStep(load_model(case.base, case.adapter).model), open_local(compiled.artifact)
    plaintext = plaintext_step(*step_args, *plaintext_step.empty_cache(1))[0]
    secure = secure_step(*step_args, *secure_step.empty_cache(1))[0]
    assert np.abs(secure - plaintext).max() < SECURE_LOGITS_TOLERANCE
    base_step = TorchStep(build_model(case.base))  # control: without the adapter's deltas the logits are far off
    assert np.abs(base_step(*step_args, *base_step.empty_cache(1))[0] - plaintext).max() > 4 * SECURE_LOGITS_TOLERANCE


def test_inspect_reads_the_shape_from_the_manifest(case: Case, compiled: CompileReport) -> None:
    """`privlora inspect` knows no architecture: it reports describe()'s sizes from the manifest
    (ChatGLM2's config has neither num_hidden_layers nor num_key_value_heads)."""
    info = summary(compiled.artifact)
    expected = case.record.describe(read_config(case.base))
    assert {k: info["base"][k] for k in ("architecture", "layers", "hidden_size", "kv_heads", "vocab_size")} == \
        {"architecture": expected.architecture, "layers": expected.layers, "hidden_size": expected.hidden_size,
         "kv_heads": expected.kv_heads, "vocab_size": expected.vocab_size}
    assert f"{expected.layers} layers" in render(info)
