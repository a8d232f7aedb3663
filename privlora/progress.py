"""Progress for long waits (a compile, a prompt's prefill): on a terminal, one line redrawn in
place with the count done and an ETA; elsewhere (a log file, CI), nothing while it runs and one
summary line at the end, so that logs get no carriage-return spam. Torch-free, for every role."""

from __future__ import annotations

import sys
import time
from typing import TextIO

REDRAW_SECONDS = 0.1


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    def __init__(self, total: int, label: str, unit: str, stream: TextIO | None = None,
                 interactive: bool | None = None) -> None:
        self.total, self.label, self.unit = total, label, unit
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.done = 0
        self.start = time.monotonic()
        self._drawn = 0.0

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        return (f"{self.label}: {min(self.done, self.total)}/{self.total} {self.unit} "
                f"[{_duration(elapsed)} elapsed, ETA {_duration(eta) if self.done else '?'}]")

    def advance(self, count: int = 1) -> None:
        self.done += count
        now = time.monotonic()
        if self.interactive and (now - self._drawn >= REDRAW_SECONDS or self.done >= self.total):
            self.stream.write("\r" + self.line() + "\033[K")
            self.stream.flush()
            self._drawn = now

    def close(self) -> None:
        """End the bar: a newline on a terminal, the one summary line elsewhere."""
        if self.interactive:
            self.stream.write("\n")
        else:
            self.stream.write(f"{self.label}: {min(self.done, self.total)}/{self.total} {self.unit} in "
                              f"{time.monotonic() - self.start:.1f} s\n")
        self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: type | None, *exc: object) -> None:
        if kind is None:
            self.close()
        elif self.interactive:  # a failure's own message follows on a line of its own
            self.stream.write("\n")
