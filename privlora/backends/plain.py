"""``plain`` backend: evaluates the private rounds in plaintext on the server.

No encryption: it is the reference the FHE backends are tested against and the fast path for
tests. The server bundle's weights never reach the client bundle either way.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from privlora.compiler.artifact import Bundle, ArtifactError
from privlora.compiler.ir import PLLSite, PrivateLinear
from privlora.models.checkpoint import read_tensors


class PlainRounds:
    """The server side of every round, built from a verified server bundle."""

    def __init__(self, bundle: Bundle, weights_file: str) -> None:
        weights = read_tensors(bundle.path(weights_file))
        self.rounds: dict[str, list[tuple[int, int, PrivateLinear]]] = {}
        for spec in bundle.manifest["rounds"]:
            groups = []
            for group in spec["plls"]:
                sites = [PLLSite(**site) for site in group["sites"]]
                try:
                    a = [weights[f"{site.site_id}.lora_A"] for site in sites]
                    b = [weights[f"{site.site_id}.lora_B"] for site in sites]
                except KeyError as exc:
                    raise ArtifactError(f"server bundle lacks the weights of site {exc}") from None
                groups.append((group["input"], group["output"], PrivateLinear(sites, a, b)))
            self.rounds[spec["name"]] = groups

    @torch.no_grad()
    def evaluate(self, name: str, inputs: list[Tensor]) -> list[Any]:
        """Every PLL group of round ``name`` applied to its input, in output order."""
        groups = self.rounds[name]
        outputs: list[Any] = [None] * len(groups)
        for input_index, output_index, pll in groups:
            outputs[output_index] = pll(inputs[input_index])
        return outputs
