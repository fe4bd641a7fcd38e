"""Lower an exported torch step (ATen FX graph) to a JAX function.

`OP_TABLE` maps each supported ATen overload to a small JAX function taking the node's evaluated
arguments. It is built once and read-only. Ops whose weight is a parameter placeholder
(`aten.linear`, `aten.convolution`, `aten.mm` with a parameter right operand) go through the
`etrace_core.ops` ETP primitives so the online compiler sees the parameter as a traced weight.
Results are cast to the dtype torch recorded for each node, so torch's promotion rules hold.
"""
from __future__ import annotations

import math
import operator
import types
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.utils._pytree as pytree
from jax import lax

from etrace_bridge.errors import UnsupportedOpError
from etrace_bridge.export import ExportedStep, user_frame
from etrace_core import ops as etp

__all__ = ["OP_TABLE", "lower", "jax_dtype", "LoweredStep"]

aten = torch.ops.aten

_IGNORED_KWARGS = frozenset({"device", "layout", "pin_memory", "memory_format", "non_blocking",
                             "requires_grad"})

_DTYPES = {
    torch.float16: np.float16, torch.bfloat16: jnp.bfloat16, torch.float32: np.float32,
    torch.float64: np.float64, torch.int8: np.int8, torch.int16: np.int16, torch.int32: np.int32,
    torch.int64: np.int64, torch.uint8: np.uint8, torch.bool: np.bool_,
    torch.complex64: np.complex64, torch.complex128: np.complex128,
}


def jax_dtype(dtype: torch.dtype) -> np.dtype:
    """The JAX dtype for a torch dtype (int64 becomes int32 while JAX x64 is off)."""
    if dtype not in _DTYPES:
        raise TypeError(f"torch dtype {dtype} has no JAX equivalent in the bridge")
    return jax.dtypes.canonicalize_dtype(_DTYPES[dtype])


# ----------------------------------------------------------------------------- helpers


def _axes(x, dim):
    """torch `dim` (None, [], int or list) as a tuple of axes; empty/None means all."""
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return tuple(range(jnp.ndim(x)))
    if isinstance(dim, int):
        return (dim % max(jnp.ndim(x), 1),)
    return tuple(d % max(jnp.ndim(x), 1) for d in dim)


def _dt(dtype):
    return None if dtype is None else jax_dtype(dtype)


def _cast(x, dtype):
    return x if dtype is None else jnp.asarray(x).astype(jax_dtype(dtype))


def _index(x, dim, item):
    dim = dim % jnp.ndim(x)
    return x[(slice(None),) * dim + (item,)]


def _full(size, value, dtype=None):
    dtype = _dt(dtype)
    if dtype is None:
        return jnp.full(tuple(size), value)
    return jnp.full(tuple(size), value, dtype=dtype)


def _alpha(b, alpha):
    return b if alpha == 1 else b * alpha


# ----------------------------------------------------------------------------- elementwise


def _div_mode(a, b, rounding_mode=None):
    if rounding_mode is None:
        return jnp.true_divide(a, b)
    if rounding_mode == "floor":
        return jnp.floor_divide(a, b)
    q = jnp.true_divide(a, b)
    return jnp.trunc(q)


def _elu(x, alpha=1.0, scale=1.0, input_scale=1.0):
    return jnp.where(x > 0, x * scale, jnp.expm1(x * input_scale) * (alpha * scale))


def _softplus(x, beta=1.0, threshold=20.0):
    return jnp.where(x * beta > threshold, x, jnp.log1p(jnp.exp(x * beta)) / beta)


def _clamp(x, min=None, max=None):  # noqa: A002  (torch's argument names)
    if min is not None:
        x = jnp.maximum(x, min)
    if max is not None:
        x = jnp.minimum(x, max)
    return x


