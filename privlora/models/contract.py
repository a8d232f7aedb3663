"""The architecture contract: what privlora needs from each supported architecture.

It lives apart from the registry so that each architecture module can build its own record
without importing the registry, which imports every architecture module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from privlora.core.types import ModelShape

HFConfig = dict[str, Any]


@dataclass(frozen=True)
class Architecture:
    """One supported architecture, keyed by the Hugging Face ``model_type`` of its checkpoints.

    ``build`` and ``describe`` read the checkpoint's ``config.json`` dict and raise
    ``UnsupportedModelError`` naming any feature the definition lacks. ``describe`` is how code
    outside the architecture module learns a model's sizes: field names differ between families
    (``num_hidden_layers`` vs ``num_layers``), so nothing else reads them from the config.
    """

    model_type: str
    lora_targets: tuple[str, ...]  # the Linear names a peft adapter may target
    build: Callable[[HFConfig], nn.Module]  # the step-function module, weights uninitialised
    adapt_state_dict: Callable[[nn.Module, dict[str, Tensor]], dict[str, Tensor]]  # checkpoint names -> ours
    describe: Callable[[HFConfig], ModelShape]
