"""Pause points of long work: a backend calls :func:`pause_point` between units of an evaluation
(a block of a bfv product), and whoever scheduled the work may hand its turn to another caller
there. Nothing happens unless a scheduler installed a hook for this thread (the server's fair
queue does; a backend used on its own runs straight through)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_local = threading.local()


def pause_point() -> None:
    hook = getattr(_local, "hook", None)
    if hook is not None:
        hook()


@contextmanager
def pausing(hook: Callable[[], None]) -> Iterator[None]:
    """Call ``hook`` at every pause point this thread reaches within the block."""
    previous = getattr(_local, "hook", None)
    _local.hook = hook
    try:
        yield
    finally:
        _local.hook = previous
