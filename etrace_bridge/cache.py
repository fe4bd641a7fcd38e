"""Opt-in on-disk cache of compiled XLA programs, shared by models of the same structure.

Two learners of the same model structure, shapes and algorithm compile the same XLA programs;
with the cache on, a later process reads them from disk instead of compiling them again (the
cold start's largest single cost). Off by default: it writes to a directory the user chooses.
"""

from __future__ import annotations

import os

import jax
from jax.experimental.compilation_cache import compilation_cache


def enable_compilation_cache(
    directory: str | os.PathLike, *, min_compile_time_s: float = 0.0
) -> str:
    """Turn on JAX's persistent compilation cache in `directory` (created if missing) for this
    process, caching every program that took at least `min_compile_time_s` to compile (JAX's
    own default, 1 s, would skip the bridge's programs). Works also after programs were
    compiled in this process (JAX decides once whether to use the cache: that decision is
    reset). Returns the directory's path."""
    path = os.path.abspath(os.fspath(directory))
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    compilation_cache.reset_cache()
    return path


__all__ = ["enable_compilation_cache"]
