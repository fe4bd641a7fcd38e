"""Leaky rate readout: a low-pass filtered linear map of its input."""
import math
from typing import Optional

from .base import RecurrentModule
from .init import Initializer, Key
from .linear import Linear

__all__ = ['LeakyRateReadout']


class LeakyRateReadout(RecurrentModule):
    """``r' = d * r + (1 - d) * (x @ W)`` with ``d = exp(-dt / tau)`` and ``W = Linear(.., bias=False)``.

    State ``r`` of shape ``(out_size,)`` or ``(B, out_size)``; returns ``r'``. Smooths spike trains
    into a rate output; the update is element-wise per output unit.
    """

    state_names = ('r',)

    def __init__(self, in_size: int, out_size: int, *, tau: float = 5.0, dt: float = 1.0,
                 w_init: Optional[Initializer] = None, dtype=None, key: Key = None,
                 name: Optional[str] = None):
        super().__init__((out_size,), dtype, name=name)
        self.in_size, self.out_size = in_size, out_size
        self.tau, self.dt = tau, dt
        self.decay = math.exp(-dt / tau)
        self.W = Linear(in_size, out_size, bias=False, w_init=w_init, dtype=self.dtype, key=key)

    def update(self, x):
        r = self.decay * self.r.value + (1. - self.decay) * self.W(x)
        self.r.value = r
        return r
