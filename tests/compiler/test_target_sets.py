"""Every LoRA target set compiles and generates what transformers + peft generate.

The round schedule, and so where the cuts fall, depends on which projections an adapter targets.
With k_proj but not q_proj, q is computed before the round and read after it, together with its
dtype; that dtype once crossed the cut as an ONNX input and the compile failed. Each set below is
compiled on a two-layer Llama, and the secure-generation tokens must equal the greedy tokens of
transformers' LlamaForCausalLM with the peft adapter.

The backend is ``reference`` (float rounds, as fast as ``plain``): ``plain`` quantises inputs to 8
bits and adds fresh random noise, which moves these logits by up to 0.07, and with gate_proj alone
the top two logits of the first step are 0.008 apart, so its tokens may legitimately differ.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from peft import PeftModel

from conftest import write_tiny_adapter, write_tiny_llama
from privlora.compiler.driver import compile_artifact
from privlora.local import open_local
from privlora.client.generation import GenerationConfig, generate

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGET_SETS = [[name] for name in PROJECTIONS] + [
    ["k_proj", "v_proj"], ["q_proj", "v_proj"], ["o_proj", "down_proj"], ["gate_proj", "up_proj"], PROJECTIONS]
PROMPT = [4, 8, 15, 16, 23, 42]
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("target-sets") / "base", num_hidden_layers=2)


@torch.no_grad()
def peft_greedy(base: Path, adapter: Path) -> list[int]:
    """transformers + peft greedy decoding, recomputing the whole sequence at each step."""
    model = PeftModel.from_pretrained(
        transformers.LlamaForCausalLM.from_pretrained(str(base), attn_implementation="eager"), str(adapter)).eval()
    ids = torch.tensor([PROMPT])
    for _ in range(NEW_TOKENS):
        ids = torch.cat((ids, model(ids).logits[:, -1:].argmax(-1)), dim=1)
    return ids[0, len(PROMPT):].tolist()


@pytest.mark.parametrize("targets", TARGET_SETS, ids="+".join)
def test_secure_generation_equals_peft(base: Path, tmp_path: Path, targets: list[str]) -> None:
    adapter = write_tiny_adapter(base, tmp_path / "adapter", targets)
    report = compile_artifact(str(base), adapter, tmp_path / "artifact", backend="reference")
    assert report.sites == 2 * len(targets)
    secure = list(generate(open_local(report.artifact), PROMPT, GenerationConfig(max_new_tokens=NEW_TOKENS)))
    assert secure == peft_greedy(base, adapter)
