"""Supported architectures: one :class:`~privlora.models.contract.Architecture` record each,
keyed by Hugging Face ``model_type``. Each architecture module exposes its record as
``ARCHITECTURE``; adding one to the tuple below is all it takes to register it."""

from __future__ import annotations

from typing import Any

from privlora.core.types import ModelShape
from privlora.errors import UnsupportedModelError
from privlora.models.architectures import chatglm2, gemma, llama, mistral, phi3, qwen2
from privlora.models.contract import Architecture

__all__ = ["ARCHITECTURES", "Architecture", "architecture", "describe"]

ARCHITECTURES: dict[str, Architecture] = {
    record.model_type: record for record in (llama.ARCHITECTURE, qwen2.ARCHITECTURE, mistral.ARCHITECTURE,
                                             phi3.ARCHITECTURE, gemma.ARCHITECTURE, chatglm2.ARCHITECTURE)
}


def architecture(model_type: str | None) -> Architecture:
    """The record implementing ``model_type``, or a clear error naming what is supported."""
    try:
        return ARCHITECTURES[str(model_type)]
    except KeyError:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported (supported: {supported})"
        ) from None


def describe(hf_config: dict[str, Any]) -> ModelShape:
    """The sizes of the model a Hugging Face ``config.json`` dict describes, whatever its family."""
    return architecture(hf_config.get("model_type")).describe(hf_config)