def _elementwise_ops():
    unary = {
        aten.neg.default: jnp.negative, aten.exp.default: jnp.exp, aten.expm1.default: jnp.expm1,
        aten.exp2.default: jnp.exp2, aten.log.default: jnp.log, aten.log1p.default: jnp.log1p,
        aten.log2.default: jnp.log2, aten.log10.default: jnp.log10, aten.tanh.default: jnp.tanh,
        aten.sigmoid.default: jax.nn.sigmoid, aten.abs.default: jnp.abs,
        aten.sqrt.default: jnp.sqrt, aten.rsqrt.default: lax.rsqrt,
        aten.reciprocal.default: jnp.reciprocal, aten.sign.default: jnp.sign,
        aten.sgn.default: jnp.sign, aten.sin.default: jnp.sin, aten.cos.default: jnp.cos,
        aten.tan.default: jnp.tan, aten.asin.default: jnp.arcsin, aten.acos.default: jnp.arccos,
        aten.atan.default: jnp.arctan, aten.sinh.default: jnp.sinh, aten.cosh.default: jnp.cosh,
        aten.asinh.default: jnp.arcsinh, aten.acosh.default: jnp.arccosh,
        aten.atanh.default: jnp.arctanh, aten.floor.default: jnp.floor,
        aten.ceil.default: jnp.ceil, aten.round.default: jnp.round, aten.trunc.default: jnp.trunc,
        aten.erf.default: jax.scipy.special.erf, aten.erfc.default: jax.scipy.special.erfc,
        aten.erfinv.default: jax.scipy.special.erfinv,
        aten.logical_not.default: jnp.logical_not, aten.bitwise_not.default: jnp.invert,
        aten.isnan.default: jnp.isnan, aten.isinf.default: jnp.isinf,
        aten.isfinite.default: jnp.isfinite,
        aten.relu.default: lambda x: jnp.maximum(x, 0),
        aten.silu.default: jax.nn.silu,
        aten.mish.default: lambda x: x * jnp.tanh(_softplus(x)),
        aten.hardsigmoid.default: lambda x: jnp.clip(x + 3, 0, 6) / 6,
        aten.hardswish.default: lambda x: x * jnp.clip(x + 3, 0, 6) / 6,
    }
    binary = {
        aten.mul.Tensor: jnp.multiply, aten.mul.Scalar: jnp.multiply,
        aten.div.Tensor: jnp.true_divide, aten.div.Scalar: jnp.true_divide,
        aten.pow.Tensor_Scalar: jnp.power, aten.pow.Tensor_Tensor: jnp.power,
        aten.pow.Scalar: jnp.power, aten.maximum.default: jnp.maximum,
        aten.minimum.default: jnp.minimum, aten.fmax.default: jnp.fmax,
        aten.fmin.default: jnp.fmin, aten.atan2.default: jnp.arctan2,
        aten.remainder.Tensor: jnp.remainder, aten.remainder.Scalar: jnp.remainder,
        aten.fmod.Tensor: jnp.fmod, aten.fmod.Scalar: jnp.fmod,
        aten.floor_divide.default: jnp.floor_divide,
        aten.logical_and.default: jnp.logical_and, aten.logical_or.default: jnp.logical_or,
        aten.logical_xor.default: jnp.logical_xor,
        aten.bitwise_and.Tensor: jnp.bitwise_and, aten.bitwise_or.Tensor: jnp.bitwise_or,
        aten.bitwise_xor.Tensor: jnp.bitwise_xor,
        aten.eq.Tensor: jnp.equal, aten.eq.Scalar: jnp.equal,
        aten.ne.Tensor: jnp.not_equal, aten.ne.Scalar: jnp.not_equal,
        aten.gt.Tensor: jnp.greater, aten.gt.Scalar: jnp.greater,
        aten.ge.Tensor: jnp.greater_equal, aten.ge.Scalar: jnp.greater_equal,
        aten.lt.Tensor: jnp.less, aten.lt.Scalar: jnp.less,
        aten.le.Tensor: jnp.less_equal, aten.le.Scalar: jnp.less_equal,
    }
    table = {op: (lambda f: lambda x: f(x))(f) for op, f in unary.items()}
    table.update({op: (lambda f: lambda a, b: f(a, b))(f) for op, f in binary.items()})
    table.update({
        aten.add.Tensor: lambda a, b, alpha=1: a + _alpha(b, alpha),
        aten.add.Scalar: lambda a, b, alpha=1: a + _alpha(b, alpha),
        aten.sub.Tensor: lambda a, b, alpha=1: a - _alpha(b, alpha),
        aten.sub.Scalar: lambda a, b, alpha=1: a - _alpha(b, alpha),
        aten.rsub.Tensor: lambda a, b, alpha=1: b - _alpha(a, alpha),
        aten.rsub.Scalar: lambda a, b, alpha=1: b - _alpha(a, alpha),
        aten.div.Tensor_mode: _div_mode, aten.div.Scalar_mode: _div_mode,
        aten.gelu.default: lambda x, approximate="none": jax.nn.gelu(
            x, approximate=approximate == "tanh"),
        aten.leaky_relu.default: lambda x, negative_slope=0.01: jnp.where(
            x > 0, x, x * negative_slope),
        aten.elu.default: _elu,
        aten.softplus.default: _softplus,
        aten.hardtanh.default: lambda x, min_val=-1.0, max_val=1.0: jnp.clip(x, min_val, max_val),
        aten.clamp.default: _clamp, aten.clamp.Tensor: _clamp,
        aten.clamp_min.default: lambda x, m: jnp.maximum(x, m),
        aten.clamp_max.default: lambda x, m: jnp.minimum(x, m),
        aten.where.self: jnp.where, aten.where.ScalarSelf: jnp.where,
        aten.where.ScalarOther: jnp.where, aten.where.Scalar: jnp.where,
        aten.masked_fill.Scalar: lambda x, mask, v: jnp.where(mask, v, x),
        aten.masked_fill.Tensor: lambda x, mask, v: jnp.where(mask, v, x),
        aten.lerp.Scalar: lambda a, b, w: a + w * (b - a),
        aten.lerp.Tensor: lambda a, b, w: a + w * (b - a),
    })
    return table


