"""Matmul and convolution ops; the ones that take a weight argument route parameters to ETP ops.

A parameter that reaches `aten.linear`, `aten.mm` (right operand) or `aten.convolution` goes
through `etrace_core.ops.matmul` / `conv`, so the online compiler sees it as a traced weight.
"""
from __future__ import annotations

import jax.numpy as jnp
import torch
from jax import lax

from etrace_core import ops as etp

from .common import scaled
from .record import OpRecord

aten = torch.ops.aten

_CONV_DIMS = {1: ("NCH", "OIH", "NCH"), 2: ("NCHW", "OIHW", "NCHW"),
              3: ("NCDHW", "OIDHW", "NCDHW")}


def _linear(x, w, b=None):
    y = jnp.matmul(x, jnp.swapaxes(w, -1, -2))
    return y if b is None else y + b


def _linear_etp(x, w, b=None):
    return etp.matmul(x, w, b, w_layout="oi")


def _mm_etp(a, b):
    if jnp.ndim(b) == 2:
        return etp.matmul(a, b, w_layout="io")
    return jnp.matmul(a, b)


def _addmm(bias, a, b, beta=1, alpha=1):
    return scaled(bias, beta) + scaled(jnp.matmul(a, b), alpha)


def _convolution(x, w, b, stride, padding, dilation, transposed, output_padding, groups):
    n = jnp.ndim(w) - 2
    batched = jnp.ndim(x) == n + 2
    xb = x if batched else x[None]
    y = lax.conv_general_dilated(xb, w, tuple(stride), [(p, p) for p in padding],
                                 rhs_dilation=tuple(dilation), dimension_numbers=_CONV_DIMS[n],
                                 feature_group_count=groups)
    if b is not None:
        y = y + jnp.reshape(b, (-1,) + (1,) * n)
    return y if batched else y[0]


def _convolution_etp(x, w, b, stride, padding, dilation, transposed, output_padding, groups):
    if jnp.ndim(w) - 2 in (1, 2):
        return etp.conv(x, w, b, stride=tuple(stride), padding=tuple(padding),
                        dilation=tuple(dilation), groups=groups)
    return _convolution(x, w, b, stride, padding, dilation, transposed, output_padding, groups)


def _check_convolution(node):
    if node.args[6]:
        return ("transposed convolution has no lowering: its weight cannot be traced online as "
                "an ETP conv. Replace nn.ConvTranspose* by upsampling + Conv")
    return None


OPS = {
    aten.linear.default: OpRecord(_linear, weight=1, param_fn=_linear_etp),
    aten.mm.default: OpRecord(jnp.matmul, weight=1, param_fn=_mm_etp),
    aten.convolution.default: OpRecord(_convolution, weight=1, param_fn=_convolution_etp,
                                       check=_check_convolution),
    aten.bmm.default: OpRecord(jnp.matmul),
    aten.matmul.default: OpRecord(jnp.matmul),
    aten.mv.default: OpRecord(jnp.matmul),
    aten.dot.default: OpRecord(jnp.dot),
    aten.addmm.default: OpRecord(_addmm),
    aten.baddbmm.default: OpRecord(_addmm),
}
