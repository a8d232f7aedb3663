"""Progress for long waits (a compile, a prompt's prefill): on a terminal, one line redrawn in
place with the count done and an ETA; elsewhere (a log file, CI), nothing while it runs and one
summary line at the end, so that logs get no carriage-return spam. A job of several phases (a
compile) tells each one the same way, one line per phase. Torch-free, for every role."""

from __future__ import annotations

import sys
import time
from typing import TextIO

REDRAW_SECONDS = 0.1


def _redraw(stream: TextIO, text: str) -> None:
    """Put ``text`` in place of the terminal's current line (and erase what it leaves of it)."""
    stream.write("\r" + text + "\033[K")
    stream.flush()


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
            _redraw(self.stream, self.line())
            self._drawn = now

    def close(self) -> None:
        """End the bar: a newline on a terminal, the one summary line elsewhere."""
        if self.interactive:
            self.stream.write("\n")
        else:
            self.stream.write(f"{self.label}: {min(self.done, self.total)}/{self.total} {self.unit} in "
                              f"{time.monotonic() - self.start:.1f} s\n")
        self.stream.flush()

    def abandon(self) -> None:
        """End the bar of work that failed: on a terminal, the failure's message follows on a line
        of its own; a log gets no summary of work that did not finish."""
        if self.interactive:
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: type | None, *exc: object) -> None:
        if kind is None:
            self.close()
        else:
            self.abandon()


class Phase:
    """One phase of a job, on one line: on a terminal drawn when it starts, redrawn by its count
    (when it has one) and finally with its time; elsewhere written once, when it ends."""

    def __init__(self, job: str, doing: str, done: str, stream: TextIO | None, interactive: bool,
                 total: int = 0, unit: str = "") -> None:
        self.job, self.done, self.stream, self.interactive = job, done, stream, interactive
        self.start = time.monotonic()
        # Only a terminal shows a count while it runs; a log gets the phase's end line alone.
        shown = interactive and stream is not None
        self._count = Progress(total, f"{job}: {doing}", unit, stream, interactive=True) if shown and total else None
        if shown:
            _redraw(stream, f"{job}: {doing} ...")

    def advance(self) -> None:
        """One more unit of the phase's count done."""
        if self._count is not None:
            self._count.advance()

    def line(self) -> str:
        """The phase's end line: what it did and how long it took."""
        return f"{self.job}: {self.done} in {time.monotonic() - self.start:.1f} s"

    def __enter__(self) -> Phase:
        return self

    def __exit__(self, kind: type | None, *exc: object) -> None:
        if self.stream is None:
            return
        if kind is None:
            if self.interactive:
                _redraw(self.stream, self.line())
                self.stream.write("\n")
            else:
                self.stream.write(self.line() + "\n")
        elif self.interactive:  # a failure's own message follows on a line of its own
            self.stream.write("\n")
        self.stream.flush()


class Phases:
    """A long job (a compile) told phase by phase on ``stream``: ``None`` keeps it silent (a
    library caller's choice), a terminal gets each phase redrawn in place while it runs."""

    def __init__(self, job: str, stream: TextIO | None, interactive: bool | None = None) -> None:
        self.job, self.stream = job, stream
        self.interactive = stream is not None and (stream.isatty() if interactive is None else interactive)

    def phase(self, doing: str, done: str, total: int = 0, unit: str = "") -> Phase:
        """A phase to run in a ``with`` block: ``doing`` while it runs (with a count of ``total``
        ``unit`` when given), ``done`` and its seconds when it ends."""
        return Phase(self.job, doing, done, self.stream, self.interactive, total, unit)