# ----------------------------------------------------------------------------- reductions


def _reduce(fn):
    def run(x, dim=None, keepdim=False, dtype=None):
        return _cast(fn(x, axis=_axes(x, dim), keepdims=keepdim), dtype)
    return run


def _var(x, dim=None, *, correction=None, keepdim=False):
    ddof = 1 if correction is None else correction
    return jnp.var(x, axis=_axes(x, dim), ddof=ddof, keepdims=keepdim)


def _var_mean(x, dim=None, *, correction=None, keepdim=False):
    return (_var(x, dim, correction=correction, keepdim=keepdim),
            jnp.mean(x, axis=_axes(x, dim), keepdims=keepdim))


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
        aten.sum.default: lambda x, dtype=None: _cast(jnp.sum(x), dtype),
        aten.sum.dim_IntList: _reduce(jnp.sum),
        aten.mean.default: lambda x, dtype=None: _cast(jnp.mean(x), dtype),
        aten.mean.dim: _reduce(jnp.mean),
        aten.prod.default: lambda x, dtype=None: _cast(jnp.prod(x), dtype),
        aten.prod.dim_int: _reduce(jnp.prod),
        aten.amax.default: _reduce(jnp.max), aten.amin.default: _reduce(jnp.min),
        aten.max.default: jnp.max, aten.min.default: jnp.min,
        aten.max.dim: _max_dim(jnp.max, jnp.argmax), aten.min.dim: _max_dim(jnp.min, jnp.argmin),
        aten.argmax.default: _arg(jnp.argmax), aten.argmin.default: _arg(jnp.argmin),
        aten.any.default: jnp.any, aten.all.default: jnp.all,
        aten.any.dim: _reduce(jnp.any), aten.any.dims: _reduce(jnp.any),
        aten.all.dim: _reduce(jnp.all), aten.all.dims: _reduce(jnp.all),
        aten.logsumexp.default: lambda x, dim, keepdim=False: jax.nn.logsumexp(
            x, axis=_axes(x, dim), keepdims=keepdim),
        aten.var.correction: _var, aten.var_mean.correction: _var_mean,
        aten.std.correction: _std,
        aten._softmax.default: lambda x, dim, half_to_float=False: jax.nn.softmax(x, axis=dim),
        aten._log_softmax.default: lambda x, dim, half_to_float=False: jax.nn.log_softmax(
            x, axis=dim),
        aten.native_layer_norm.default: _layer_norm,
        aten._native_batch_norm_legit_no_training.default: _batch_norm_eval,
    }


