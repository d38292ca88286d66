"""JAX's persistent compilation cache, as every stage and tool that compiles the model uses it.

A training step, an evaluation bucket or a decode step compiled once is written to the
cache directory; a restarted or resumed train stage, a second evaluate run or another
lm-eval run with the same shapes loads the executable instead of compiling it again. JAX's
default keeps only programs that took over a second to compile; the thresholds here keep
every program, so the small models of the demo and the tests are cached too. A ``gs://``
directory works as a local one: JAX reaches it through etils' ``epath``, which uses
``gcsfs`` (a dependency for that reason), so every host of a pod shares one cache.
"""

from __future__ import annotations

import os

import jax

USER_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "meshline", "compilation-cache")
"""Where tools outside a pipeline run (the lm-eval adapter) keep compiled programs."""


def use_compilation_cache(directory: str | None) -> None:
    """Cache every program this process compiles under ``directory`` (None: leave JAX's
    setting as it is)."""
    if not directory:
        return
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
