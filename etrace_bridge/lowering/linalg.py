"""Matmul and convolution ops; the ones that take a weight argument route parameters to ETP ops.

A 2-D parameter used as a matrix by `linear`, `mm`, `bmm`, `matmul`, `mv`, `addmm` or `baddbmm`
-- on either side, directly or through a transpose/reshape/slice/broadcast view of it (see
`param_views`) -- runs through `etrace_core.ops.matmul`; a parameter that is the kernel of a
1-D/2-D `convolution` through `etrace_core.ops.conv`. The online compiler then sees it as a
traced weight. Each record's `param_fn(view, position)` decides at lowering time.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import torch
from jax import lax

from etrace_core import ops as etp

from .common import scaled
from .param_views import matrix_use
from .record import OpRecord

aten = torch.ops.aten

_CONV_DIMS = {1: ("NCH", "OIH", "NCH"), 2: ("NCHW", "OIHW", "NCHW"), 3: ("NCDHW", "OIDHW", "NCDHW")}


def _linear(x, w, b=None):
    y = jnp.matmul(x, jnp.swapaxes(w, -1, -2))
    return y if b is None else y + b


def _addmm(bias, a, b, beta=1, alpha=1):
    return scaled(bias, beta) + scaled(jnp.matmul(a, b), alpha)


def _convolution(x, w, b, stride, padding, dilation, transposed, output_padding, groups):
    n = jnp.ndim(w) - 2
    batched = jnp.ndim(x) == n + 2
    xb = x if batched else x[None]
    y = lax.conv_general_dilated(
        xb,
        w,
        tuple(stride),
        [(p, p) for p in padding],
        rhs_dilation=tuple(dilation),
        dimension_numbers=_CONV_DIMS[n],
        feature_group_count=groups,
    )
    if b is not None:
        y = y + jnp.reshape(b, (-1,) + (1,) * n)
    return y if batched else y[0]


def _convolution_etp(x, w, b, stride, padding, dilation, transposed, output_padding, groups):
    return etp.conv(
        x,
        w,
        b,
        stride=tuple(stride),
        padding=tuple(padding),
        dilation=tuple(dilation),
        groups=groups,
    )


def _conv_param(view, position):
    """The kernel itself (not a view of it) of a 1-D/2-D convolution."""
    whole = view.index.shape == view.param_shape and np.array_equal(
        view.index.reshape(-1), np.arange(view.index.size)
    )
    return _convolution_etp if whole and len(view.param_shape) - 2 in (1, 2) else None


# -- matmuls with a parameter: `mat(a, b)` computes `a @ b` with the parameter at `position`


def _swap(a):
    return jnp.swapaxes(a, -1, -2) if jnp.ndim(a) >= 2 else a


def _matrix(view, position, left: int = 0, right: int = 1):
    """`mat(a, b, bias=None)` = `a @ b (+ bias)` as an ETP matmul, or None if `view` (the
    argument at `position`) is not a matrix use of a parameter."""
    if position == right:
        use = matrix_use(view)
        if use is None:
            return None
        lead = view.index.shape[:-2]

        def mat(a, w, bias=None):
            y = use.apply(a, w, bias)
            if lead and jnp.ndim(y) < len(lead) + 2:  # the batch of matmuls comes from w alone
                y = jnp.broadcast_to(y, lead + jnp.shape(y)[-2:])
            return y

        return mat
    if position == left:
        use = matrix_use(view, transpose=True)  # W @ b = (b^T @ W^T)^T
        if use is None:
            return None
        lead = view.index.shape[:-2]

        def mat(w, b, bias=None):
            y = _swap(use.apply(_swap(b), w))
            if lead and jnp.ndim(y) < len(lead) + 2:
                y = jnp.broadcast_to(y, lead + jnp.shape(y)[-2:])
            return y if bias is None else y + bias

        return mat
    return None


def _linear_param(view, position):
    use = matrix_use(view, transpose=True) if view.index.ndim == 2 else None
    return None if use is None else (lambda x, w, b=None: use.apply(x, w, b))


def _mm_param(view, position):
    return _matrix(view, position)


def _addmm_param(view, position):
    mat = _matrix(view, position, left=1, right=2)
    if mat is None:
        return None

    def fn(bias, a, b, beta=1, alpha=1):
        if beta == 1 and alpha == 1:
            return mat(a, b, bias)
        return scaled(bias, beta) + scaled(mat(a, b), alpha)

    return fn


def _check_convolution(node):
    if node.args[6]:
        return (
            "transposed convolution has no lowering: its weight cannot be traced online as "
            "an ETP conv. Replace nn.ConvTranspose* by upsampling + Conv"
        )
    return None


OPS = {
    aten.linear.default: OpRecord(_linear, weight=1, param_fn=_linear_param),
    aten.mm.default: OpRecord(jnp.matmul, weight=(1, 0), param_fn=_mm_param),
    aten.convolution.default: OpRecord(
        _convolution, weight=1, param_fn=_conv_param, check=_check_convolution
    ),
    aten.bmm.default: OpRecord(jnp.matmul, weight=(1, 0), param_fn=_mm_param),
    aten.matmul.default: OpRecord(jnp.matmul, weight=(1, 0), param_fn=_mm_param),
    aten.mv.default: OpRecord(jnp.matmul, weight=(0,), param_fn=_mm_param),
    aten.dot.default: OpRecord(jnp.dot),
    aten.addmm.default: OpRecord(_addmm, weight=(2, 1), param_fn=_addmm_param),
    aten.baddbmm.default: OpRecord(_addmm, weight=(2, 1), param_fn=_addmm_param),
}
