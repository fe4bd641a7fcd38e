"""Tensor creation ops: full/zeros/ones(_like), arange, scalar_tensor, fill."""

from __future__ import annotations

import jax.numpy as jnp
import torch

from .common import dt, full
from .record import plain

aten = torch.ops.aten


def _arange(start, end=None, step=1, dtype=None):
    if end is None:
        start, end = 0, start
    return jnp.arange(start, end, step, dtype=dt(dtype))


def _creation_ops():
    return {
        aten.full.default: lambda size, value, dtype=None: full(size, value, dtype),
        aten.zeros.default: lambda size, dtype=None: full(size, 0, dtype),
        aten.ones.default: lambda size, dtype=None: full(size, 1, dtype),
        aten.empty.memory_format: lambda size, dtype=None: full(size, 0, dtype),
        aten.full_like.default: lambda x, value, dtype=None: jnp.full_like(x, value, dt(dtype)),
        aten.zeros_like.default: lambda x, dtype=None: jnp.zeros_like(x, dt(dtype)),
        aten.ones_like.default: lambda x, dtype=None: jnp.ones_like(x, dt(dtype)),
        aten.empty_like.default: lambda x, dtype=None: jnp.zeros_like(x, dt(dtype)),
        aten.new_zeros.default: lambda x, size, dtype=None: full(size, 0, dtype or None),
        aten.new_ones.default: lambda x, size, dtype=None: full(size, 1, dtype or None),
        aten.new_full.default: lambda x, size, value, dtype=None: full(size, value, dtype),
        aten.new_empty.default: lambda x, size, dtype=None: full(size, 0, dtype),
        aten.scalar_tensor.default: lambda s, dtype=None: jnp.asarray(s, dt(dtype)),
        aten.fill.Scalar: lambda x, value: jnp.full_like(x, value),
        aten.fill.Tensor: lambda x, value: jnp.broadcast_to(
            jnp.asarray(value).astype(jnp.result_type(x)), jnp.shape(x)
        ),
        aten.arange.default: lambda end, dtype=None: _arange(0, end, 1, dtype),
        aten.arange.start: lambda start, end, dtype=None: _arange(start, end, 1, dtype),
        aten.arange.start_step: _arange,
    }


OPS = plain(_creation_ops())
