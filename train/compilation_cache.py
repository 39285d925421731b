"""JAX's persistent compilation cache, switched on for every program (the benchmarks' pre-compile
workers and the probing grid share compiled steps through it; a training run with
`config.compilation_cache_dir` keeps its compiled steps for the next start)."""

from __future__ import annotations

import os


def enable_compilation_cache(cache_dir: str) -> None:
    """Cache every compiled program under `cache_dir`, however fast its compile or small its entry."""
    import jax  # noqa: PLC0415

    jax.config.update("jax_compilation_cache_dir", cache_dir if "://" in cache_dir else os.path.abspath(cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
