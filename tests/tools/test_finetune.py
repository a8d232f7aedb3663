"""``privlora finetune`` on a tiny random model with the SmolLM2 tokenizer: a standard peft adapter
comes out, the loss falls, and privlora's model attaches the result exactly like peft."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from peft import PeftModel

from conftest import step_inputs, write_tiny_llama
from privlora.cli import main
from privlora.tools.finetune import IGNORE_INDEX, answer_loss, collate, encode_example
from privlora.models.loading import load_model
from privlora.models.hf_tokenizer import TOKENIZER_FILES, load_tokenizer
from privlora.tools.qa import load_qa

pytestmark = pytest.mark.smollm2  # borrows the embedded model's tokenizer


@pytest.fixture
def tiny_chat_model(tmp_path, smollm2_dir):
    """A tiny random Llama with SmolLM2's vocabulary and tokenizer files."""
    checkpoint = write_tiny_llama(tmp_path / "tiny-chat", vocab_size=49152, hidden_size=32, head_dim=8,
                                  intermediate_size=48, num_hidden_layers=2, tie_word_embeddings=True)
    for name in (*TOKENIZER_FILES, "special_tokens_map.json"):
        if (smollm2_dir / name).is_file():
            shutil.copy(smollm2_dir / name, checkpoint / name)
    return checkpoint


def test_encode_example_masks_the_prompt(smollm2_dir):
    tokenizer = load_tokenizer(smollm2_dir)
    pair = load_qa(split="train")[0]
    ids, labels = encode_example(tokenizer, pair)
    answer_start = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert tokenizer.decode(ids[answer_start:]) == pair.answer + "<|im_end|>"
    assert labels[answer_start:] == ids[answer_start:]


def test_answer_loss_equals_the_labels_loss(tiny_chat_model):
    tokenizer = load_tokenizer(tiny_chat_model)
    model = transformers.LlamaForCausalLM.from_pretrained(str(tiny_chat_model))
    batch = collate([encode_example(tokenizer, pair) for pair in load_qa(split="train")[:4]], tokenizer.pad_token_id)
    with torch.no_grad():
        assert torch.allclose(answer_loss(model, batch), model(**batch).loss, atol=1e-5)


def test_finetune_writes_a_peft_adapter_that_privlora_loads(tiny_chat_model, tmp_path, capsys):
    data = tmp_path / "small.jsonl"
    pairs = load_qa(split="train")[:12]
    data.write_text("".join(json.dumps(pair.__dict__) + "\n" for pair in pairs))
    out = tmp_path / "adapter"
    code = main(["finetune", "--base", str(tiny_chat_model), "--data", str(data), "-o", str(out),
                 "--epochs", "4", "--lr", "1e-2", "--batch-size", "4", "--rank", "4"])
    assert code == 0
    assert "wrote" in capsys.readouterr().out
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == str(tiny_chat_model)
    info = json.loads((out / "training_info.json").read_text())
    assert info["epoch_losses"][-1] < info["epoch_losses"][0]

    input_ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    base = transformers.LlamaForCausalLM.from_pretrained(str(tiny_chat_model), attn_implementation="eager")
    with torch.no_grad():
        expected = PeftModel.from_pretrained(base, str(out)).eval()(input_ids).logits
        ours = load_model(tiny_chat_model, out).model
        logits = ours(input_ids, *step_inputs(input_ids), *ours.empty_cache(1))[0]
    assert (logits - expected).abs().max() < 1e-4
