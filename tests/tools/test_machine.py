"""Every benchmark prints the machine's state beside its figures and warns when it is not quiet:
a process busy beside the benchmark is named, and the verdict says the figures may be off."""

from __future__ import annotations

import subprocess
import sys
import time

from privlora.tools.machine import machine_state


def test_a_busy_neighbour_is_named_and_the_machine_is_not_quiet():
    neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        state = machine_state()
        assert neighbour.pid in [b.pid for b in state.busy] and not state.quiet
        assert "NOT QUIET" in state.line() and f"pid {neighbour.pid}" in state.line()
    finally:
        neighbour.kill()
        neighbour.wait()
    assert neighbour.pid not in [b.pid for b in machine_state().busy]  # control: gone once it stops


def test_privlora_bench_prints_and_records_the_machine_state(tmp_path):
    import json

    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "privlora.cli", "bench", "--backend", "plain", "--site", "smollm2",
                          "--repeats", "1", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("machine: ") and "load average" in run.stdout.splitlines()[0]
    recorded = json.loads(out.read_text())
    assert {"cores", "load", "quiet", "busy"} <= recorded["machine"].keys() and recorded["sites"][0]["backend"] == "plain"
