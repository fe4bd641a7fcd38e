"""Fully connected layer on the ``etp_matmul`` primitive."""

from typing import Optional

import brainstate
import jax.numpy as jnp

from etrace_core import ops

from .init import (
    DEFAULT,
    Initializer,
    Key,
    fan_in_uniform,
    feature_size,
    make_param,
    resolve_dtype,
    split_key,
)

__all__ = ["Linear"]


class Linear(brainstate.nn.Module):
    """``y = x @ weight + bias`` with ``weight`` of shape ``(in_size, out_size)`` ('io' layout).

    The product goes through :func:`etrace_core.ops.matmul`, which is how the online-learning
    compiler recognises ``weight`` (and ``bias``) as trainable ETP weights. Inputs are
    ``(in_size,)`` or ``(..., in_size)``. Defaults follow torch: both tensors
    ~ U(-1/sqrt(in), 1/sqrt(in)).

    Constructor forms of braintrace/brainstate work too: ``Linear(in_size, out_size, w_init,
    b_init, w_mask)`` positionally or by keyword, sizes as ints or tuples (the last entry counts
    the features), ``b_init=None`` for no bias, any ``init(shape)`` initialiser (braintools').
    ``w_mask`` (broadcastable to the weight, or a callable giving it from the weight's shape)
    multiplies the weight inside the ETP op
    (``weight_fn``), so masked-out entries get zero gradient and ``weight`` stays the trained
    parameter.
    """

    def __init__(
        self,
        in_size,
        out_size,
        w_init: Optional[Initializer] = DEFAULT,
        b_init: Optional[Initializer] = DEFAULT,
        w_mask=None,
        *,
        bias: bool = True,
        dtype=None,
        key: Key = None,
        name: Optional[str] = None,
    ):
        super().__init__(name=name)
        n_in, n_out = feature_size(in_size, "in_size"), feature_size(out_size, "out_size")
        self.in_size = tuple(in_size) if isinstance(in_size, (tuple, list)) else (n_in,)
        self.out_size = tuple(out_size) if isinstance(out_size, (tuple, list)) else (n_out,)
        dtype = resolve_dtype(dtype)
        w_key, b_key = split_key(key, 2)
        default = fan_in_uniform(n_in)
        self.weight = make_param(w_init, (n_in, n_out), dtype, w_key, default)
        has_bias = bias and b_init is not None
        self.bias = make_param(b_init, (n_out,), dtype, b_key, default) if has_bias else None
        if callable(w_mask):  # brainstate: a mask initialiser, called with the weight's shape
            w_mask = w_mask((n_in, n_out))
        self.w_mask = (
            None if w_mask is None else jnp.broadcast_to(jnp.asarray(w_mask), (n_in, n_out))
        )
        # one function object per layer: the op's static parameter stays the same across calls
        self._masked = None if w_mask is None else WeightMask(self.w_mask)

    def update(self, x):
        bias = None if self.bias is None else self.bias.value
        return ops.matmul(x, self.weight.value, bias, weight_fn=self._masked)


class WeightMask:
    """``w -> w * mask`` (the weight function of a masked Linear)."""

    def __init__(self, mask):
        self.mask = mask

    def __call__(self, w):
        return w * self.mask
