"""What a client sees of the adapter: at every LoRA site, the activation ``x`` it computed itself
and the delta ``dW x`` it got back, for every token of every answer, prompt and reply alike.

``privlora generate/chat --record DIR`` keeps these rows, so that an adapter owner (or a user who
wants to know) can measure what ordinary use reveals: ``privlora attack clone`` fits each site's
map from them. A transcript is a directory of parts, one ``.npz`` per save (a chat saves after
every answer), each holding per group ``x/<group>`` [rows, d_in] and ``delta/<group>``
[rows, d_out], with the sites of each group (module, slice of the delta) in ``sites.json``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from privlora.core.types import GroupSpec
from privlora.errors import PrivloraError

SITES_FILE = "sites.json"
PART_GLOB = "part-*.npz"


class TranscriptError(PrivloraError):
    """A transcript directory that cannot be read (missing, empty, or of another model)."""


@dataclass(frozen=True)
class SiteRows:
    """Everything seen at one LoRA site: ``delta[i] = dW x[i]`` (plus the backend's error)."""

    module: str
    x: np.ndarray  # float32 [rows, d_in]
    delta: np.ndarray  # float32 [rows, d_out]

    @property
    def rows(self) -> int:
        return int(self.x.shape[0])


def _site_table(groups: list[GroupSpec]) -> dict[str, list[dict]]:
    """Per group key: its sites' modules and where each one's delta sits in the group's output."""
    table = {}
    for group in groups:
        ends = np.cumsum([site.d_out for site in group.sites]).tolist()
        table[group.key] = [{"module": site.module, "start": end - site.d_out, "stop": end}
                            for site, end in zip(group.sites, ends)]
    return table


class Recorder:
    """Collects a client's (x, delta) rows per group; :meth:`commit` keeps a finished step's rows
    (a step redone after a fault is recorded once), :meth:`save` writes them as a new part."""

    def __init__(self, directory: str | Path, groups: list[GroupSpec]) -> None:
        self.directory = Path(directory)
        self.sites = _site_table(groups)
        self._step: list[tuple[str, np.ndarray, np.ndarray]] = []
        self._kept: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}

    def observe(self, group: GroupSpec, x: np.ndarray, delta: np.ndarray) -> None:
        self._step.append((group.key, np.asarray(x, np.float32).reshape(-1, group.d_in),
                           np.asarray(delta, np.float32).reshape(-1, group.d_out)))

    def discard_step(self) -> None:
        self._step = []

    def commit(self) -> None:
        for key, x, delta in self._step:
            self._kept.setdefault(key, []).append((x, delta))
        self._step = []

    @property
    def rows(self) -> int:
        """Rows kept and not yet saved, per group (every group sees every token)."""
        return max((sum(x.shape[0] for x, _ in parts) for parts in self._kept.values()), default=0)

    def save(self) -> Path | None:
        """Write the kept rows as one new part (nothing when there are none)."""
        if not self._kept:
            return None
        self.directory.mkdir(parents=True, exist_ok=True)
        sites_path = self.directory / SITES_FILE
        if sites_path.is_file() and json.loads(sites_path.read_text()) != self.sites:
            raise TranscriptError(f"{self.directory} holds a transcript of another model's sites")
        sites_path.write_text(json.dumps(self.sites, indent=1) + "\n")
        arrays = {}
        for key, parts in self._kept.items():
            arrays[f"x/{key}"] = np.concatenate([x for x, _ in parts])
            arrays[f"delta/{key}"] = np.concatenate([d for _, d in parts])
        path = self.directory / f"part-{time.time_ns()}-{os.getpid()}.npz"
        np.savez(path, **arrays)
        self._kept = {}
        return path


def load_transcript(directory: str | Path, max_rows: int | None = None) -> list[SiteRows]:
    """Every site's rows from all the parts of a transcript, oldest part first; ``max_rows`` keeps
    only the first rows (what a shorter conversation would have shown)."""
    directory = Path(directory)
    sites_path = directory / SITES_FILE
    parts = sorted(directory.glob(PART_GLOB), key=lambda p: int(p.name.split("-")[1]))
    if not sites_path.is_file() or not parts:
        raise TranscriptError(f"{directory} is not a transcript (no {SITES_FILE} and parts; record one with "
                              "`privlora generate --record DIR`)")
    table = json.loads(sites_path.read_text())
    xs: dict[str, list[np.ndarray]] = {key: [] for key in table}
    deltas: dict[str, list[np.ndarray]] = {key: [] for key in table}
    for part in parts:
        if max_rows is not None and min(sum(len(x) for x in kept) for kept in xs.values()) >= max_rows:
            break  # every group has its rows: the later parts are not read
        with np.load(part, allow_pickle=False) as data:
            for key in table:
                if f"x/{key}" in data:
                    xs[key].append(data[f"x/{key}"])
                    deltas[key].append(data[f"delta/{key}"])
    sites = []
    for key, entries in table.items():
        if not xs[key]:
            continue
        x, delta = np.concatenate(xs[key])[:max_rows], np.concatenate(deltas[key])[:max_rows]
        sites.extend(SiteRows(entry["module"], x, delta[:, entry["start"]:entry["stop"]]) for entry in entries)
    return sites
