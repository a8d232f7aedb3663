"""The client side of secure generation: the client bundle, keys, public segments, and the
encrypt -> server -> decrypt loop of every private round.

:class:`SecureClient` is a step function on numpy arrays (the signature of ``generation.CausalStep``),
so the generation loop in ``generation.py`` runs on it unchanged: the whole prompt is prefilled in one step (each
round sends all its rows at once) and then one token per step with the KV cache. It loads the
client bundle only; the secret key never leaves it (cached on disk per artifact, mode 0600). Each
step's timing and bytes are recorded in :attr:`SecureClient.steps`.

With a backend that answers from pads made ahead of time (``pads``), the client keeps a pool of
them per group: :meth:`SecureClient.prepare` fills it (``generate --pads``, or between the turns
of a chat), and a step that finds it short makes what it needs on the spot plus a batch ahead
(the cold path, reported in the step's ``offline_s``). Pads die with their session.

A step survives faults: when the server cannot be reached, forgot the session (expired, evicted,
restarted) or refuses a message resent after a lost connection, the client waits for the server,
opens a new session with the same keys if needed, and redoes the step from its inputs. A step is a pure function of its inputs and the KV cache the client
holds, so the answer is the one an uninterrupted run gives.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from privlora import backends
from privlora.backends.base import Preprocessing, Send
from privlora.backends.exchange import ExchangeCost, exchange
from privlora.core.artifact import CLIENT, CRYPTO, TOKENIZER_DIR, ArtifactError, Bundle, artifact_id, load_bundle
from privlora.core.plan import PUBLIC, Plan, PlanStep, run_plan
from privlora.core.types import GroupSpec, ModelShape, groups_from_rounds
from privlora.errors import UsageError
from privlora.files import read_json
from privlora.paths import cache_root
from privlora.client.segments import Segment
from privlora.client.timings import OfflineStats, StepStats
from privlora.client.transcript import Recorder
from privlora.client.transports import Transport, TransportError
from privlora.client.view import Sent

log = logging.getLogger("privlora.client")

COLD_AHEAD = 64  # pads a short step makes beyond its own rows: one pad at a time costs ~10x more per row
MAX_POOL_ROWS = 4096  # pads kept per group: each costs client memory until used (docs/benchmarks.md)


@dataclass(frozen=True)
class Recovery:
    """How long a client keeps trying to get a session back before it gives up on a step."""

    deadline_s: float = 120.0  # a restarting server loads its artifact in seconds
    first_wait_s: float = 0.1
    max_wait_s: float = 2.0


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
    def __init__(self, artifact: str | Path, transport: Transport, cache_keys: bool = True,
                 recovery: Recovery = Recovery(), bundle: Bundle | None = None) -> None:
        bundle = bundle or load_bundle(artifact, CLIENT)  # a caller that read it already passes it
        manifest = bundle.manifest
        self.artifact_id = artifact_id(artifact)
        self.backend_name = manifest["backend"]["name"]
        self.transport = transport
        self._check_server()
        self.plan = Plan.from_json(manifest["plan"])
        self.segments = {spec["name"]: Segment(bundle.path(spec["file"]), tuple(i["name"] for i in spec["inputs"]))
                         for spec in manifest["segments"]}
        self.groups: dict[str, list[GroupSpec]] = {}
        for group in groups_from_rounds(manifest["rounds"]):
            self.groups.setdefault(group.round, []).append(group)
        params = read_json(bundle.path(CRYPTO), ArtifactError, "missing client parameters")
        keys = key_path(self.artifact_id, self.backend_name) if cache_keys else None
        self.crypto = _load_or_create_client(backends.load(self.backend_name), params, keys)
        self.pads = self.crypto if isinstance(self.crypto, Preprocessing) else None
        self.offline = OfflineStats()  # every pad made in this client's sessions
        self.evaluation_keys = self.crypto.evaluation_keys()
        self.session = transport.open_session(self.evaluation_keys, self.artifact_id)
        self.recovery = recovery
        self.recoveries = 0  # steps redone after a fault
        self.sessions_opened = 1
        self.model = ModelShape(**manifest["model"])
        tokenizer = bundle.root / TOKENIZER_DIR
        self.tokenizer_dir = tokenizer if tokenizer.is_dir() else None
        self.steps: list[StepStats] = []
        self.on_group: Callable[[], None] | None = None  # called after each group's exchange (progress)
        self.on_pads: Callable[[], None] | None = None  # after each group's pads made on the spot (progress)
        self.recorder: Recorder | None = None  # keeps this client's (x, delta) rows: see transcript.py
        self._watched = self._groups()[0].key if self.groups else None
        self.last_sent: Sent | None = None  # the watched group's latest first message: see view.py

    def record(self, directory: str | Path) -> Recorder:
        """Keep every row this client sends and the delta it gets back, for ``Recorder.save``."""
        self.recorder = Recorder(directory, self._groups())
        return self.recorder

    def _check_server(self) -> None:
        """The server hosts this client's artifact. A server with accounts shows its artifacts only
        to a caller with a valid token; without one, opening the session says what is missing."""
        info = self.transport.info()
        if "artifacts" not in info:
            return
        hosted = [entry.get("artifact") for entry in info["artifacts"]]
        if self.artifact_id not in hosted:
            served = ", ".join(str(artifact)[:16] for artifact in hosted) or "none"
            raise ArtifactError("the server runs another artifact (or another build of it) than this client bundle: "
                                f"server {served}, client {self.artifact_id[:16]}")

    def _recover(self, lost: TransportError, deadline: float) -> None:
        """Get ready to redo a step: wait until the server answers (with the same artifact), and
        open a new session with the same keys if it lost ours."""
        log.warning("step interrupted, redoing it: %s", lost)
        self.transport.forget(self.session)
        wait = self.recovery.first_wait_s
        while True:
            try:
                self._check_server()
                if lost.code == "unknown_session":
                    self.session = self.transport.open_session(self.evaluation_keys, self.artifact_id)
                    self.sessions_opened += 1
                    if self.pads is not None:  # the server's ledger of them went with the old session
                        self.pads.forget_pads()
                self.recoveries += 1
                return
            except TransportError as exc:
                if not exc.recoverable:
                    raise
                if time.monotonic() + wait > deadline:
                    raise TransportError(f"could not finish a step within {self.recovery.deadline_s:g} s of a fault: "
                                         f"{exc}", exc.status, exc.code) from None
            time.sleep(wait)
            wait = min(2 * wait, self.recovery.max_wait_s)

    def _run_step(self, step: PlanStep, args: Sequence[Any], stats: StepStats) -> Sequence[Any]:
        if step.kind == PUBLIC:
            start = time.perf_counter()
            result = self.segments[step.name](list(args))
            stats.public_s += time.perf_counter() - start
            return result
        outputs: list[Any] = [None] * len(self.groups[step.name])
        for group in self.groups[step.name]:
            send = self._send(group)
            if group.key == self._watched:
                send = self._watching(group, args[group.input], send)
            outputs[group.output] = exchange(self.crypto, group, args[group.input], send, stats)
            if self.recorder is not None:
                self.recorder.observe(group, args[group.input], outputs[group.output])
            if self.on_group is not None:
                self.on_group()
        return outputs

    def _send(self, group: GroupSpec) -> Send:
        return partial(self.transport.evaluate, self.session, group.round, group.index)

    def _watching(self, group: GroupSpec, x: np.ndarray, send: Send) -> Send:
        """``send``, keeping the first message as it leaves (with x's last row) in ``last_sent``."""
        rows = np.asarray(x).reshape(-1, group.d_in)

        def watched(message: int, request: bytes) -> bytes:
            if message == 0:
                self.last_sent = Sent(group, rows[-1].copy(), request, len(rows))
            return send(message, request)

        return watched

    def _groups(self) -> list[GroupSpec]:
        return [group for groups in self.groups.values() for group in groups]

    def _make_pads(self, levels: Sequence[int], stop: Callable[[], bool] = lambda: False,
                   on_group: Callable[[], None] | None = None) -> OfflineStats:
        """Top every group's pool up to each level in turn, all groups to one level before any goes
        further, so that a stop leaves the pools even; ``stop`` is asked before each group (an
        answer that needs the client back)."""
        assert self.pads is not None
        cost, produced = ExchangeCost(), {group.key: 0 for group in self._groups()}
        for level in levels:
            for group in self._groups():
                if stop():
                    break
                missing = level - self.pads.ready(group)
                if missing > 0:
                    self.pads.prepare(group, missing, self._send(group), cost)
                    produced[group.key] += missing
                if on_group is not None:
                    on_group()
        made = OfflineStats()
        made.add(max(produced.values(), default=0), cost)
        self.offline.add(made.rows, cost)
        return made

    def prepare(self, rows: int, stop: Callable[[], bool] = lambda: False, first: int | None = None) -> OfflineStats:
        """Make pads ahead of need until every group has ``rows`` ready (nothing for a per-query
        backend), every group to ``first`` before any goes beyond it when given (small batches
        cost more per row, but a stop finds every group with some); survives faults as a step does."""
        if self.pads is None:
            return OfflineStats()
        if rows > MAX_POOL_ROWS:
            raise UsageError(f"at most {MAX_POOL_ROWS} pads per group are kept ready, not {rows}")
        levels = (first, rows) if first is not None and first < rows else (rows,)
        return self._retrying(lambda: self._make_pads(levels, stop))

    def _cold_path(self, rows: int, stats: StepStats) -> None:
        """Pads for this step's rows, made now if the pool is short (and a batch ahead)."""
        if self.pads is None or all(self.pads.ready(group) >= rows for group in self._groups()):
            return
        made = self._make_pads((rows + COLD_AHEAD,), on_group=self.on_pads)
        stats.offline_s += made.seconds
        stats.offline_rows += made.rows

    def _retrying(self, work: Callable[[], Any]) -> Any:
        deadline = None
        while True:
            try:
                return work()
            except TransportError as exc:
                if not exc.recoverable:
                    raise
                deadline = deadline or time.monotonic() + self.recovery.deadline_s
                self._recover(exc, deadline)

    def __call__(self, input_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray,
                 past_keys: np.ndarray, past_values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows = int(np.size(input_ids))

        def attempt() -> tuple[StepStats, Sequence[Any]]:
            stats = StepStats(rows=rows)
            if self.recorder is not None:
                self.recorder.discard_step()  # a step redone after a fault is recorded once
            self._cold_path(rows, stats)
            return stats, run_plan(self.plan, lambda step, args: self._run_step(step, args, stats),
                                   [input_ids, position_ids, attention_mask, past_keys, past_values])

        stats, (logits, keys, values) = self._retrying(attempt)
        self.steps.append(stats)
        if self.recorder is not None:
            self.recorder.commit()
        return logits, keys, values

    @property
    def groups_per_step(self) -> int:
        return sum(len(groups) for groups in self.groups.values())

    def pads_ready(self) -> int | None:
        """Rows every group's pool can answer now (None for a per-query backend)."""
        if self.pads is None:
            return None
        return min((self.pads.ready(group) for group in self._groups()), default=0)

    def empty_cache(self, batch_size: int = 1) -> tuple[np.ndarray, np.ndarray]:
        shape = (self.model.layers, batch_size, self.model.kv_heads, 0, self.model.head_dim)
        return np.zeros(shape, dtype=np.float32), np.zeros(shape, dtype=np.float32)

    def close(self) -> None:
        """End the session; one the server already lost needs no ending."""
        try:
            self.transport.close_session(self.session)
        except TransportError as exc:
            if not exc.recoverable:
                raise
