"""Freed request buffers go back to the operating system, so that a server's resident memory
says what it holds. Request bodies and ciphertext lists are megabytes each, and glibc's malloc
kept them in two ways: it raises its mmap threshold after the first large block is freed (up to
32 MiB) and then serves such blocks from its heaps, which keep freed pages; and each thread gets
a heap of its own (up to 8 per core), so each of the evaluation process's call threads kept the
largest request it had handled. A burst of refused uploads left hundreds of MB resident.

A fixed threshold (``M_MMAP_THRESHOLD``) keeps every block of 1 MiB or more in its own mapping,
unmapped when freed; two heaps for all threads (``M_ARENA_MAX``) let the threads reuse each
other's freed space, so what stays is what the busiest moment needed, not that per thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8  # mallopt's parameter numbers (malloc.h)
LARGE_BYTES = 1 << 20
ARENAS = 2


def release_large_buffers() -> bool:
    """Set both in this process, before its threads allocate; False where the C library is not
    glibc (nothing changes)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, LARGE_BYTES)) and bool(mallopt(M_ARENA_MAX, ARENAS))
