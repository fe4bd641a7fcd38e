"""Keep the user's ``jax_enable_x64`` across imports that reset it (importing brainstate does).

brainstate sets JAX's 64-bit mode from its own precision setting when it is first imported, so a
user who enabled x64 and then imported a library built on brainstate would silently compute in
float32. ``etrace_core`` and ``etrace_bridge`` import everything inside :func:`keep_x64`.
"""

import contextlib

import jax

__all__ = ["keep_x64"]


@contextlib.contextmanager
def keep_x64():
    """Restore ``jax_enable_x64`` to its value on entry when the block exits."""
    before = bool(jax.config.read("jax_enable_x64"))
    try:
        yield before
    finally:
        if bool(jax.config.read("jax_enable_x64")) != before:
            jax.config.update("jax_enable_x64", before)
