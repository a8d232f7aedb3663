"""The client side of secure generation: the client bundle, keys, public segments, and the
encrypt -> server -> decrypt loop of every private round.

:class:`SecureClient` is a step function (same signature as the torch model), so the generation
loop in ``generation.py`` runs on it unchanged: the whole prompt is prefilled in one step (each
round sends all its rows at once) and then one token per step with the KV cache. It loads the
client bundle only; the secret key never leaves it (cached on disk per artifact, mode 0600). Each
step's timing and bytes are recorded in :attr:`SecureClient.steps`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from privlora.backends import backend as backend_module
from privlora.backends.base import GroupSpec, groups_from_rounds
from privlora.compiler.artifact import CLIENT, ArtifactError, load_bundle
from privlora.compiler.driver import CRYPTO, TOKENIZER_DIR
from privlora.compiler.plan import Plan, PlanStep, run_plan
from privlora.files import read_json
from privlora.models.cache import cache_root
from privlora.runtime.onnx_runtime import Segment
from privlora.runtime.server import LOCAL, PrivateServer, artifact_id
from privlora.runtime.transport import InProcessTransport, Transport


@dataclass
class StepStats:
    """Where one step's time and bytes went."""

    rows: int = 0  # token positions computed (the prompt length for a prefill, else 1)
    public_s: float = 0.0
    encrypt_s: float = 0.0
    server_s: float = 0.0  # transport + server evaluation, as the client waits for it
    decrypt_s: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0

    @property
    def total_s(self) -> float:
        return self.public_s + self.encrypt_s + self.server_s + self.decrypt_s


def key_path(artifact: str, backend: str) -> Path:
    return cache_root() / "keys" / artifact[:32] / f"{backend}.secret"


def _load_or_create_client(module, params: dict[str, Any], path: Path | None):
    if path is not None and path.is_file():
        return module.Client(params, secret_key=path.read_bytes())
    client = module.Client(params)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(client.secret_key())
    return client


class SecureClient:
    def __init__(self, artifact: str | Path, transport: Transport, cache_keys: bool = True) -> None:
        bundle = load_bundle(artifact, CLIENT)
        manifest = bundle.manifest
        self.artifact_id = artifact_id(artifact)
        self.backend_name = manifest["backend"]["name"]
        server = transport.info()
        if server.get("artifact") != self.artifact_id:
            raise ArtifactError("the server runs another artifact (or another build of it) than this client bundle: "
                                f"server {str(server.get('artifact'))[:16]}, client {self.artifact_id[:16]}")
        self.plan = Plan.from_json(manifest["plan"])
        self.segments = {spec["name"]: Segment(bundle.path(spec["file"]), tuple(i["name"] for i in spec["inputs"]))
                         for spec in manifest["segments"]}
        self.groups: dict[str, list[GroupSpec]] = {}
        for group in groups_from_rounds(manifest["rounds"]):
            self.groups.setdefault(group.round, []).append(group)
        params = read_json(bundle.path(CRYPTO), ArtifactError, "missing client parameters")
        keys = key_path(self.artifact_id, self.backend_name) if cache_keys else None
        self.crypto = _load_or_create_client(backend_module(self.backend_name), params, keys)
        self.transport = transport
        self.session = transport.open_session(self.crypto.evaluation_keys())
        cache = manifest["cache"]
        self.cache_shape = (cache["layers"], cache["kv_heads"], cache["head_dim"])
        tokenizer = bundle.root / TOKENIZER_DIR
        self.tokenizer_dir = tokenizer if tokenizer.is_dir() else None
        self.steps: list[StepStats] = []

    def _run_step(self, step: PlanStep, args: Sequence[Any], stats: StepStats) -> Sequence[Any]:
        if step.kind == "public":
            start = time.perf_counter()
            result = self.segments[step.name](list(args))
            stats.public_s += time.perf_counter() - start
            return result
        outputs: list[Any] = [None] * len(self.groups[step.name])
        for group in self.groups[step.name]:
            t0 = time.perf_counter()
            request, state = self.crypto.encrypt(group, args[group.input])
            t1 = time.perf_counter()
            reply = self.transport.evaluate(self.session, group.round, group.index, request)
            t2 = time.perf_counter()
            outputs[group.output] = self.crypto.decrypt(group, reply, state)
            t3 = time.perf_counter()
            stats.encrypt_s += t1 - t0
            stats.server_s += t2 - t1
            stats.decrypt_s += t3 - t2
            stats.bytes_up += len(request)
            stats.bytes_down += len(reply)
        return outputs

    @torch.no_grad()
    def __call__(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor,
                 past_keys: Tensor, past_values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        stats = StepStats(rows=int(input_ids.numel()))
        logits, keys, values = run_plan(self.plan, lambda step, args: self._run_step(step, args, stats),
                                        [input_ids, position_ids, attention_mask, past_keys, past_values])
        self.steps.append(stats)
        return logits, keys, values

    def empty_cache(self, batch_size: int = 1) -> tuple[Tensor, Tensor]:
        layers, heads, head_dim = self.cache_shape
        shape = (layers, batch_size, heads, 0, head_dim)
        return torch.zeros(shape), torch.zeros(shape)

    def close(self) -> None:
        self.transport.close_session(self.session)


def open_local(artifact: str | Path, cache_keys: bool = False) -> SecureClient:
    """Client and an in-process server on one artifact (the embedded default; tests)."""
    return SecureClient(artifact, InProcessTransport(PrivateServer(artifact, LOCAL)), cache_keys=cache_keys)


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def render_timings(steps: list[StepStats]) -> str:
    """The prefill step, then the mean decode step: where the time and the bytes went."""
    if not steps:
        return "(no steps)"
    rows = [("step", "tokens", "public", "encrypt", "server", "decrypt", "total", "up", "down")]

    def line(label: str, s: StepStats, n: int = 1) -> tuple[str, ...]:
        return (label, str(s.rows // n if n else s.rows), f"{s.public_s / n:.3f} s", f"{s.encrypt_s / n:.3f} s",
                f"{s.server_s / n:.3f} s", f"{s.decrypt_s / n:.3f} s", f"{s.total_s / n:.3f} s",
                _mb(s.bytes_up / n), _mb(s.bytes_down / n))

    rows.append(line("prefill", steps[0]))
    decode = steps[1:]
    if decode:
        mean = StepStats(sum(s.rows for s in decode), *(sum(getattr(s, f) for s in decode) for f in
                                                          ("public_s", "encrypt_s", "server_s", "decrypt_s", "bytes_up", "bytes_down")))
        rows.append(line(f"decode (mean of {len(decode)})", mean, len(decode)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    text = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if decode:
        seconds = sum(s.total_s for s in decode)
        text.append(f"decode: {len(decode) / seconds:.2f} tokens/s, "
                    f"{_mb(sum(s.bytes_up + s.bytes_down for s in decode) / len(decode))} per token on the wire")
    return "\n".join(text)
