"""ETP grouped (block-diagonal) matmul ``y[..., g, :] = x[..., g, :] @ w[g] + b[g]``.

It is the dense ``etp_matmul`` of the flattened groups, ``x (..., G*I) @ blockdiag(w)
(G*I, G*O)``, with the block-diagonal placement as the weight function: the compiler follows
the two reshapes (relabellings), the trace lives in the dense ``(G*I, G*O)`` canonical space
and ``io_to_params`` reads the diagonal blocks back (exact). The price is a trace ``G`` times
the size of the blocks.
"""

from __future__ import annotations

import brainunit as u
import jax.numpy as jnp
import numpy as np

from etrace_core.ops.elementwise import ElementFn
from etrace_core.ops.matmul import bind_matmul

__all__ = ["grouped_matmul", "BlockDiagonal"]


class BlockDiagonal(ElementFn):
    """``w (G, I, O) -> blockdiag(fn(w[0]), ..., fn(w[G-1]))`` of shape ``(G*I, G*O)``."""

    __slots__ = ("groups", "elem_fn")

    def __init__(self, groups: int, elem_fn=None):
        self.groups = int(groups)
        self.elem_fn = elem_fn
        super().__init__(self._dense)

    def _dense(self, w):
        v = w if self.elem_fn is None else self.elem_fn(w)
        g, i, o = v.shape
        eye = jnp.eye(g, dtype=v.dtype)
        return jnp.einsum("gio,gh->giho", v, eye).reshape(g * i, g * o)

    def __eq__(self, other):
        return (
            isinstance(other, BlockDiagonal)
            and other.groups == self.groups
            and other.elem_fn is self.elem_fn
        )

    def __hash__(self):
        return hash((self.groups, id(self.elem_fn)))

    def __repr__(self):
        return f"blockdiag[{self.groups}]"


def grouped_matmul(x, weight, bias=None, *, weight_fn=None, bias_fn=None):
    """``x (..., G, I) @ weight (G, I, O) + bias (G, O)`` per group ``g``: ``(..., G, O)``.

    braintrace's signature; any number of leading axes (also none). ``weight_fn`` acts
    element-wise on ``weight``; ``bias_fn`` is not supported (pass ``bias=bias_fn(b)``: the
    bias then gets its exact gradient through autodiff, untraced).
    """
    if bias_fn is not None:
        from etrace_core.compiler.errors import NotSupportedError  # (compiler imports ops)

        raise NotSupportedError(
            "grouped_matmul(bias_fn=...) is not supported by etrace; pass bias=bias_fn(b)"
        )
    if weight_fn is not None and not callable(weight_fn):
        raise ValueError(f"grouped_matmul: weight_fn must be callable, got {weight_fn!r}")
    w_shape = tuple(np.shape(u.get_mantissa(weight)))
    if len(w_shape) != 3:
        raise ValueError(f"grouped_matmul: weight must have shape (groups, in, out), got {w_shape}")
    g, i, o = w_shape
    x_shape = tuple(np.shape(u.get_mantissa(x)))
    if len(x_shape) < 2 or x_shape[-2:] != (g, i):
        raise ValueError(
            f"grouped_matmul: x must have shape (..., groups, in) = (..., {g}, {i}) for "
            f"weight of shape {w_shape}, got {x_shape}"
        )
    if bias is not None and tuple(np.shape(u.get_mantissa(bias))) != (g, o):
        raise ValueError(
            f"grouped_matmul: bias must have shape (groups, out) = ({g}, {o}), got "
            f"{tuple(np.shape(u.get_mantissa(bias)))}"
        )
    flat = u.math.reshape(x, x_shape[:-2] + (g * i,))
    y = bind_matmul(flat, weight, bias, "io", BlockDiagonal(g, weight_fn), flat_bias=True)
    return u.math.reshape(y, x_shape[:-2] + (g, o))