# ----------------------------------------------------------------------------- shapes


def _expand(x, size, implicit=False):
    lead = len(size) - jnp.ndim(x)
    shape = tuple(jnp.shape(x)[i - lead] if s == -1 else s for i, s in enumerate(size))
    return jnp.broadcast_to(x, shape)


def _squeeze_dims(x, dims):
    dims = _axes(x, dims) if dims is not None else ()
    drop = tuple(d for d in dims if jnp.shape(x)[d] == 1)
    return jnp.squeeze(x, axis=drop) if drop else x


def _slice(x, dim=0, start=None, end=None, step=1):
    return _index(x, dim, slice(start, end, step))


def _split(x, split_size, dim=0):
    size = jnp.shape(x)[dim]
    return [_index(x, dim, slice(i, min(i + split_size, size))) for i in range(0, size, split_size)]


def _split_with_sizes(x, sizes, dim=0):
    bounds = np.cumsum([0] + list(sizes))
    return [_index(x, dim, slice(int(a), int(b))) for a, b in zip(bounds[:-1], bounds[1:])]


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
        aten.select.int: lambda x, dim, index: _index(x, dim, index),
        aten.narrow.default: lambda x, dim, start, length: _index(
            x, dim, slice(start, start + length)),
        aten.split.Tensor: _split,
        aten.split_with_sizes.default: _split_with_sizes,
        aten.chunk.default: _chunk,
        aten.slice_scatter.default: _slice_scatter,
        aten.select_scatter.default: _select_scatter,
        aten.index_put.default: _index_put,
        aten.unbind.int: lambda x, dim=0: [_index(x, dim, i) for i in range(jnp.shape(x)[dim])],
        aten.cat.default: lambda xs, dim=0: jnp.concatenate(xs, axis=dim),
        aten.stack.default: lambda xs, dim=0: jnp.stack(xs, axis=dim),
        aten.flip.default: lambda x, dims: jnp.flip(x, axis=tuple(dims)),
        aten.roll.default: lambda x, shifts, dims=(): jnp.roll(
            x, tuple(shifts), axis=tuple(dims) if dims else None),
        aten.repeat.default: lambda x, repeats: jnp.tile(x, tuple(repeats)),
        aten.constant_pad_nd.default: _constant_pad,
        aten.index_select.default: lambda x, dim, index: jnp.take(x, index, axis=dim),
        aten.gather.default: lambda x, dim, index, sparse_grad=False: jnp.take_along_axis(
            x, index, axis=dim),
        aten.index.Tensor: _index_tensor,
        aten.embedding.default: lambda weight, indices, padding_idx=-1, scale_grad_by_freq=False,
        sparse=False: jnp.take(weight, indices, axis=0),
        aten.clone.default: lambda x: x,
        aten.alias.default: lambda x: x,
        aten.detach.default: lambda x: x,
        aten.lift_fresh_copy.default: lambda x: x,
        aten._to_copy.default: lambda x, dtype=None: _cast(x, dtype),
        aten.to.dtype: lambda x, dtype, *args: _cast(x, dtype),
        aten.copy.default: _copy,
        aten.copy_.default: _copy,
        aten.native_dropout.default: lambda x, p, train=None: (x, jnp.ones(jnp.shape(x), bool)),
    }


