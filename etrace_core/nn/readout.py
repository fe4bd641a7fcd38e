"""Leaky rate readout: a low-pass filtered linear map of its input."""

from typing import Optional

from .base import RecurrentModule
from .init import DEFAULT, Initializer, Key, decay_factor, feature_size
from .linear import Linear

__all__ = ["LeakyRateReadout"]


class LeakyRateReadout(RecurrentModule):
    """``r' = d * r + (1 - d) * (x @ W)``, ``d = exp(-dt / tau)``, ``W = Linear(.., bias=False)``.

    ``tau`` (and ``dt``) may carry time units, e.g. ``tau=5 * u.ms`` with ``dt`` from
    ``brainstate.environ`` (default ``dt``: 1.0 for a plain ``tau``). ``r_init`` fills ``r``.

    State ``r`` of shape ``(out_size,)`` or ``(B, out_size)``; returns ``r'``. Smooths spike trains
    into a rate output; the update is element-wise per output unit.
    """

    state_names = ("r",)

    def __init__(
        self,
        in_size,
        out_size,
        tau=5.0,
        w_init: Optional[Initializer] = DEFAULT,
        r_init: Optional[Initializer] = None,
        *,
        dt=None,
        dtype=None,
        key: Key = None,
        name: Optional[str] = None,
    ):
        n_in, n_out = feature_size(in_size, "in_size"), feature_size(out_size, "out_size")
        super().__init__((n_out,), dtype, name=name, state_init=r_init)
        self.in_size, self.out_size = (n_in,), (n_out,)
        self.tau, self.dt = tau, dt
        self.decay = decay_factor(dt, tau)
        self.W = Linear(n_in, n_out, w_init, bias=False, dtype=self.dtype, key=key)

    def update(self, x):
        r = self.decay * self.r.value + (1.0 - self.decay) * self.W(x)
        self.r.value = r
        return r
