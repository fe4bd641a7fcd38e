"""Recurrent rate cells: vanilla (Elman), GRU and LSTM as in torch, and a leaky integrator.

Each cell keeps its input and recurrent weights in ``Linear`` sub-layers (``W_ih``, ``W_hh``),
so every weight reaches the hidden state through an ETP matmul. GRU and LSTM fuse their gates
into one weight per side, in torch's gate order, so torch weights copy in as
``W_ih.weight = weight_ih.T`` and ``W_hh.weight = weight_hh.T``.

Constructors also take braintrace's forms: ``in_size``/``out_size`` (ints or tuples) by keyword,
``w_init``/``b_init``/``state_init`` positionally in braintrace's order (vanilla:
``state_init, w_init, b_init``; GRU/LSTM: ``w_init, b_init, state_init``), then ``activation``;
any ``init(shape)`` initialiser (braintools' too); ``b_init=None`` for no bias.
"""

from collections.abc import Callable
from typing import Optional

import jax
import jax.numpy as jnp

from .activations import get_activation
from .base import RecurrentModule
from .init import DEFAULT, Initializer, Key, decay_factor, fan_in_uniform, feature_size, split_key
from .linear import Linear

__all__ = ["VanillaRNNCell", "ValinaRNNCell", "GRUCell", "LSTMCell", "LeakyRNNCell"]


def _torch_rnn_init(num_out: int) -> Initializer:
    """torch's RNN default: every weight and bias ~ U(-1/sqrt(hidden), 1/sqrt(hidden))."""
    return fan_in_uniform(num_out)


class VanillaRNNCell(RecurrentModule):
    """Elman cell ``h' = act(x @ W_ih + b + h @ W_hh)``; state ``h``, returns ``h'``.

    ``W_ih = Linear(num_in, num_out)`` carries the single bias (torch's ``b_ih + b_hh``);
    ``W_hh = Linear(num_out, num_out, bias=False)``.
    """

    state_names = ("h",)

    def __init__(
        self,
        in_size,
        out_size,
        state_init: Optional[Initializer] = None,
        w_init: Optional[Initializer] = DEFAULT,
        b_init: Optional[Initializer] = DEFAULT,
        activation: str | Callable = "tanh",
        *,
        dtype=None,
        key: Key = None,
        name: Optional[str] = None,
    ):
        num_in, num_out = _sizes(self, in_size, out_size)
        super().__init__((num_out,), dtype, name=name, state_init=state_init)
        _set_sizes(self, in_size, out_size)
        self.activation = get_activation(activation)
        w_init = _torch_rnn_init(num_out) if w_init is DEFAULT else w_init
        b_init = _torch_rnn_init(num_out) if b_init is DEFAULT else b_init
        k_ih, k_hh = split_key(key, 2)
        self.W_ih = Linear(
            num_in, num_out, w_init=w_init, b_init=b_init, dtype=self.dtype, key=k_ih
        )
        self.W_hh = Linear(num_out, num_out, bias=False, w_init=w_init, dtype=self.dtype, key=k_hh)

    def update(self, x):
        h = self.activation(self.W_ih(x) + self.W_hh(self.h.value))
        self.h.value = h
        return h


ValinaRNNCell = VanillaRNNCell


def _sizes(cell, in_size, out_size):
    return feature_size(in_size, "in_size"), feature_size(out_size, "out_size")


def _set_sizes(cell, in_size, out_size) -> None:
    """``num_in``/``num_out`` as ints, ``in_size``/``out_size`` as tuples (brainstate's form)."""
    cell.num_in, cell.num_out = _sizes(cell, in_size, out_size)
    cell.in_size, cell.out_size = (cell.num_in,), (cell.num_out,)


def _add_fused_gates(cell, in_size, out_size, n_gates, w_init, b_init, key) -> None:
    """torch-style fused gate weights: `W_ih (num_in, n_gates*H)`, `W_hh (H, n_gates*H)`, biased."""
    _set_sizes(cell, in_size, out_size)
    num_in, num_out = cell.num_in, cell.num_out
    w_init = _torch_rnn_init(num_out) if w_init is DEFAULT else w_init
    b_init = _torch_rnn_init(num_out) if b_init is DEFAULT else b_init
    k_ih, k_hh = split_key(key, 2)
    cell.W_ih = Linear(
        num_in, n_gates * num_out, w_init=w_init, b_init=b_init, dtype=cell.dtype, key=k_ih
    )
    cell.W_hh = Linear(
        num_out, n_gates * num_out, w_init=w_init, b_init=b_init, dtype=cell.dtype, key=k_hh
    )


