"""The malloc settings for XLA CPU processes: a large buffer comes from the heap and stays
there after it is freed, where glibc's defaults mmap it and give it back."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from stages.train import malloc

SIZE = 2**26  # 64 MiB: above glibc's largest dynamic mmap threshold (32 MiB)

# Prints the bytes held in mmapped blocks while the buffer lives, and the heap's size after
# it is freed (mallinfo2's hblkhd and arena).
PROGRAM = f"""
import ctypes, sys
import numpy as np
from stages.train.malloc import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split())]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "mallopt":
    assert keep_freed_memory()
buffer = np.ones({SIZE}, np.uint8)
mapped = libc.mallinfo2().hblkhd
del buffer
print(mapped, libc.mallinfo2().arena)
"""


def mapped_and_heap_bytes(mode: str, env: dict[str, str]) -> tuple[int, int]:
    # Settings in the caller's environment would blur glibc's defaults.
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    run = subprocess.run(
        [sys.executable, "-c", PROGRAM, mode],
        env={**inherited, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    mapped, heap = map(int, run.stdout.split())
    return mapped, heap


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_default_malloc_unmaps_and_both_forms_of_the_settings_keep_the_heap() -> None:
    mapped, heap = mapped_and_heap_bytes("default", {})
    assert mapped >= SIZE and heap < SIZE
    for mode, env in (("mallopt", {}), ("environment", malloc.ENV)):
        mapped, heap = mapped_and_heap_bytes(mode, env)
        assert mapped < SIZE and heap >= SIZE, mode
