"""Leaky integrate-and-fire layer with optional threshold adaptation and recurrence."""

import math
from collections.abc import Callable
from typing import Optional

import jax

from . import surrogate
from .base import RecurrentModule
from .init import Initializer, Key, split_key
from .linear import Linear

__all__ = ["LIF"]


class LIF(RecurrentModule):
    """A layer of (adaptive) LIF neurons driven through ``W_in = Linear(n_in, n_out, bias=False)``.

    States ``V`` (membrane) and ``a`` (adaptation), shape ``(n_out,)`` or ``(B, n_out)``.
    With ``alpha = exp(-dt/tau_mem)``, ``rho = exp(-dt/tau_adapt)`` and
    ``s = spike_fn((V - threshold - beta*a) / threshold)`` the spike of the previous state, one
    step is::

        I  = x @ W_in  [+ s @ W_rec  when recurrent]
        V' = alpha * V + (1 - alpha) * I - threshold * s        (s detached when detach_reset)
        a' = rho * a + s
        return spike_fn((V' - threshold - beta*a') / threshold)

    ``beta = 0`` disables adaptation. Without ``recurrent`` the ``(V, a)`` update is element-wise
    per neuron, the structure the online algorithms rely on for exact diagonal traces.
    """

    state_names = ("V", "a")

    def __init__(
        self,
        n_in: int,
        n_out: int,
        *,
        tau_mem: float = 20.0,
        tau_adapt: float = 100.0,
        beta: float = 0.0,
        threshold: float = 1.0,
        dt: float = 1.0,
        recurrent: bool = False,
        detach_reset: bool = False,
        spike_fn: Callable = surrogate.spike_fn,
        w_init: Optional[Initializer] = None,
        w_rec_init: Optional[Initializer] = None,
        dtype=None,
        key: Key = None,
        name: Optional[str] = None,
    ):
        super().__init__((n_out,), dtype, name=name)
        self.n_in, self.n_out = n_in, n_out
        self.in_size, self.out_size = n_in, n_out
        self.tau_mem, self.tau_adapt, self.dt = tau_mem, tau_adapt, dt
        self.alpha = math.exp(-dt / tau_mem)
        self.rho = math.exp(-dt / tau_adapt)
        self.beta = beta
        self.threshold = threshold
        self.detach_reset = detach_reset
        self.spike_fn = spike_fn
        k_in, k_rec = split_key(key, 2)
        self.W_in = Linear(n_in, n_out, bias=False, w_init=w_init, dtype=self.dtype, key=k_in)
        self.W_rec = (
            Linear(n_out, n_out, bias=False, w_init=w_rec_init, dtype=self.dtype, key=k_rec)
            if recurrent
            else None
        )

    @property
    def recurrent(self) -> bool:
        return self.W_rec is not None

    def spike(self, V, a):
        """The spike emitted by state ``(V, a)``."""
        return self.spike_fn((V - self.threshold - self.beta * a) / self.threshold)

    def update(self, x):
        V, a = self.V.value, self.a.value
        s = self.spike(V, a)
        current = self.W_in(x)
        if self.W_rec is not None:
            current = current + self.W_rec(s)
        reset = jax.lax.stop_gradient(s) if self.detach_reset else s
        V = self.alpha * V + (1.0 - self.alpha) * current - self.threshold * reset
        a = self.rho * a + s
        self.V.value = V
        self.a.value = a
        return self.spike(V, a)
