"""glibc malloc settings for processes that run XLA's CPU backend: keep freed buffers.

XLA's CPU runtime mallocs every temporary of a step (hundreds of MB for a 100M-parameter
model) and frees it when the step ends. Under glibc's defaults each large block is mmapped
and unmapped again, so every step faults in fresh zeroed pages (3.5 million minor page
faults in ``benchmarks/model.py``), and each of XLA's threads gets its own arena, whose
free blocks the others cannot reuse. One arena, no mmap and no trimming make the heap grow
to the step's peak once and then reuse it: ``benchmarks/model.py``'s forward+backward went
from 10.2 to 7.2 s on 2 cores (``--glibc-defaults`` gives the former). MaxText gets the same
effect by preloading tcmalloc on its hosts; these settings need nothing installed.

The cost is that freed memory stays with the process (its resident size stays at its
peak), which suits a process that runs the same step over and over.
"""

from __future__ import annotations

import ctypes
import ctypes.util

ENV: dict[str, str] = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(2**62),
}
"""The settings as the environment variables glibc reads when a process starts."""

# mallopt parameter numbers from glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def keep_freed_memory() -> bool:
    """Apply ``ENV``'s settings to this running process; False where libc is not glibc.

    Call it before the threads that allocate start (before importing JAX): threads that
    already hold an arena keep it.
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False
    # mallopt takes an int; -1 becomes SIZE_MAX for the trim threshold (never trim), where a
    # large positive int would wrap.
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
    return all(libc.mallopt(param, value) == 1 for param, value in settings)
