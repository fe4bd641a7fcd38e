"""Element-wise ATen ops: unary math, binary arithmetic, comparisons, activations, where."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import torch
from jax import lax

from .common import scaled
from .record import plain

aten = torch.ops.aten


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
        aten.neg.default: jnp.negative,
        aten.exp.default: jnp.exp,
        aten.expm1.default: jnp.expm1,
        aten.exp2.default: jnp.exp2,
        aten.log.default: jnp.log,
        aten.log1p.default: jnp.log1p,
        aten.log2.default: jnp.log2,
        aten.log10.default: jnp.log10,
        aten.tanh.default: jnp.tanh,
        aten.sigmoid.default: jax.nn.sigmoid,
        aten.abs.default: jnp.abs,
        aten.sqrt.default: jnp.sqrt,
        aten.rsqrt.default: lax.rsqrt,
        aten.reciprocal.default: jnp.reciprocal,
        aten.sign.default: jnp.sign,
        aten.sgn.default: jnp.sign,
        aten.sin.default: jnp.sin,
        aten.cos.default: jnp.cos,
        aten.tan.default: jnp.tan,
        aten.asin.default: jnp.arcsin,
        aten.acos.default: jnp.arccos,
        aten.atan.default: jnp.arctan,
        aten.sinh.default: jnp.sinh,
        aten.cosh.default: jnp.cosh,
        aten.asinh.default: jnp.arcsinh,
        aten.acosh.default: jnp.arccosh,
        aten.atanh.default: jnp.arctanh,
        aten.floor.default: jnp.floor,
        aten.ceil.default: jnp.ceil,
        aten.round.default: jnp.round,
        aten.trunc.default: jnp.trunc,
        aten.erf.default: jax.scipy.special.erf,
        aten.erfc.default: jax.scipy.special.erfc,
        aten.erfinv.default: jax.scipy.special.erfinv,
        aten.logical_not.default: jnp.logical_not,
        aten.bitwise_not.default: jnp.invert,
        aten.isnan.default: jnp.isnan,
        aten.isinf.default: jnp.isinf,
        aten.isfinite.default: jnp.isfinite,
        aten.relu.default: lambda x: jnp.maximum(x, 0),
        aten.silu.default: jax.nn.silu,
        aten.mish.default: lambda x: x * jnp.tanh(_softplus(x)),
        aten.hardsigmoid.default: lambda x: jnp.clip(x + 3, 0, 6) / 6,
        aten.hardswish.default: lambda x: x * jnp.clip(x + 3, 0, 6) / 6,
    }
    binary = {
        aten.mul.Tensor: jnp.multiply,
        aten.mul.Scalar: jnp.multiply,
        aten.div.Tensor: jnp.true_divide,
        aten.div.Scalar: jnp.true_divide,
        aten.pow.Tensor_Scalar: jnp.power,
        aten.pow.Tensor_Tensor: jnp.power,
        aten.pow.Scalar: jnp.power,
        aten.maximum.default: jnp.maximum,
        aten.minimum.default: jnp.minimum,
        aten.fmax.default: jnp.fmax,
        aten.fmin.default: jnp.fmin,
        aten.atan2.default: jnp.arctan2,
        aten.remainder.Tensor: jnp.remainder,
        aten.remainder.Scalar: jnp.remainder,
        aten.fmod.Tensor: jnp.fmod,
        aten.fmod.Scalar: jnp.fmod,
        aten.floor_divide.default: jnp.floor_divide,
        aten.logical_and.default: jnp.logical_and,
        aten.logical_or.default: jnp.logical_or,
        aten.logical_xor.default: jnp.logical_xor,
        aten.bitwise_and.Tensor: jnp.bitwise_and,
        aten.bitwise_or.Tensor: jnp.bitwise_or,
        aten.bitwise_xor.Tensor: jnp.bitwise_xor,
        aten.eq.Tensor: jnp.equal,
        aten.eq.Scalar: jnp.equal,
        aten.ne.Tensor: jnp.not_equal,
        aten.ne.Scalar: jnp.not_equal,
        aten.gt.Tensor: jnp.greater,
        aten.gt.Scalar: jnp.greater,
        aten.ge.Tensor: jnp.greater_equal,
        aten.ge.Scalar: jnp.greater_equal,
        aten.lt.Tensor: jnp.less,
        aten.lt.Scalar: jnp.less,
        aten.le.Tensor: jnp.less_equal,
        aten.le.Scalar: jnp.less_equal,
    }
    table = {op: (lambda f: lambda x: f(x))(f) for op, f in unary.items()}
    table.update({op: (lambda f: lambda a, b: f(a, b))(f) for op, f in binary.items()})
    table.update(
        {
            aten.add.Tensor: lambda a, b, alpha=1: a + scaled(b, alpha),
            aten.add.Scalar: lambda a, b, alpha=1: a + scaled(b, alpha),
            aten.sub.Tensor: lambda a, b, alpha=1: a - scaled(b, alpha),
            aten.sub.Scalar: lambda a, b, alpha=1: a - scaled(b, alpha),
            aten.rsub.Tensor: lambda a, b, alpha=1: b - scaled(a, alpha),
            aten.rsub.Scalar: lambda a, b, alpha=1: b - scaled(a, alpha),
            aten.div.Tensor_mode: _div_mode,
            aten.div.Scalar_mode: _div_mode,
            aten.gelu.default: lambda x, approximate="none": jax.nn.gelu(
                x, approximate=approximate == "tanh"
            ),
            aten.leaky_relu.default: lambda x, negative_slope=0.01: jnp.where(
                x > 0, x, x * negative_slope
            ),
            aten.elu.default: _elu,
            aten.softplus.default: _softplus,
            aten.hardtanh.default: lambda x, min_val=-1.0, max_val=1.0: jnp.clip(
                x, min_val, max_val
            ),
            aten.clamp.default: _clamp,
            aten.clamp.Tensor: _clamp,
            aten.clamp_min.default: lambda x, m: jnp.maximum(x, m),
            aten.clamp_max.default: lambda x, m: jnp.minimum(x, m),
            aten.where.self: jnp.where,
            aten.where.ScalarSelf: jnp.where,
            aten.where.ScalarOther: jnp.where,
            aten.where.Scalar: jnp.where,
            aten.masked_fill.Scalar: lambda x, mask, v: jnp.where(mask, v, x),
            aten.masked_fill.Tensor: lambda x, mask, v: jnp.where(mask, v, x),
            aten.lerp.Scalar: lambda a, b, w: a + w * (b - a),
            aten.lerp.Tensor: lambda a, b, w: a + w * (b - a),
        }
    )
    return table


OPS = plain(_elementwise_ops())