# ----------------------------------------------------------------------------- creation


def _arange(start, end=None, step=1, dtype=None):
    if end is None:
        start, end = 0, start
    return jnp.arange(start, end, step, dtype=_dt(dtype))


def _creation_ops():
    return {
        aten.full.default: lambda size, value, dtype=None: _full(size, value, dtype),
        aten.zeros.default: lambda size, dtype=None: _full(size, 0, dtype),
        aten.ones.default: lambda size, dtype=None: _full(size, 1, dtype),
        aten.empty.memory_format: lambda size, dtype=None: _full(size, 0, dtype),
        aten.full_like.default: lambda x, value, dtype=None: jnp.full_like(x, value, _dt(dtype)),
        aten.zeros_like.default: lambda x, dtype=None: jnp.zeros_like(x, _dt(dtype)),
        aten.ones_like.default: lambda x, dtype=None: jnp.ones_like(x, _dt(dtype)),
        aten.empty_like.default: lambda x, dtype=None: jnp.zeros_like(x, _dt(dtype)),
        aten.new_zeros.default: lambda x, size, dtype=None: _full(size, 0, dtype or None),
        aten.new_ones.default: lambda x, size, dtype=None: _full(size, 1, dtype or None),
        aten.new_full.default: lambda x, size, value, dtype=None: _full(size, value, dtype),
        aten.new_empty.default: lambda x, size, dtype=None: _full(size, 0, dtype),
        aten.scalar_tensor.default: lambda s, dtype=None: jnp.asarray(s, _dt(dtype)),
        aten.fill.Scalar: lambda x, value: jnp.full_like(x, value),
        aten.fill.Tensor: lambda x, value: jnp.broadcast_to(
            jnp.asarray(value).astype(jnp.result_type(x)), jnp.shape(x)),
        aten.arange.default: lambda end, dtype=None: _arange(0, end, 1, dtype),
        aten.arange.start: lambda start, end, dtype=None: _arange(start, end, 1, dtype),
        aten.arange.start_step: _arange,
    }


# ----------------------------------------------------------------------------- linear algebra


def _linear_plain(x, w, b=None):
    y = jnp.matmul(x, jnp.swapaxes(w, -1, -2))
    return y if b is None else y + b


def _addmm(bias, a, b, beta=1, alpha=1):
    return _alpha(bias, beta) + _alpha(jnp.matmul(a, b), alpha)


def _matmul_ops():
    return {
        aten.mm.default: jnp.matmul, aten.bmm.default: jnp.matmul,
        aten.matmul.default: jnp.matmul, aten.mv.default: jnp.matmul,
        aten.dot.default: jnp.dot, aten.addmm.default: _addmm, aten.baddbmm.default: _addmm,
        aten.linear.default: _linear_plain,
    }


# ----------------------------------------------------------------------------- pooling


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
    def run(x, kernel_size, stride=(), padding=0, ceil_mode=False, count_include_pad=True,
            divisor_override=None):
        if ceil_mode:
            raise UnsupportedOpError("avg_pool with ceil_mode=True has no JAX lowering in "
                                     "etrace_bridge; use ceil_mode=False")
        padding = [padding] if isinstance(padding, int) else padding
        dims, strides, pads = _pool_args(x, kernel_size, stride, padding, n)
        total = lax.reduce_window(x, jnp.zeros((), x.dtype), lax.add, dims, strides, pads)
        if divisor_override:
            return total / divisor_override
        if count_include_pad:
            return total / math.prod(dims)
        count = lax.reduce_window(jnp.ones_like(x), jnp.zeros((), x.dtype), lax.add, dims,
                                  strides, pads)
        return total / count
    return run


