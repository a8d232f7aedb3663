"""peft LoRA adapters: read a standard adapter directory and attach it to a model's Linear layers.

Only plain LoRA is supported (the scheme needs ``dW = scaling * B @ A`` on a Linear): DoRA, rank or
alpha patterns, trained biases, extra saved modules, embedding/conv LoRA and fan-in-fan-out
layouts are rejected with a clear error rather than silently ignored.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from privlora.errors import AdapterError, PrivloraError
from privlora.files import read_json
from privlora.models.checkpoint import read_tensors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class LoraSite:
    """One adapted Linear: ``y = W0 x + scaling * B (A x)``; A is ``[r, d_in]``, B ``[d_out, r]``."""

    module: str
    lora_A: Tensor
    lora_B: Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def delta_weight(self) -> Tensor:
        """The private update ``dW = scaling * B @ A`` (``[d_out, d_in]``)."""
        return self.scaling * (self.lora_B @ self.lora_A)


@dataclass(frozen=True)
class LoraAdapter:
    path: Path
    rank: int
    alpha: float
    scaling: float
    target_modules: tuple[str, ...]
    sites: tuple[LoraSite, ...]


def _reject(config: dict[str, Any], path: Path) -> None:
    """Raise on adapter features outside plain LoRA."""
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type {config.get('peft_type')!r} (only LORA)")
    if config.get("use_dora"):
        problems.append("DoRA (use_dora)")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        problems.append("per-module rank_pattern/alpha_pattern")
    if config.get("bias", "none") != "none":
        problems.append(f"trained biases (bias={config['bias']!r})")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save {config['modules_to_save']!r}")
    if config.get("fan_in_fan_out"):
        problems.append("fan_in_fan_out layout")
    if config.get("layer_replication"):
        problems.append("layer_replication")
    if problems:
        raise AdapterError(f"adapter {path} uses unsupported features: {'; '.join(problems)}")


def _scaling(config: dict[str, Any]) -> float:
    rank, alpha = config["r"], config.get("lora_alpha", config["r"])
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _read_weights(path: Path) -> dict[str, Tensor]:
    for name in ADAPTER_WEIGHTS:
        if (path / name).is_file():
            return read_tensors(path / name)
    raise AdapterError(f"adapter {path} has none of {', '.join(ADAPTER_WEIGHTS)}")


def _group_by_module(weights: dict[str, Tensor], path: Path) -> dict[str, dict[str, Tensor]]:
    """``{module path: {"A": tensor, "B": tensor}}`` from peft's saved key names."""
    grouped: dict[str, dict[str, Tensor]] = {}
    for key, tensor in weights.items():
        match = _KEY.match(key.removeprefix(PEFT_PREFIX))
        if match is None:
            raise AdapterError(f"adapter {path}: tensor {key!r} is not a LoRA A/B weight (unsupported feature)")
        grouped.setdefault(match["module"], {})[match["which"]] = tensor.float()
    for module, pair in grouped.items():
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"adapter {path}: {module} has lora_{''.join(pair)} but not both A and B")
    return grouped


def read_adapter(path: str | Path) -> LoraAdapter:
    """Parse and validate a peft adapter directory (adapter_config.json + adapter weights)."""
    path = Path(path)
    config = read_json(path / ADAPTER_CONFIG, AdapterError,
                       f"{path} is not a peft adapter directory (no {ADAPTER_CONFIG})")
    _reject(config, path)
    try:
        weights = _read_weights(path)
    except PrivloraError as exc:
        raise AdapterError(str(exc)) from None
    scaling = _scaling(config)
    sites = []
    for module, pair in sorted(_group_by_module(weights, path).items()):
        a, b = pair["A"], pair["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != config["r"] or b.shape[1] != config["r"]:
            raise AdapterError(
                f"adapter {path}: {module} has A {tuple(a.shape)} and B {tuple(b.shape)}, "
                f"inconsistent with rank r={config['r']}"
            )
        sites.append(LoraSite(module=module, lora_A=a, lora_B=b, scaling=scaling))
    if not sites:
        raise AdapterError(f"adapter {path} holds no LoRA weights")
    targets = config.get("target_modules") or []
    return LoraAdapter(
        path=path,
        rank=config["r"],
        alpha=config.get("lora_alpha", config["r"]),
        scaling=scaling,
        target_modules=(targets,) if isinstance(targets, str) else tuple(sorted(targets)),
        sites=tuple(sites),
    )


class LoraLinear(nn.Module):
    """A base Linear plus a LoRA branch; submodule names follow peft (``base_layer``, ``lora_A``,
    ``lora_B``) so the compiler can find the public and the private parameters by name."""

    def __init__(self, base_layer: nn.Linear, site: LoraSite) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.Linear(base_layer.in_features, site.rank, bias=False)
        self.lora_B = nn.Linear(site.rank, base_layer.out_features, bias=False)
        with torch.no_grad():
            self.lora_A.weight.copy_(site.lora_A)
            self.lora_B.weight.copy_(site.lora_B)
        self.scaling = site.scaling

    def forward(self, x: Tensor) -> Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scaling


def attach_adapter(model: nn.Module, adapter: LoraAdapter, allowed_targets: tuple[str, ...]) -> list[str]:
    """Replace each adapted Linear of ``model`` by a :class:`LoraLinear`; returns the module paths.

    ``allowed_targets`` are the Linear names the architecture lets an adapter target.
    """
    leaf_names = {site.module.rsplit(".", 1)[-1] for site in adapter.sites}
    # A regex target_modules string cannot be checked by name; its matches are checked below.
    named_targets = set(adapter.target_modules) if all(t.isidentifier() for t in adapter.target_modules) else set()
    unknown = sorted((leaf_names | named_targets) - set(allowed_targets))
    if unknown:
        raise AdapterError(
            f"adapter {adapter.path} targets {unknown}, which this architecture does not have "
            f"(LoRA targets it supports: {', '.join(allowed_targets)})"
        )
    modules = dict(model.named_modules())
    for site in adapter.sites:
        base = modules.get(site.module)
        if not isinstance(base, nn.Linear):
            raise AdapterError(f"adapter {adapter.path}: the model has no Linear named {site.module!r}")
        if site.lora_A.shape[1] != base.in_features or site.lora_B.shape[0] != base.out_features:
            raise AdapterError(
                f"adapter {adapter.path}: {site.module} is {base.in_features}->{base.out_features} "
                f"but the adapter's A/B are {tuple(site.lora_A.shape)}/{tuple(site.lora_B.shape)}"
            )
        parent_name, _, child = site.module.rpartition(".")
        setattr(modules[parent_name], child, LoraLinear(base, site).requires_grad_(False))
    return [site.module for site in adapter.sites]
