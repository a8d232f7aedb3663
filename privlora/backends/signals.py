"""Keep the process's signal dispositions across calls into libraries that replace them.

concrete-python's compiler (LLVM) installs its own handlers for SIGINT, SIGTERM and the fatal
signals when it is imported, and its runtime (HPX) installs handlers for SIGPIPE and the fatal
signals when a circuit first runs. Python ignores SIGPIPE so that writing to a connection the
peer closed raises an error; under HPX's handler the same write aborts, its abort handler aborts
again, and the recursion overflows the stack: the process dies of SIGSEGV (and faulthandler,
replaced too, prints nothing). A server or client that ever ran a circuit would die the first
time it wrote to a connection the other side had dropped.

:func:`kept_signal_handlers` saves the dispositions before such a call and restores them after,
at the C level (``signal.signal`` only sees Python's own handlers).
"""

from __future__ import annotations

import ctypes
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager

KEPT = (signal.SIGPIPE, signal.SIGINT, signal.SIGTERM, signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS,
        signal.SIGILL, signal.SIGFPE)


class _Sigaction(ctypes.Structure):
    """glibc's ``struct sigaction`` on Linux (x86-64 and aarch64 share this layout)."""

    _fields_ = [("handler", ctypes.c_void_p), ("mask", ctypes.c_ulong * 16), ("flags", ctypes.c_int),
                ("restorer", ctypes.c_void_p)]


_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _save() -> dict[int, _Sigaction]:
    saved = {}
    for number in KEPT:
        action = _Sigaction()
        if _LIBC is not None and _LIBC.sigaction(number, None, ctypes.byref(action)) == 0:
            saved[number] = action
    return saved


def _restore(saved: dict[int, _Sigaction]) -> None:
    for number, action in saved.items():
        assert _LIBC is not None
        _LIBC.sigaction(number, ctypes.byref(action), None)


@contextmanager
def kept_signal_handlers() -> Iterator[None]:
    """Run the block; then put back every disposition in ``KEPT`` as it was before it."""
    saved = _save()
    try:
        yield
    finally:
        _restore(saved)


def handlers() -> dict[int, int | None]:
    """The current C-level handler address of each signal in ``KEPT`` (for tests)."""
    return {number: action.handler for number, action in _save().items()}
