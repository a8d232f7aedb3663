"""The architecture contract, checked the same way for every registered architecture.

Parametrised over ``privlora.models.registry.ARCHITECTURES``: registering an architecture adds it
here, and the suite fails until FACTORIES has its test material. For each one: ``describe`` on the
tiny config, parity with the reference implementation, cached decode against recomputation, the
torch.fx trace against eager, and compile + secure generation against the plaintext tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from torch import Tensor

from chatglm2_reference import thudm_logits, write_chatglm2_adapter, write_tiny_chatglm2
from conftest import step_inputs, write_tiny_adapter, write_tiny_llama, write_tiny_qwen2
from privlora.compiler.driver import CompileReport, compile_artifact
from privlora.compiler.frontend import trace
from privlora.core.inspection import render, summary
from privlora.core.types import ModelShape
from privlora.models.checkpoint import build_model, read_config
from privlora.models.loading import load_model
from privlora.models.registry import ARCHITECTURES, Architecture
from privlora.models.step import TorchStep
from privlora.runtime.client import open_local
from privlora.runtime.generation import GenerationConfig, generate

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


FACTORIES: dict[str, Factory] = {
    "llama": Factory(write_tiny_llama, partial(write_tiny_adapter, targets=["v_proj", "o_proj", "up_proj"]),
                     partial(transformers_logits, transformers.LlamaForCausalLM),
                     ModelShape("llama", layers=3, hidden_size=64, heads=4, kv_heads=2, head_dim=16,
                                vocab_size=160, context_length=256)),
    "qwen2": Factory(write_tiny_qwen2, partial(write_tiny_adapter, targets=["q_proj", "v_proj", "down_proj"]),
                     partial(transformers_logits, transformers.Qwen2ForCausalLM),
                     ModelShape("qwen2", layers=3, hidden_size=64, heads=4, kv_heads=2, head_dim=16,
                                vocab_size=160, context_length=256)),
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


@pytest.fixture(scope="session", params=sorted(ARCHITECTURES))
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    model_type = request.param
    if model_type not in FACTORIES:
        pytest.fail(f"architecture {model_type!r} is registered but has no conformance Factory in FACTORIES")
    factory = FACTORIES[model_type]
    root = tmp_path_factory.mktemp(model_type)
    base = factory.write_base(root / "base")
    return Case(ARCHITECTURES[model_type], factory, base, factory.write_adapter(base, root / "adapter"))


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
    input_ids = random_ids(case.factory.shape.vocab_size, 2, 9)
    expected = case.factory.reference_logits(case.base, input_ids)
    assert expected.shape == (2, 9, case.factory.shape.vocab_size)
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


def test_inspect_reads_the_shape_from_the_manifest(case: Case, compiled: CompileReport) -> None:
    """`privlora inspect` knows no architecture: it reports describe()'s sizes from the manifest
    (ChatGLM2's config has neither num_hidden_layers nor num_key_value_heads)."""
    info = summary(compiled.artifact)
    expected = case.record.describe(read_config(case.base))
    assert {k: info["base"][k] for k in ("architecture", "layers", "hidden_size", "kv_heads", "vocab_size")} == \
        {"architecture": expected.architecture, "layers": expected.layers, "hidden_size": expected.hidden_size,
         "kv_heads": expected.kv_heads, "vocab_size": expected.vocab_size}
    assert f"{expected.layers} layers" in render(info)
