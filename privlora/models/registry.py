"""Supported architectures, keyed by Hugging Face ``model_type``.

Each architecture module provides ``MODEL_TYPE``, ``LORA_TARGETS`` (the Linear names an adapter may
target), ``build(hf_config) -> nn.Module`` and ``adapt_state_dict(model, state) -> state``.
"""

from __future__ import annotations

from types import ModuleType

from privlora.errors import UnsupportedModelError
from privlora.models import chatglm2, llama, qwen2

ARCHITECTURES: dict[str, ModuleType] = {module.MODEL_TYPE: module for module in (llama, qwen2, chatglm2)}


def architecture(model_type: str | None) -> ModuleType:
    """The module implementing ``model_type``, or a clear error naming what is supported."""
    try:
        return ARCHITECTURES[str(model_type)]
    except KeyError:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported (supported: {supported})"
        ) from None
