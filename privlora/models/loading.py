"""Load a base model (the embedded SmolLM2 or a local checkpoint) with an optional LoRA adapter."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn
from transformers import PreTrainedTokenizerBase

from privlora.models import smollm2
from privlora.models.checkpoint import build_model, read_config
from privlora.models.lora import LoraAdapter, attach_adapter, read_adapter
from privlora.models.registry import architecture
from privlora.models.hf_tokenizer import has_tokenizer, load_tokenizer

DEFAULT_BASE = "smollm2"


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase | None  # None for weight-only checkpoints (tests, benchmarks)
    base_path: Path
    adapter: LoraAdapter | None
    lora_sites: list[str]


def resolve_base(base: str | Path = DEFAULT_BASE) -> Path:
    """``"smollm2"`` (the embedded model, converted and cached on first use) or a local
    Hugging Face checkpoint directory."""
    if str(base).lower() in smollm2.ALIASES:
        return smollm2.ensure_converted()
    path = Path(base).expanduser()
    read_config(path)  # fails clearly when this is not a checkpoint directory
    return path


def load_model(base: str | Path = DEFAULT_BASE, adapter: str | Path | None = None) -> LoadedModel:
    """The traceable model for ``base`` with ``adapter`` attached (if given), and its tokenizer."""
    base_path = resolve_base(base)
    model = build_model(base_path)
    lora = read_adapter(adapter) if adapter is not None else None
    sites: list[str] = []
    if lora is not None:
        sites = attach_adapter(model, lora, architecture(read_config(base_path).get("model_type")).lora_targets)
    tokenizer = load_tokenizer(base_path) if has_tokenizer(base_path) else None
    return LoadedModel(model, tokenizer, base_path, lora, sites)
