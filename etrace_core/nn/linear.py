"""Fully connected layer on the ``etp_matmul`` primitive."""
from typing import Optional

import brainstate

from etrace_core import ops

from .init import Initializer, Key, fan_in_uniform, make_param, resolve_dtype, split_key

__all__ = ['Linear']


class Linear(brainstate.nn.Module):
    """``y = x @ weight + bias`` with ``weight`` of shape ``(in_size, out_size)`` ('io' layout).

    The product goes through :func:`etrace_core.ops.matmul`, which is how the online-learning
    compiler recognises ``weight`` (and ``bias``) as trainable ETP weights. Inputs are ``(in_size,)``
    or ``(..., in_size)``. Defaults follow torch: both tensors ~ U(-1/sqrt(in), 1/sqrt(in)).
    """

    def __init__(self, in_size: int, out_size: int, *, bias: bool = True,
                 w_init: Optional[Initializer] = None, b_init: Optional[Initializer] = None,
                 dtype=None, key: Key = None, name: Optional[str] = None):
        super().__init__(name=name)
        self.in_size = in_size
        self.out_size = out_size
        dtype = resolve_dtype(dtype)
        w_key, b_key = split_key(key, 2)
        default = fan_in_uniform(in_size)
        self.weight = make_param(w_init, (in_size, out_size), dtype, w_key, default)
        self.bias = make_param(b_init, (out_size,), dtype, b_key, default) if bias else None

    def update(self, x):
        bias = None if self.bias is None else self.bias.value
        return ops.matmul(x, self.weight.value, bias)
