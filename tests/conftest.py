"""Shared fixtures: tiny random-weight Llama checkpoints and peft adapters, and the embedded
SmolLM2 base model (converted once into the user cache)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model

TINY_LLAMA: dict[str, Any] = dict(
    vocab_size=160, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
    rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
)

# Variants the definition must match transformers on: GQA, MHA, MQA, tied embeddings, biases.
TINY_VARIANTS: dict[str, dict[str, Any]] = {
    "gqa": {},
    "mha-tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "mqa-bias": dict(num_key_value_heads=1, attention_bias=True, mlp_bias=True),
    "smollm2-shape": dict(hidden_size=96, num_attention_heads=3, num_key_value_heads=1, head_dim=32,
                          tie_word_embeddings=True, rope_theta=100000.0),
}


def write_tiny_llama(directory: Path, seed: int = 0, **overrides: Any) -> Path:
    """Save a random-weight transformers LlamaForCausalLM checkpoint (config.json + safetensors)."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**TINY_LLAMA, **overrides})
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # larger-than-default weights so that mistakes show in the logits
        for param in model.parameters():
            param.mul_(3.0)
    model.save_pretrained(str(directory), safe_serialization=True)
    return directory


def write_tiny_qwen2(directory: Path, seed: int = 0, **overrides: Any) -> Path:
    """Save a random-weight transformers Qwen2ForCausalLM checkpoint (q/k/v biases included)."""
    torch.manual_seed(seed)
    fields = {k: v for k, v in TINY_LLAMA.items() if k != "head_dim"}  # Qwen2 derives head_dim
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**{**fields, **overrides}))
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(3.0)
    model.save_pretrained(str(directory), safe_serialization=True)
    return directory


def write_tiny_adapter(base_dir: Path, directory: Path, targets: list[str], rank: int = 4,
                       alpha: float = 8.0, seed: int = 1, **lora: Any) -> Path:
    """Save a peft LoRA adapter with random (non-zero) A and B for the checkpoint at base_dir."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir))
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, **lora)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(str(directory), safe_serialization=True)
    return directory


@pytest.fixture
def tiny_llama(tmp_path: Path) -> Path:
    return write_tiny_llama(tmp_path / "tiny-llama")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from privlora.models.loading import resolve_base

    return resolve_base("smollm2")


def step_inputs(input_ids: torch.Tensor, past_length: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids and an all-ones attention mask for new tokens after ``past_length`` cached ones."""
    batch, length = input_ids.shape
    positions = torch.arange(past_length, past_length + length).expand(batch, length)
    return positions, torch.ones((batch, past_length + length), dtype=torch.int64)