class GRUCell(RecurrentModule):
    """GRU cell exactly as torch's ``nn.GRUCell``; state ``h``, returns ``h'``.

    With fused weights ``W_ih: (num_in, 3H)`` and ``W_hh: (H, 3H)`` (both biased), gates in
    torch order (r, z, n)::

        r = sigmoid(gi_r + gh_r),  z = sigmoid(gi_z + gh_z),  n = act(gi_n + r * gh_n)
        h' = (1 - z) * n + z * h

    ``act`` is ``activation`` (default tanh, torch's).
    """

    state_names = ("h",)

    def __init__(
        self,
        in_size,
        out_size,
        w_init: Optional[Initializer] = DEFAULT,
        b_init: Optional[Initializer] = DEFAULT,
        state_init: Optional[Initializer] = None,
        activation: str | Callable = "tanh",
        *,
        dtype=None,
        key: Key = None,
        name: Optional[str] = None,
    ):
        super().__init__(
            (feature_size(out_size, "out_size"),), dtype, name=name, state_init=state_init
        )
        self.activation = get_activation(activation)
        _add_fused_gates(self, in_size, out_size, 3, w_init, b_init, key)

    def update(self, x):
        h = self.h.value
        gi_r, gi_z, gi_n = jnp.split(self.W_ih(x), 3, axis=-1)
        gh_r, gh_z, gh_n = jnp.split(self.W_hh(h), 3, axis=-1)
        r = jax.nn.sigmoid(gi_r + gh_r)
        z = jax.nn.sigmoid(gi_z + gh_z)
        n = self.activation(gi_n + r * gh_n)
        h = (1.0 - z) * n + z * h
        self.h.value = h
        return h


class LSTMCell(RecurrentModule):
    """LSTM cell exactly as torch's ``nn.LSTMCell``; states ``h`` and ``c``, returns ``h'``.

    With fused weights ``W_ih: (num_in, 4H)`` and ``W_hh: (H, 4H)`` (both biased), gates in
    torch order (i, f, g, o)::

        c' = sigmoid(f) * c + sigmoid(i) * act(g),  h' = sigmoid(o) * act(c')

    ``act`` is ``activation`` (default tanh, torch's).
    """

    state_names = ("h", "c")

    def __init__(
        self,
        in_size,
        out_size,
        w_init: Optional[Initializer] = DEFAULT,
        b_init: Optional[Initializer] = DEFAULT,
        state_init: Optional[Initializer] = None,
        activation: str | Callable = "tanh",
        *,
        dtype=None,
        key: Key = None,
        name: Optional[str] = None,
    ):
        super().__init__(
            (feature_size(out_size, "out_size"),), dtype, name=name, state_init=state_init
        )
        self.activation = get_activation(activation)
        _add_fused_gates(self, in_size, out_size, 4, w_init, b_init, key)

    def update(self, x):
        gates = self.W_ih(x) + self.W_hh(self.h.value)
        i, f, g, o = jnp.split(gates, 4, axis=-1)
        c = jax.nn.sigmoid(f) * self.c.value + jax.nn.sigmoid(i) * self.activation(g)
        h = jax.nn.sigmoid(o) * self.activation(c)
        self.c.value = c
        self.h.value = h
        return h


class LeakyRNNCell(RecurrentModule):
    """Leaky-integrator rate cell ``h' = d * h + (1 - d) * act(x @ W_in + b [+ h @ W_hh])``.

    ``d = exp(-dt / tau)``; state ``h``, returns ``h'``. Without ``recurrent`` the state update
    is element-wise per unit (the diagonal case the online algorithms treat exactly); with it,
    ``W_hh = Linear(num_out, num_out, bias=False)`` couples the units.
    """

    state_names = ("h",)

    def __init__(
        self,
        in_size,
        out_size,
        w_init: Optional[Initializer] = DEFAULT,
        b_init: Optional[Initializer] = DEFAULT,
        state_init: Optional[Initializer] = None,
        *,
        tau: float = 5.0,
        dt: float = 1.0,
        activation: str | Callable = "tanh",
        recurrent: bool = False,
        dtype=None,
        key: Key = None,
        name: Optional[str] = None,
    ):
        num_in, num_out = _sizes(self, in_size, out_size)
        super().__init__((num_out,), dtype, name=name, state_init=state_init)
        _set_sizes(self, in_size, out_size)
        self.tau, self.dt = tau, dt
        self.decay = decay_factor(dt, tau)
        self.activation = get_activation(activation)
        self.recurrent = recurrent
        k_in, k_hh = split_key(key, 2)
        self.W_in = Linear(
            num_in, num_out, w_init=w_init, b_init=b_init, dtype=self.dtype, key=k_in
        )
        self.W_hh = (
            Linear(num_out, num_out, bias=False, w_init=w_init, dtype=self.dtype, key=k_hh)
            if recurrent
            else None
        )

    def update(self, x):
        h = self.h.value
        drive = self.W_in(x)
        if self.W_hh is not None:
            drive = drive + self.W_hh(h)
        h = self.decay * h + (1.0 - self.decay) * self.activation(drive)
        self.h.value = h
        return h
