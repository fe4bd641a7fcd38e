"""Pooling ops (average, max) as reduce_window."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import torch
from jax import lax

from .record import OpRecord

aten = torch.ops.aten


def _pool_args(x, kernel, stride, padding, n):
    kernel = tuple(kernel) * (n if len(kernel) == 1 else 1)
    stride = tuple(stride) * (n if len(stride) == 1 else 1) if stride else kernel
    padding = tuple(padding) * (n if len(padding) == 1 else 1) if padding else (0,) * n
    lead = jnp.ndim(x) - n
    dims = (1,) * lead + kernel
    strides = (1,) * lead + stride
    pads = ((0, 0),) * lead + tuple((p, p) for p in padding)
    return dims, strides, pads


def _avg_pool(n):
    def run(
        x,
        kernel_size,
        stride=(),
        padding=0,
        ceil_mode=False,
        count_include_pad=True,
        divisor_override=None,
    ):
        padding = [padding] if isinstance(padding, int) else padding
        dims, strides, pads = _pool_args(x, kernel_size, stride, padding, n)
        total = lax.reduce_window(x, jnp.zeros((), x.dtype), lax.add, dims, strides, pads)
        if divisor_override:
            return total / divisor_override
        if count_include_pad:
            return total / math.prod(dims)
        count = lax.reduce_window(
            jnp.ones_like(x), jnp.zeros((), x.dtype), lax.add, dims, strides, pads
        )
        return total / count

    return run


def _max_pool2d(x, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
    padding = [padding] if isinstance(padding, int) else padding
    dims, strides, pads = _pool_args(x, kernel_size, stride, padding, 2)
    out = lax.reduce_window(x, jnp.array(-jnp.inf, x.dtype), lax.max, dims, strides, pads)
    return out, None


def _arg(node, position: int, name: str, default):
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(name, default)


def _check_avg_pool(node):
    if _arg(node, 4, "ceil_mode", False):
        return "avg_pool with ceil_mode=True has no JAX lowering; use ceil_mode=False"
    return None


def _check_max_pool(node):
    if _arg(node, 5, "ceil_mode", False) or any(
        d != 1 for d in np.atleast_1d(_arg(node, 4, "dilation", 1))
    ):
        return "max_pool2d with ceil_mode or dilation has no JAX lowering"
    if any(u.args[1] != 0 for u in node.users):
        return "max_pool2d's indices (return_indices=True) have no JAX lowering"
    return None


OPS = {
    aten.avg_pool1d.default: OpRecord(_avg_pool(1), check=_check_avg_pool),
    aten.avg_pool2d.default: OpRecord(_avg_pool(2), check=_check_avg_pool),
    aten.max_pool2d_with_indices.default: OpRecord(_max_pool2d, check=_check_max_pool),
}
