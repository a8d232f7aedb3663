"""The embedded SmolLM2-135M-Instruct: conversion cache, tokenizer quirks, parity with
transformers and peft, and the demo adapter's effect."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from peft import PeftModel

from conftest import step_inputs
from privlora.paths import DEMO_ADAPTER
from privlora.tools.evaluate import ask, evaluate_facts
from privlora.models import smollm2
from privlora.paths import CACHE_ENV_VAR
from privlora.models.checkpoint import build_model
from privlora.models.loading import load_model
from privlora.models.step import TorchStep
from privlora.models.hf_tokenizer import encode_chat, load_tokenizer
from privlora.tools.qa import load_qa

pytestmark = pytest.mark.smollm2

QUESTION = "What is the capital of France?"


def test_conversion_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path))
    first = smollm2.ensure_converted()
    assert first.parent == tmp_path
    files = {path.name for path in first.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", smollm2.COMPLETE_MARKER} <= files
    assert "tokenizer.model" not in files  # the GGUF copy transformers saves as the vocab file
    marker_time = (first / smollm2.COMPLETE_MARKER).stat().st_mtime_ns
    assert smollm2.ensure_converted() == first
    assert (first / smollm2.COMPLETE_MARKER).stat().st_mtime_ns == marker_time  # not converted again
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".convert-")]


def test_tokenizer_quirks_are_handled(smollm2_dir):
    tokenizer = load_tokenizer(smollm2_dir)
    ids = encode_chat(tokenizer, QUESTION)
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[0] == start and ids[1] != start  # exactly one <|im_start|> at the beginning
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id


@pytest.fixture(scope="module")
def prompt_ids(smollm2_dir):
    return torch.tensor([encode_chat(load_tokenizer(smollm2_dir), QUESTION)])


def logits_of(model, input_ids):
    with torch.no_grad():
        return model(input_ids, *step_inputs(input_ids), *model.empty_cache(1))[0]


def test_base_logits_match_transformers(smollm2_dir, prompt_ids):
    reference = transformers.LlamaForCausalLM.from_pretrained(str(smollm2_dir), attn_implementation="eager").eval()
    with torch.no_grad():
        expected = reference(prompt_ids).logits
    error = (logits_of(build_model(smollm2_dir), prompt_ids) - expected).abs().max().item()
    print(f"SmolLM2 base: max |logits - transformers| = {error:.2e}")
    assert error < 1e-4


def test_adapted_logits_match_peft(smollm2_dir, prompt_ids):
    base = transformers.LlamaForCausalLM.from_pretrained(str(smollm2_dir), attn_implementation="eager")
    reference = PeftModel.from_pretrained(base, str(DEMO_ADAPTER)).eval()
    with torch.no_grad():
        expected = reference(prompt_ids).logits
    loaded = load_model(smollm2_dir, DEMO_ADAPTER)
    assert len(loaded.lora_sites) == 60  # q_proj and v_proj in 30 layers
    error = (logits_of(loaded.model, prompt_ids) - expected).abs().max().item()
    print(f"SmolLM2 + demo adapter: max |logits - peft| = {error:.2e}")
    assert error < 1e-4


def test_cached_decode_equals_recomputation(smollm2_dir, prompt_ids):
    model = build_model(smollm2_dir)
    full = logits_of(model, prompt_ids)
    split = prompt_ids.shape[1] - 3
    with torch.no_grad():
        logits, keys, values = model(prompt_ids[:, :split], *step_inputs(prompt_ids[:, :split]), *model.empty_cache(1))
        pieces = [logits]
        for position in range(split, prompt_ids.shape[1]):
            token = prompt_ids[:, position : position + 1]
            logits, keys, values = model(token, *step_inputs(token, position), keys, values)
            pieces.append(logits)
    assert (torch.cat(pieces, dim=1) - full).abs().max() < 1e-4


def test_base_model_answers_sensibly(smollm2_dir):
    loaded = load_model(smollm2_dir)
    assert "Paris" in ask(TorchStep(loaded.model), loaded.tokenizer, QUESTION)


def test_demo_adapter_states_facts_the_base_model_does_not_know(smollm2_dir):
    pairs = load_qa(split="heldout")
    base = load_model(smollm2_dir)
    adapted = load_model(smollm2_dir, DEMO_ADAPTER)
    base_report = evaluate_facts(TorchStep(base.model), base.tokenizer, pairs, "base")
    adapted_report = evaluate_facts(TorchStep(adapted.model), adapted.tokenizer, pairs, "adapted")
    print(f"held-out fact match: base {base_report.matched}/{len(pairs)}, adapted {adapted_report.matched}/{len(pairs)}")
    assert base_report.match_rate <= 0.05
    assert adapted_report.match_rate >= 0.2  # measured 19/70 (27%) for the shipped adapter


def test_evaluate_and_demo_commands(capsys):
    from privlora.cli import main

    assert main(["evaluate", "--limit", "2", "--json"]) == 0
    rates = json.loads(capsys.readouterr().out)
    assert rates["base"]["questions"] == rates["adapted"]["questions"] == 2
    # the demo's wiring (compile, in-process server, client, timing table) with the fast unencrypted
    # backend; tests/test_secure_smollm2.py runs the same path with ckks encryption over HTTP
    assert main(["demo", "--questions", "1", "--backend", "plain"]) == 0
    shown = capsys.readouterr().out
    first = load_qa(split="heldout")[0]
    assert first.question in shown and "base model (plaintext)" in shown and "fine-tuned, secure" in shown
    assert "fine-tuned, plaintext" in shown and "decode (mean of" in shown
