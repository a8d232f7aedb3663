"""Run a compiled artifact: public segments on ONNX Runtime, private rounds through a backend.

:class:`CompiledModel` has the same step signature as the torch model, so the generation loop
runs on it unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from privlora.backends import backend as backend_module
from privlora.backends.base import GroupSpec, groups_from_rounds
from privlora.compiler.artifact import CLIENT, SERVER, ArtifactError, load_bundle
from privlora.compiler.driver import CRYPTO, SERVER_PROGRAM
from privlora.files import read_json
from privlora.models.checkpoint import read_tensors
from privlora.compiler.plan import Plan, PlanStep, run_plan
from privlora.runtime.onnx_runtime import Segment


class CompiledModel:
    def __init__(self, artifact: str | Path) -> None:
        client = load_bundle(artifact, CLIENT)
        server = load_bundle(artifact, SERVER)
        manifest = client.manifest
        self.plan = Plan.from_json(manifest["plan"])
        self.segments = {
            spec["name"]: Segment(client.path(spec["file"]), tuple(i["name"] for i in spec["inputs"]))
            for spec in manifest["segments"]
        }
        backend = backend_module(manifest["backend"]["name"])
        groups = groups_from_rounds(manifest["rounds"])
        self.groups: dict[str, list[GroupSpec]] = {}
        for group in groups:
            self.groups.setdefault(group.round, []).append(group)
        self.client = backend.Client(read_json(client.path(CRYPTO), ArtifactError, "missing client parameters"))
        tensors = {name: t.numpy() for name, t in read_tensors(server.path(SERVER_PROGRAM)).items()}
        self.server = backend.Server(tensors, groups, manifest["backend"]["parameters"])
        self.session = self.server.open_session(self.client.evaluation_keys())
        cache = manifest["cache"]
        self.cache_shape = (cache["layers"], cache["kv_heads"], cache["head_dim"])

    def _run_step(self, step: PlanStep, args: Sequence[Any]) -> Sequence[Any]:
        if step.kind == "public":
            return self.segments[step.name](list(args))
        outputs: list[Any] = [None] * len(self.groups[step.name])
        for group in self.groups[step.name]:
            request, state = self.client.encrypt(group, args[group.input])
            outputs[group.output] = self.client.decrypt(group, self.server.evaluate(group, request, self.session), state)
        return outputs

    @torch.no_grad()
    def __call__(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor,
                 past_keys: Tensor, past_values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        logits, keys, values = run_plan(self.plan, self._run_step,
                                        [input_ids, position_ids, attention_mask, past_keys, past_values])
        return logits, keys, values

    def empty_cache(self, batch_size: int = 1) -> tuple[Tensor, Tensor]:
        layers, heads, head_dim = self.cache_shape
        shape = (layers, batch_size, heads, 0, head_dim)
        return torch.zeros(shape), torch.zeros(shape)
