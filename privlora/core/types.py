"""Plain data types shared by the compiler, the backends and the runtime."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PLLSite:
    """One LoRA site: ``delta = scaling * B (A x)`` at the Hugging Face module ``module``."""

    site_id: int
    module: str
    d_in: int
    d_out: int
    rank: int
    scaling: float


@dataclass(frozen=True)
class GroupSpec:
    """One PLL group of a round: one input tensor in, the sites' deltas concatenated out."""

    round: str
    index: int
    input: int
    output: int
    sites: tuple[PLLSite, ...]

    @property
    def key(self) -> str:
        return f"{self.round}/{self.index}"

    @property
    def d_in(self) -> int:
        return self.sites[0].d_in

    @property
    def d_out(self) -> int:
        return sum(site.d_out for site in self.sites)

    @property
    def rank(self) -> int:
        return sum(site.rank for site in self.sites)


def groups_from_rounds(rounds: list[dict[str, Any]]) -> list[GroupSpec]:
    """GroupSpecs from the manifest's ``rounds`` entries."""
    return [GroupSpec(spec["name"], index, group["input"], group["output"],
                      tuple(PLLSite(**site) for site in group["sites"]))
            for spec in rounds for index, group in enumerate(spec["plls"])]


@dataclass(frozen=True)
class ModelShape:
    """What the runtime and the tools need to know of a base model, whatever its architecture:
    every architecture's ``describe(config)`` gives one, and the manifest records it."""

    architecture: str  # the Hugging Face model_type
    layers: int
    hidden_size: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int  # the most positions the model was built for
