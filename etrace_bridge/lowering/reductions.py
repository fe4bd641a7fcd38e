"""Reductions and normalisations: sum/mean/max/var, softmax, layer norm, eval-mode batch norm."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import torch
from jax import lax

from .common import axes, cast
from .record import plain

aten = torch.ops.aten


def _reduce(fn):
    def run(x, dim=None, keepdim=False, dtype=None):
        return cast(fn(x, axis=axes(x, dim), keepdims=keepdim), dtype)

    return run


def _var(x, dim=None, *, correction=None, keepdim=False):
    ddof = 1 if correction is None else correction
    return jnp.var(x, axis=axes(x, dim), ddof=ddof, keepdims=keepdim)


def _var_mean(x, dim=None, *, correction=None, keepdim=False):
    return (
        _var(x, dim, correction=correction, keepdim=keepdim),
        jnp.mean(x, axis=axes(x, dim), keepdims=keepdim),
    )


def _std(x, dim=None, *, correction=None, keepdim=False):
    return jnp.sqrt(_var(x, dim, correction=correction, keepdim=keepdim))


def _arg(fn):
    def run(x, dim=None, keepdim=False):
        if dim is None:
            return fn(jnp.reshape(x, (-1,)), axis=0)
        return fn(x, axis=dim, keepdims=keepdim)

    return run


def _max_dim(fn, argfn):
    def run(x, dim, keepdim=False):
        return fn(x, axis=dim, keepdims=keepdim), argfn(x, axis=dim, keepdims=keepdim)

    return run


def _layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    axes = tuple(range(x.ndim - len(normalized_shape), x.ndim))
    mean = jnp.mean(x, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True)
    rstd = lax.rsqrt(var + eps)
    out = (x - mean) * rstd
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out, mean, rstd


def _batch_norm_eval(x, weight, bias, running_mean, running_var, momentum, eps):
    shape = (1, -1) + (1,) * (x.ndim - 2)
    out = (x - running_mean.reshape(shape)) * lax.rsqrt(running_var.reshape(shape) + eps)
    if weight is not None:
        out = out * weight.reshape(shape)
    if bias is not None:
        out = out + bias.reshape(shape)
    empty = jnp.zeros((0,), x.dtype)
    return out, empty, empty


def _reduction_ops():
    return {
        aten.sum.default: lambda x, dtype=None: cast(jnp.sum(x), dtype),
        aten.sum.dim_IntList: _reduce(jnp.sum),
        aten.mean.default: lambda x, dtype=None: cast(jnp.mean(x), dtype),
        aten.mean.dim: _reduce(jnp.mean),
        aten.prod.default: lambda x, dtype=None: cast(jnp.prod(x), dtype),
        aten.prod.dim_int: _reduce(jnp.prod),
        aten.amax.default: _reduce(jnp.max),
        aten.amin.default: _reduce(jnp.min),
        aten.max.default: jnp.max,
        aten.min.default: jnp.min,
        aten.max.dim: _max_dim(jnp.max, jnp.argmax),
        aten.min.dim: _max_dim(jnp.min, jnp.argmin),
        aten.argmax.default: _arg(jnp.argmax),
        aten.argmin.default: _arg(jnp.argmin),
        aten.any.default: jnp.any,
        aten.all.default: jnp.all,
        aten.any.dim: _reduce(jnp.any),
        aten.any.dims: _reduce(jnp.any),
        aten.all.dim: _reduce(jnp.all),
        aten.all.dims: _reduce(jnp.all),
        aten.logsumexp.default: lambda x, dim, keepdim=False: jax.nn.logsumexp(
            x, axis=axes(x, dim), keepdims=keepdim
        ),
        aten.var.correction: _var,
        aten.var_mean.correction: _var_mean,
        aten.std.correction: _std,
        aten._softmax.default: lambda x, dim, half_to_float=False: jax.nn.softmax(x, axis=dim),
        aten._log_softmax.default: lambda x, dim, half_to_float=False: jax.nn.log_softmax(
            x, axis=dim
        ),
        aten.native_layer_norm.default: _layer_norm,
        aten._native_batch_norm_legit_no_training.default: _batch_norm_eval,
    }


OPS = plain(_reduction_ops())
