"""``privlora finetune``: train a standard peft LoRA adapter on question/answer pairs, on CPU.

Training uses transformers + peft on the base checkpoint so the output is an ordinary peft
adapter directory (adapter_config.json + adapter_model.safetensors) that any peft user can load;
privlora's own traceable model then attaches the same adapter for compilation. The loss covers
the answer tokens only (the chat-templated question is context).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from privlora.models.hf_tokenizer import encode_chat, load_tokenizer
from privlora.tools.qa import QAPair

IGNORE_INDEX = -100
TRAINING_INFO = "training_info.json"


@dataclass(frozen=True)
class FinetuneConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    epochs: int = 10
    learning_rate: float = 5e-3
    batch_size: int = 8
    warmup_steps: int = 10
    seed: int = 0


@dataclass(frozen=True)
class FinetuneResult:
    adapter_dir: Path
    examples: int
    steps: int
    seconds: float
    first_epoch_loss: float
    last_epoch_loss: float


def encode_example(tokenizer: PreTrainedTokenizerBase, pair: QAPair) -> tuple[list[int], list[int]]:
    """Token ids of prompt + answer + eos, and labels that ignore the prompt."""
    prompt = encode_chat(tokenizer, pair.question)
    answer = tokenizer(pair.answer + tokenizer.eos_token, add_special_tokens=False).input_ids
    return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padding is masked out of attention and of the loss."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.int64)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.int64)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.int64)
    for row, (ids, target) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(target)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def answer_loss(causal_lm: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy over the answer tokens only. Projecting just those positions to
    the vocabulary (instead of every position, as ``labels=`` would) saves a fifth of the work."""
    hidden = causal_lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    scored = targets != IGNORE_INDEX
    logits = causal_lm.lm_head(hidden[:, :-1][scored])
    return torch.nn.functional.cross_entropy(logits, targets[scored])


def _set_base_name(adapter_config: Path, base_name: str) -> None:
    """Record the base as the user named it, not the machine-specific cache path."""
    config = json.loads(adapter_config.read_text())
    config["base_model_name_or_path"] = base_name
    adapter_config.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def finetune(
    base_path: Path, base_name: str, pairs: list[QAPair], out_dir: Path, config: FinetuneConfig = FinetuneConfig()
) -> FinetuneResult:
    """Train a LoRA adapter on ``pairs`` and write it to ``out_dir``."""
    from peft import LoraConfig, get_peft_model

    random.seed(config.seed)
    torch.manual_seed(config.seed)
    tokenizer = load_tokenizer(base_path)
    model = AutoModelForCausalLM.from_pretrained(str(base_path), local_files_only=True, torch_dtype=torch.float32)
    lora_config = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora_config)
    examples = [encode_example(tokenizer, pair) for pair in pairs]
    steps_per_epoch = -(-len(examples) // config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / config.warmup_steps) * max(0.0, 1 - step / total_steps)
    )
    model.train()
    epoch_losses: list[float] = []
    start = time.perf_counter()
    with tqdm(total=total_steps, desc="finetune", unit="step", disable=None) as bar:
        for epoch in range(config.epochs):
            random.shuffle(examples)
            losses = []
            for first in range(0, len(examples), config.batch_size):
                batch = collate(examples[first : first + config.batch_size], tokenizer.pad_token_id)
                loss = answer_loss(model.get_base_model(), batch)
                loss.backward()
                optimizer.step()
                schedule.step()
                optimizer.zero_grad()
                losses.append(loss.item())
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
                bar.update()
            epoch_losses.append(sum(losses) / len(losses))
    seconds = time.perf_counter() - start
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    (out_dir / "README.md").unlink(missing_ok=True)  # peft's hub model-card template
    _set_base_name(out_dir / "adapter_config.json", base_name)
    result = FinetuneResult(out_dir, len(examples), total_steps, seconds, epoch_losses[0], epoch_losses[-1])
    info = {"config": asdict(config), "base": base_name, "examples": len(examples), "steps": total_steps,
            "seconds": round(seconds, 1), "epoch_losses": [round(x, 4) for x in epoch_losses]}
    (out_dir / TRAINING_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return result
