"""A stream that says it is a terminal: what a command draws in place (progress bars) is drawn on
it, and kept to read back, without a pseudo-terminal."""

from __future__ import annotations

import io


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True