def _max_pool2d(x, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
    if ceil_mode or any(d != 1 for d in np.atleast_1d(dilation)):
        raise UnsupportedOpError("max_pool2d with ceil_mode or dilation has no JAX lowering in "
                                 "etrace_bridge")
    padding = [padding] if isinstance(padding, int) else padding
    dims, strides, pads = _pool_args(x, kernel_size, stride, padding, 2)
    out = lax.reduce_window(x, jnp.array(-jnp.inf, x.dtype), lax.max, dims, strides, pads)
    return out, None


def _pool_ops():
    return {
        aten.avg_pool1d.default: _avg_pool(1), aten.avg_pool2d.default: _avg_pool(2),
        aten.max_pool2d_with_indices.default: _max_pool2d,
    }


# ----------------------------------------------------------------------------- graph plumbing


def _no_op(*args, **kwargs):
    return None


def _plumbing_ops():
    return {
        aten.sym_size.int: lambda x, dim: jnp.shape(x)[dim],
        aten.sym_numel.default: lambda x: int(np.prod(jnp.shape(x))),
        aten._assert_tensor_metadata.default: _no_op,
        aten._assert_scalar.default: _no_op,
        aten.sym_constrain_range_for_size.default: _no_op,
        aten.sym_constrain_range.default: _no_op,
        aten._assert_async.msg: _no_op,
        operator.getitem: operator.getitem,
        torch.sym_max: max, torch.sym_min: min, torch.sym_not: operator.not_,
        torch.sym_float: float, torch.sym_int: int,
    }


def _build_table() -> Mapping[Any, Callable]:
    table = {}
    for part in (_elementwise_ops, _reduction_ops, _shape_ops, _creation_ops, _matmul_ops,
                 _pool_ops, _plumbing_ops):
        table.update(part())
    return types.MappingProxyType(table)


OP_TABLE: Mapping[Any, Callable] = _build_table()


# ----------------------------------------------------------------------------- parameter ops


def _linear(w_is_param, x, w, b=None):
    if w_is_param:
        return etp.matmul(x, w, b, w_layout="oi")
    return _linear_plain(x, w, b)


def _mm(w_is_param, a, b):
    if w_is_param and jnp.ndim(b) == 2:
        return etp.matmul(a, b, w_layout="io")
    return jnp.matmul(a, b)


_CONV_DIMS = {1: ("NCH", "OIH", "NCH"), 2: ("NCHW", "OIHW", "NCHW"),
              3: ("NCDHW", "OIDHW", "NCDHW")}


def _convolution(w_is_param, x, w, b, stride, padding, dilation, transposed, output_padding,
                 groups):
    n = jnp.ndim(w) - 2
    if w_is_param and n in (1, 2):
        return etp.conv(x, w, b, stride=tuple(stride), padding=tuple(padding),
                        dilation=tuple(dilation), groups=groups)
    batched = jnp.ndim(x) == n + 2
    xb = x if batched else x[None]
    y = lax.conv_general_dilated(xb, w, tuple(stride), [(p, p) for p in padding],
                                 rhs_dilation=tuple(dilation), dimension_numbers=_CONV_DIMS[n],
                                 feature_group_count=groups)
    if b is not None:
        y = y + jnp.reshape(b, (-1,) + (1,) * n)
    return y if batched else y[0]


_PARAM_OPS = types.MappingProxyType({
    aten.linear.default: (_linear, 1),
    aten.convolution.default: (_convolution, 1),
    aten.mm.default: (_mm, 1),
})


# ----------------------------------------------------------------------------- interpreter

_SYMBOLIC = (torch.SymInt, torch.SymFloat, torch.SymBool)


def _op_key(target) -> tuple[str, ...]:
    """Names a custom_ops key may use for `target`: 'ns::name' and 'ns::name.overload'."""
    if isinstance(target, torch._ops.OpOverload):
        base = target._schema.name
        return (base, f"{base}.{target._overloadname}")
    return ()


def _custom_table(custom_ops) -> dict[str, Callable]:
    table = {}
    for key, fn in (custom_ops or {}).items():
        if isinstance(key, str):
            name = key
        elif isinstance(key, torch._ops.OpOverload):
            name = f"{key._schema.name}.{key._overloadname}"
        elif isinstance(key, torch._ops.OpOverloadPacket):
            name = key._qualified_op_name
        elif hasattr(key, "_qualname"):
            name = key._qualname
        else:
            raise TypeError(f"custom_ops keys must be 'namespace::name' strings or torch ops, "
                            f"got {key!r}")
        if not callable(fn):
            raise TypeError(f"custom_ops[{name!r}] must be a JAX function, got {fn!r}")
        table[name] = fn
    return table


def _where(node) -> str:
    where = user_frame(node.meta.get("stack_trace"))
    return f" (from {where})" if where else ""


def _unsupported(node) -> UnsupportedOpError:
    name = _op_key(node.target)[0] if _op_key(node.target) else str(node.target)
    kind = "ATen op" if name.startswith("aten::") else "op"
    return UnsupportedOpError(
        f"{kind} `{node.target}`{_where(node)} has no JAX lowering in etrace_bridge. To proceed, "
        f"pass a JAX implementation with `custom_ops={{'{name}': jax_fn}}` (jax_fn takes the "
        "op's arguments as JAX arrays; use jax.custom_vjp for a custom gradient), rewrite that "
        "line with supported tensor operations, or open an issue naming this op.")


class LoweredStep:
    """JAX callable for one exported step: `(params, buffers, *inputs) -> (outputs, new_buffers)`.

    `params` / `buffers` map dotted torch names to arrays; `inputs` mirror the example inputs;
    `outputs` mirror forward's return value; `new_buffers` holds the mutated buffers by name.
    """

    def __init__(self, step: ExportedStep, custom_ops: Mapping | None = None):
        self.step = step
        custom = _custom_table(custom_ops)
        nodes = list(step.graph.nodes)
        self._placeholders = [n for n in nodes if n.op == "placeholder"]
        self._output = next(n for n in nodes if n.op == "output")
        param_nodes = set(step.parameters)
        self._plan = []
        for node in nodes:
            if node.op != "call_function":
                if node.op not in ("placeholder", "output"):
                    raise UnsupportedOpError(f"graph node kind `{node.op}` ({node.target}) is "
                                             "not supported by etrace_bridge; open an issue")
                continue
            self._plan.append((node, *self._handler(node, custom, param_nodes)))
        self._uses_f64 = any(_is_f64(n.meta.get("val")) for n in nodes)

    @staticmethod
    def _handler(node, custom, param_nodes):
        for key in _op_key(node.target):
            if key in custom:
                return custom[key], None
        if node.target is aten.convolution.default and node.args[6]:
            raise UnsupportedOpError(
                f"transposed convolution{_where(node)} has no lowering in etrace_bridge: its "
                "weight cannot be traced online as an ETP conv. Replace nn.ConvTranspose* by "
                "upsampling + Conv, or open an issue.")
        if node.target in _PARAM_OPS:
            fn, w_pos = _PARAM_OPS[node.target]
            w = node.args[w_pos] if len(node.args) > w_pos else None
            is_param = isinstance(w, torch.fx.Node) and w.op == "placeholder" \
                and w.name in param_nodes
            return fn, is_param
        if node.target in OP_TABLE:
            if node.target is aten.max_pool2d_with_indices.default and any(
                    u.args[1] != 0 for u in node.users):
                raise _unsupported(node)
            return OP_TABLE[node.target], None
        if getattr(node.target, "__module__", None) == "_operator":
            return node.target, None
        raise _unsupported(node)

    def __call__(self, params: Mapping, buffers: Mapping, *inputs):
        if self._uses_f64 and not jax.config.read("jax_enable_x64"):
            raise TypeError(
                "this torch model computes in float64 but JAX 64-bit mode is off, so JAX would "
                "silently compute in float32. Enable it with "
                "jax.config.update('jax_enable_x64', True) (after importing brainstate: its "
                "import and brainstate.environ.set(precision=32) switch it off; importing "
                "etrace keeps it), or convert the model and inputs to float32 (model.float()).")
        env = self._bind(params, buffers, inputs)
        for node, fn, flag in self._plan:
            args = torch.fx.node.map_arg(node.args, lambda n: env[n.name])
            kwargs = {k: v for k, v in node.kwargs.items() if k not in _IGNORED_KWARGS}
            kwargs = torch.fx.node.map_arg(kwargs, lambda n: env[n.name])
            try:
                out = fn(*args, **kwargs) if flag is None else fn(flag, *args, **kwargs)
            except UnsupportedOpError:
                raise
            except Exception as err:
                raise RuntimeError(
                    f"lowering of `{node.target}`{_where(node)} failed: "
                    f"{type(err).__name__}: {err}") from err
            env[node.name] = _match_meta(out, node.meta.get("val"), node)
        flat = [env[a.name] if isinstance(a, torch.fx.Node) else a for a in self._output.args[0]]
        outputs = pytree.tree_unflatten([flat[i] for i in self.step.user_outputs],
                                        self.step.out_spec)
        new_buffers = {name: flat[i] for i, name in self.step.buffers_to_mutate.items()}
        return outputs, new_buffers

    def _bind(self, params, buffers, inputs) -> dict:
        leaves = pytree.tree_leaves(inputs)
        step = self.step
        if len(leaves) != len(step.user_inputs):
            raise ValueError(f"the exported step takes {len(step.user_inputs)} input tensors "
                             f"(structure {step.in_spec}), got {len(leaves)}")
        users = dict(zip(step.user_inputs, leaves))
        env = {}
        for node in self._placeholders:
            name = node.name
            if name in users:
                env[name] = jnp.asarray(users[name])
            elif name in step.parameters:
                env[name] = params[step.parameters[name]]
            elif name in step.buffers:
                env[name] = buffers[step.buffers[name]]
            elif name in step.constants:
                env[name] = _constant(step.constants[name])
            else:
                raise KeyError(f"graph input `{name}` has no value")
        return env


def lower(exported_step: ExportedStep, custom_ops: Mapping | None = None) -> LoweredStep:
    """Lower `exported_step` to `fn(params, buffers, *inputs) -> (outputs, new_buffers)`.

    Unsupported ops are reported here, before any tracing, with the model source line.
    `custom_ops` maps 'namespace::name' (or the op object) to a JAX function; it also overrides
    the built-in lowering of an ATen op ('aten::name').
    """
    return LoweredStep(exported_step, custom_ops)


# ----------------------------------------------------------------------------- dtype / shape


def _is_f64(val) -> bool:
    if isinstance(val, torch.Tensor):
        return val.dtype in (torch.float64, torch.complex128)
    if isinstance(val, (list, tuple)):
        return any(_is_f64(v) for v in val)
    return False


def _constant(t: torch.Tensor):
    t = t.detach()
    if t.dtype == torch.int64 and not jax.config.read("jax_enable_x64"):
        t = t.to(torch.int32)
    return jnp.asarray(t.cpu().numpy())


def _match_meta(out, val, node):
    """Cast `out` to the dtype torch recorded for the node and check static shapes."""
    if isinstance(val, torch.Tensor):
        if out is None:
            return out
        out = jnp.asarray(out)
        dtype = jax_dtype(val.dtype)
        if out.dtype != dtype:
            out = out.astype(dtype)
        expect = tuple(val.shape)
        if len(expect) != out.ndim or any(
                not isinstance(e, _SYMBOLIC) and e != s for e, s in zip(expect, out.shape)):
            raise RuntimeError(
                f"lowering of `{node.target}` produced shape {tuple(out.shape)} where torch "
                f"expects {expect}; please open an issue with this model")
        return out
    if isinstance(val, (list, tuple)) and isinstance(out, (list, tuple)) and len(val) == len(out):
        return type(out)(_match_meta(o, v, node) for o, v in zip(out, val))
    return out
