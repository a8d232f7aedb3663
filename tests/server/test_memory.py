"""A server's freed request buffers go back to the operating system (``server/memory.py``):
measured in a fresh process, the resident memory left after 8 threads each held and freed three
13 MB buffers (a burst of refused uploads); control, the same without the fixed threshold keeps
them in the threads' heaps."""

from __future__ import annotations

import subprocess
import sys

import pytest

BURST = """
import os, sys, threading
from privlora.server.memory import release_large_buffers
from privlora.tools.loadtest import rss_bytes

if sys.argv[1] == "on":
    assert release_large_buffers()
start = rss_bytes(os.getpid())
first = b"x" * (13 << 20)  # the first large block freed raises glibc's own threshold above it
del first
kept = []


def burst():
    held = [b"y" * (13 << 20) for _ in range(3)]
    kept.append([b"z" * 1000 for _ in range(1000)])  # small blocks keep the thread's heap in use
    del held


threads = [threading.Thread(target=burst) for _ in range(8)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print((rss_bytes(os.getpid()) - start) / 1e6)
"""


def resident_growth_mb(setting: str) -> float:
    done = subprocess.run([sys.executable, "-c", BURST, setting], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return float(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_large_buffers_leave_no_resident_memory():
    assert resident_growth_mb("on") < 20
    assert resident_growth_mb("off") > 60  # control: glibc's heaps keep most of the 312 MB burst
