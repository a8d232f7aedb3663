"""Large buffers go back to the operating system when freed, so that a server's resident memory
says what it holds. Request bodies and ciphertext lists are megabytes each; glibc's malloc
raises its mmap threshold after the first such block is freed (up to 32 MiB) and from then on
serves them from per-thread heaps, which keep the freed pages: a burst of refused uploads left
hundreds of MB resident across the evaluation process's call threads. A fixed threshold
(``M_MMAP_THRESHOLD``) keeps every block of 1 MiB or more in its own mapping, unmapped when freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
LARGE_BYTES = 1 << 20


def release_large_buffers() -> bool:
    """Set the threshold in this process; False where the C library is not glibc (nothing changes)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, LARGE_BYTES))
