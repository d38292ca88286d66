"""JAX's persistent compilation cache on ``gs://`` (through gcsfs), against the GCS emulator.

Each compile runs in a fresh process: JAX opens its cache once per process."""

from __future__ import annotations

import os
import subprocess
import sys

from pipeline import storage

COMPILE = """
import sys
import jax, jax.numpy as jnp
from stages.train.compile_cache import use_compilation_cache
jax.monitoring.register_event_listener(lambda event, **_: print("EVENT", event))
use_compilation_cache(sys.argv[1])
print(jax.jit(lambda x: jnp.tanh(x) @ x.T)(jnp.ones((4, 4))).sum())
"""
HIT = "EVENT /jax/compilation_cache/cache_hits"


def compile_once(cache: str) -> str:
    """What one process compiling a small program with ``cache`` prints (JAX's events)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [sys.executable, "-c", COMPILE, cache], cwd=root, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_a_gs_cache_keeps_programs_for_the_next_process(gcs_bucket: str) -> None:
    cache = f"{gcs_bucket}/xla"
    first = compile_once(cache)
    assert HIT not in first
    kept = storage.list_files(cache)
    assert any(name.startswith(f"{cache}/jit__lambda-") for name in kept), kept
    assert HIT in compile_once(cache)
