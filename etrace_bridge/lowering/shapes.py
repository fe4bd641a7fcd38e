"""Shape and indexing ops: views, slices, splits, concatenation, gathers, copies."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import torch
from jax import lax

from .common import at_dim, axes, cast
from .record import plain

aten = torch.ops.aten


def _expand(x, size, implicit=False):
    lead = len(size) - jnp.ndim(x)
    shape = tuple(jnp.shape(x)[i - lead] if s == -1 else s for i, s in enumerate(size))
    return jnp.broadcast_to(x, shape)


def _squeeze_dims(x, dims):
    dims = axes(x, dims) if dims is not None else ()
    drop = tuple(d for d in dims if jnp.shape(x)[d] == 1)
    return jnp.squeeze(x, axis=drop) if drop else x


def _slice(x, dim=0, start=None, end=None, step=1):
    return at_dim(x, dim, slice(start, end, step))


def _split(x, split_size, dim=0):
    size = jnp.shape(x)[dim]
    return [at_dim(x, dim, slice(i, min(i + split_size, size))) for i in range(0, size, split_size)]


def _split_with_sizes(x, sizes, dim=0):
    bounds = np.cumsum([0] + list(sizes))
    return [at_dim(x, dim, slice(int(a), int(b))) for a, b in zip(bounds[:-1], bounds[1:])]


def _transpose(x, d0, d1):
    return jnp.swapaxes(x, d0, d1)


def _constant_pad(x, pad, value=0):
    config = [(0, 0, 0)] * jnp.ndim(x)
    for i in range(len(pad) // 2):
        config[jnp.ndim(x) - 1 - i] = (pad[2 * i], pad[2 * i + 1], 0)
    return lax.pad(x, jnp.asarray(value, jnp.result_type(x)), config)


def _index_tensor(x, indices):
    return x[tuple(slice(None) if i is None else i for i in indices)]


def _chunk(x, chunks, dim=0):
    return _split(x, -(-jnp.shape(x)[dim] // chunks), dim)


def _slice_scatter(x, src, dim=0, start=None, end=None, step=1):
    dim = dim % jnp.ndim(x)
    return x.at[(slice(None),) * dim + (slice(start, end, step),)].set(src)


def _select_scatter(x, src, dim, index):
    dim = dim % jnp.ndim(x)
    return x.at[(slice(None),) * dim + (index,)].set(src)


def _index_put(x, indices, values, accumulate=False):
    at = x.at[tuple(slice(None) if i is None else i for i in indices)]
    return at.add(values) if accumulate else at.set(values)


def _copy(dst, src, non_blocking=False):
    return jnp.broadcast_to(jnp.asarray(src).astype(jnp.result_type(dst)), jnp.shape(dst))


def _embedding(weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    return jnp.take(weight, indices, axis=0)


def _shape_ops():
    return {
        aten.view.default: lambda x, shape: jnp.reshape(x, tuple(shape)),
        aten._unsafe_view.default: lambda x, shape: jnp.reshape(x, tuple(shape)),
        aten.reshape.default: lambda x, shape: jnp.reshape(x, tuple(shape)),
        aten.permute.default: lambda x, dims: jnp.transpose(x, tuple(dims)),
        aten.transpose.int: _transpose,
        aten.t.default: lambda x: jnp.transpose(x),
        aten.unsqueeze.default: lambda x, dim: jnp.expand_dims(x, dim),
        aten.squeeze.default: lambda x: jnp.squeeze(x),
        aten.squeeze.dim: lambda x, dim: _squeeze_dims(x, [dim]),
        aten.squeeze.dims: _squeeze_dims,
        aten.expand.default: _expand,
        aten.slice.Tensor: _slice,
        aten.select.int: lambda x, dim, index: at_dim(x, dim, index),
        aten.narrow.default: lambda x, dim, start, length: at_dim(
            x, dim, slice(start, start + length)
        ),
        aten.split.Tensor: _split,
        aten.split_with_sizes.default: _split_with_sizes,
        aten.chunk.default: _chunk,
        aten.slice_scatter.default: _slice_scatter,
        aten.select_scatter.default: _select_scatter,
        aten.index_put.default: _index_put,
        aten.unbind.int: lambda x, dim=0: [at_dim(x, dim, i) for i in range(jnp.shape(x)[dim])],
        aten.cat.default: lambda xs, dim=0: jnp.concatenate(xs, axis=dim),
        aten.stack.default: lambda xs, dim=0: jnp.stack(xs, axis=dim),
        aten.flip.default: lambda x, dims: jnp.flip(x, axis=tuple(dims)),
        aten.roll.default: lambda x, shifts, dims=(): jnp.roll(
            x, tuple(shifts), axis=tuple(dims) if dims else None
        ),
        aten.repeat.default: lambda x, repeats: jnp.tile(x, tuple(repeats)),
        aten.constant_pad_nd.default: _constant_pad,
        aten.index_select.default: lambda x, dim, index: jnp.take(x, index, axis=dim),
        aten.gather.default: lambda x, dim, index, sparse_grad=False: jnp.take_along_axis(
            x, index, axis=dim
        ),
        aten.index.Tensor: _index_tensor,
        aten.embedding.default: _embedding,
        aten.clone.default: lambda x: x,
        aten.alias.default: lambda x: x,
        aten.detach.default: lax.stop_gradient,  # kept whole by decompose.decomposition_table
        aten.lift_fresh_copy.default: lambda x: x,
        aten._to_copy.default: lambda x, dtype=None: cast(x, dtype),
        aten.to.dtype: lambda x, dtype, *args: cast(x, dtype),
        aten.copy.default: _copy,
        aten.copy_.default: _copy,
        aten.native_dropout.default: lambda x, p, train=None: (x, jnp.ones(jnp.shape(x), bool)),
    }


OPS = plain(_shape_ops())
