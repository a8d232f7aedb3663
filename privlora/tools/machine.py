"""The state of the machine a figure was measured on: cores, load average and the other processes
busy at the start. Every benchmark prints it beside its figures and warns when the machine is
not quiet, because a figure taken beside a busy neighbour (a test suite, another benchmark) can
be several times off, and a reader must be able to tell."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

QUIET_LOAD = 1.0  # a one-minute load average under this (per machine) is quiet
BUSY_SHARE = 0.2  # another process using this share of one core is busy
SAMPLE_SECONDS = 0.5


@dataclass(frozen=True)
class Busy:
    pid: int
    name: str
    cpu: float  # share of one core over the sample


@dataclass(frozen=True)
class MachineState:
    cores: int
    load: tuple[float, float, float]
    busy: list[Busy] = field(default_factory=list)

    @property
    def quiet(self) -> bool:
        return self.load[0] < QUIET_LOAD and not self.busy

    def line(self) -> str:
        busy = ", ".join(f"{b.name} (pid {b.pid}, {100 * b.cpu:.0f}% of a core)" for b in self.busy) or "none"
        verdict = "quiet" if self.quiet else "NOT QUIET: figures may be several times off"
        return (f"machine: {self.cores} cores, load average {self.load[0]:.2f} {self.load[1]:.2f} {self.load[2]:.2f}; "
                f"other busy processes: {busy} ({verdict})")

    def to_json(self) -> dict:
        return {"cores": self.cores, "load": list(self.load), "quiet": self.quiet,
                "busy": [{"pid": b.pid, "name": b.name, "cpu": round(b.cpu, 2)} for b in self.busy]}


def _cpu_ticks() -> dict[int, tuple[str, int]]:
    """Every process's name and CPU ticks (user + system) so far, from /proc."""
    ticks = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        ticks[int(entry.name)] = (name, int(fields[11]) + int(fields[12]))
    return ticks


def machine_state(sample_seconds: float = SAMPLE_SECONDS) -> MachineState:
    """Cores, load average, and the other processes that used CPU over a short sample."""
    busy: list[Busy] = []
    if Path("/proc/stat").exists():
        hz = os.sysconf("SC_CLK_TCK")
        before = _cpu_ticks()
        time.sleep(sample_seconds)
        after = _cpu_ticks()
        ours = {os.getpid(), os.getppid()}
        for pid, (name, ticks) in after.items():
            share = (ticks - before.get(pid, (name, ticks))[1]) / hz / sample_seconds
            if pid not in ours and share >= BUSY_SHARE:
                busy.append(Busy(pid, name, share))
    return MachineState(os.cpu_count() or 1, os.getloadavg(), sorted(busy, key=lambda b: -b.cpu))


def report_machine() -> MachineState:
    """Print the machine's state (to stdout, beside the figures) and warn on stderr when it is not quiet."""
    state = machine_state()
    print(state.line())
    if not state.quiet:
        print("privlora: warning: the machine is not quiet; for figures to publish, rerun with nothing else "
              "running", file=sys.stderr)
    return state
