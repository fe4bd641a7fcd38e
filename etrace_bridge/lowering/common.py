"""Small helpers shared by the op families: torch argument conventions in JAX terms."""

from __future__ import annotations

import jax.numpy as jnp

from etrace_bridge.arrays import jax_dtype


def axes(x, dim):
    """torch `dim` (None, [], int or list) as a tuple of axes; empty/None means all."""
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return tuple(range(jnp.ndim(x)))
    if isinstance(dim, int):
        return (dim % max(jnp.ndim(x), 1),)
    return tuple(d % max(jnp.ndim(x), 1) for d in dim)


def dt(dtype):
    """JAX dtype for an optional torch dtype."""
    return None if dtype is None else jax_dtype(dtype)


def cast(x, dtype):
    """Cast to an optional torch dtype."""
    return x if dtype is None else jnp.asarray(x).astype(jax_dtype(dtype))


def at_dim(x, dim, item):
    """`x[..., item]` at axis `dim` (torch's select/slice along one dimension)."""
    dim = dim % jnp.ndim(x)
    return x[(slice(None),) * dim + (item,)]


def full(size, value, dtype=None):
    """torch.full with an optional torch dtype."""
    dtype = dt(dtype)
    if dtype is None:
        return jnp.full(tuple(size), value)
    return jnp.full(tuple(size), value, dtype=dtype)


def scaled(b, alpha):
    """torch's `alpha * b` argument convention."""
    return b if alpha == 1 else b * alpha
