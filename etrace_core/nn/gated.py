"""More recurrent cells of braintrace's layer set: MGU, MinimalRNN, MiniGRU, MiniLSTM, CFN,
UR-LSTM and LRU.

Same equations as braintrace's cells, built on etrace's ``Linear`` (separate ``weight`` and
``bias`` ParamStates) and element-wise ETP weights; defaults follow etrace's torch-style
initialisation (pass ``braintools.init.Orthogonal()`` for braintrace's). Sizes, initialisers and
``state_init`` take the same forms as the other cells (see ``etrace_core.nn.rnn``).
"""

import math
from collections.abc import Callable
from typing import Optional

import brainstate
import jax
import jax.numpy as jnp

from etrace_core import ops

from .activations import get_activation
from .base import RecurrentModule
from .init import DEFAULT, Initializer, Key, feature_size, make_param, split_key
from .linear import Linear

__all__ = ["MGUCell", "MinimalRNNCell", "MiniGRU", "MiniLSTM", "CFNCell", "URLSTMCell", "LRUCell"]


def _setup(cell, in_size, out_size):
    cell.num_in, cell.num_out = feature_size(in_size, "in_size"), feature_size(out_size, "out_size")
    cell.in_size, cell.out_size = (cell.num_in,), (cell.num_out,)


class MGUCell(RecurrentModule):
    """Minimal gated unit: ``f = sigmoid(W_f [x, h])``, ``h~ = act(W_h [x, f * h])``,
    ``h' = (1 - f) * h + f * h~``; state ``h``, returns ``h'``."""

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
        _setup(self, in_size, out_size)
        self.activation = get_activation(activation)
        k1, k2 = split_key(key, 2)
        n = self.num_in + self.num_out
        self.Wf = Linear(n, self.num_out, w_init, b_init, dtype=self.dtype, key=k1)
        self.Wh = Linear(n, self.num_out, w_init, b_init, dtype=self.dtype, key=k2)

    def update(self, x):
        h = self.h.value
        f = jax.nn.sigmoid(self.Wf(jnp.concatenate([x, h], axis=-1)))
        cand = self.activation(self.Wh(jnp.concatenate([x, f * h], axis=-1)))
        h = (1.0 - f) * h + f * cand
        self.h.value = h
        return h


class MinimalRNNCell(RecurrentModule):
    """Minimal RNN: ``z = phi(x)`` (default a ``Linear``), ``u = sigmoid(W_u [z, h])``,
    ``h' = u * h + (1 - u) * z``; state ``h``, returns ``h'``."""

    state_names = ("h",)

    def __init__(
        self,
        in_size,
        out_size,
        w_init: Optional[Initializer] = DEFAULT,
        b_init: Optional[Initializer] = DEFAULT,
        state_init: Optional[Initializer] = None,
        phi: Optional[Callable] = None,
        *,
        dtype=None,
        key: Key = None,
        name: Optional[str] = None,
    ):
        super().__init__(
            (feature_size(out_size, "out_size"),), dtype, name=name, state_init=state_init
        )
        _setup(self, in_size, out_size)
        k1, k2 = split_key(key, 2)
        if phi is None:
            phi = Linear(self.num_in, self.num_out, w_init, b_init, dtype=self.dtype, key=k1)
        if not callable(phi):
            raise ValueError(f"phi must be callable, got {phi!r}")
        self.phi = phi
        self.W_u = Linear(2 * self.num_out, self.num_out, w_init, b_init, dtype=self.dtype, key=k2)

    def update(self, x):
        z = self.phi(x)
        h = self.h.value
        gate = jax.nn.sigmoid(self.W_u(jnp.concatenate([z, h], axis=-1)))
        h = gate * h + (1.0 - gate) * z
        self.h.value = h
        return h


class MiniGRU(RecurrentModule):
    """minGRU: ``z = sigmoid(W_z [x, h])``, ``h' = (1 - z) * h + z * W_x x``; state ``h``."""

    state_names = ("h",)

    def __init__(
        self,
        in_size,
        out_size,
        w_init: Optional[Initializer] = DEFAULT,
        b_init: Optional[Initializer] = DEFAULT,
        state_init: Optional[Initializer] = None,
        *,
        dtype=None,
        key: Key = None,
        name: Optional[str] = None,
    ):
        super().__init__(
            (feature_size(out_size, "out_size"),), dtype, name=name, state_init=state_init
        )
        _setup(self, in_size, out_size)
        k1, k2 = split_key(key, 2)
        self.W_x = Linear(self.num_in, self.num_out, w_init, b_init, dtype=self.dtype, key=k1)
        self.W_z = Linear(
            self.num_in + self.num_out, self.num_out, w_init, b_init, dtype=self.dtype, key=k2
        )

    def update(self, x):
        h = self.h.value
        z = jax.nn.sigmoid(self.W_z(jnp.concatenate([x, h], axis=-1)))
        h = (1.0 - z) * h + z * self.W_x(x)
        self.h.value = h
        return h


class MiniLSTM(RecurrentModule):
    """minLSTM: ``f = sigmoid(W_f [x, h])``, ``i = sigmoid(W_i [x, h])``,
    ``h' = f * h + i * W_x x``; state ``h``, returns ``h'``."""

    state_names = ("h",)

    def __init__(
        self,
        in_size,
        out_size,
        w_init: Optional[Initializer] = DEFAULT,
        b_init: Optional[Initializer] = DEFAULT,
        state_init: Optional[Initializer] = None,
        *,
        dtype=None,
        key: Key = None,
        name: Optional[str] = None,
    ):
        super().__init__(
            (feature_size(out_size, "out_size"),), dtype, name=name, state_init=state_init
        )
        _setup(self, in_size, out_size)
        k1, k2, k3 = split_key(key, 3)
        n = self.num_in + self.num_out
        self.W_x = Linear(self.num_in, self.num_out, w_init, b_init, dtype=self.dtype, key=k1)
        self.W_f = Linear(n, self.num_out, w_init, b_init, dtype=self.dtype, key=k2)
        self.W_i = Linear(n, self.num_out, w_init, b_init, dtype=self.dtype, key=k3)

    def update(self, x):
        h = self.h.value
        xh = jnp.concatenate([x, h], axis=-1)
        f = jax.nn.sigmoid(self.W_f(xh))
        i = jax.nn.sigmoid(self.W_i(xh))
        h = f * h + i * self.W_x(x)
        self.h.value = h
        return h


class CFNCell(RecurrentModule):
    """Chaos-free network cell (Laurent & von Brecht 2017): ``f = sigmoid(Wf [x, h])``,
    ``i = sigmoid(Wi [x, h])``, ``h' = f * act(h) + i * act(Wh x)``; state ``h``."""

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
        _setup(self, in_size, out_size)
        self.activation = get_activation(activation)
        k1, k2, k3 = split_key(key, 3)
        n = self.num_in + self.num_out
        self.Wf = Linear(n, self.num_out, w_init, b_init, dtype=self.dtype, key=k1)
        self.Wi = Linear(n, self.num_out, w_init, b_init, dtype=self.dtype, key=k2)
        self.Wh = Linear(self.num_in, self.num_out, w_init, b_init, dtype=self.dtype, key=k3)

    def update(self, x):
        h = self.h.value
        xh = jnp.concatenate([x, h], axis=-1)
        f = jax.nn.sigmoid(self.Wf(xh))
        i = jax.nn.sigmoid(self.Wi(xh))
        h = f * self.activation(h) + i * self.activation(self.Wh(x))
        self.h.value = h
        return h


class URLSTMCell(RecurrentModule):
    """UR-LSTM (Gu et al. 2020, "Improving the gating mechanism of recurrent neural networks").

    With ``xh = [x, h]`` and one forget bias ``b`` (an element-wise ETP weight):
    ``f = sigmoid(Wf xh + b)``, ``r = sigmoid(Wr xh - b)``, ``g = 2 r f + (1 - 2 r) f^2``,
    ``c' = g c + (1 - g) act(Wu xh)``, ``h' = sigmoid(Wo xh) act(c')``; states ``h``, ``c``,
    returns ``h'``. The four ``Linear`` layers have no bias; ``b`` starts at the uniform gate
    initialisation ``logit(u)``, ``u ~ U(1/H, 1 - 1/H)`` (braintrace's defaults).
    """

    state_names = ("h", "c")

    def __init__(
        self,
        in_size,
        out_size,
        w_init: Optional[Initializer] = DEFAULT,
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
        _setup(self, in_size, out_size)
        self.activation = get_activation(activation)
        keys = split_key(key, 5)
        n, H = self.num_in + self.num_out, self.num_out
        self.Wu, self.Wf, self.Wr, self.Wo = (
            Linear(n, H, w_init, None, dtype=self.dtype, key=k) for k in keys[:4]
        )
        self.bias = make_param(_uniform_gate_bias, (H,), self.dtype, key=keys[4])

    def update(self, x):
        h, c = self.h.value, self.c.value
        xh = jnp.concatenate([x, h], axis=-1)
        b = ops.element_wise(self.bias.value)
        f = jax.nn.sigmoid(self.Wf(xh) + b)
        r = jax.nn.sigmoid(self.Wr(xh) - b)
        g = 2.0 * r * f + (1.0 - 2.0 * r) * f * f
        c = g * c + (1.0 - g) * self.activation(self.Wu(xh))
        h = jax.nn.sigmoid(self.Wo(xh)) * self.activation(c)
        self.h.value, self.c.value = h, c
        return h


def _uniform_gate_bias(shape):
    """``logit(u)``, ``u ~ U(1/H, 1 - 1/H)``: forget gates spread over (1/H, 1 - 1/H)."""
    (H,) = shape
    u = brainstate.random.uniform(1.0 / H, 1.0 - 1.0 / H, (H,))
    return jnp.log(u) - jnp.log1p(-u)


def _glorot(shape, dtype=None):
    """N(0, 1/in) scaled by 1/sqrt(2): the LRU paper's complex Glorot initialisation."""
    return brainstate.random.randn(*shape) / math.sqrt(2 * shape[0])


class LRUCell(RecurrentModule):
    """Linear recurrent unit (Orvieto et al. 2023) with its complex state as (``h_re``, ``h_im``).

    ``lambda = exp(-exp(nu_log) + i exp(theta_log))``, ``gamma = exp(gamma_log)``;
    ``h' = lambda h + gamma (B_re x + i B_im x)``, ``y = Re(C h') + D * x`` with
    ``C = C_re + i C_im``. ``nu_log``, ``theta_log``, ``gamma_log`` and ``D`` are element-wise
    ETP weights; ``B``, ``C`` are ``Linear`` layers without bias.
    """

    state_names = ("h_re", "h_im")

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        r_min: float = 0.0,
        r_max: float = 1.0,
        max_phase: float = 6.28,
        *,
        dtype=None,
        key: Key = None,
        name: Optional[str] = None,
    ):
        super().__init__((d_hidden,), dtype, name=name)
        self.d_model, self.d_hidden = d_model, d_hidden
        self.in_size, self.out_size = d_model, d_hidden
        self.r_min, self.r_max, self.max_phase = r_min, r_max, max_phase
        keys = split_key(key, 7)

        def draw(k, fn):
            if k is None:
                return fn()
            with brainstate.random.seed_context(k):
                return fn()

        u1 = draw(keys[0], lambda: brainstate.random.uniform(size=d_hidden))
        u2 = draw(keys[1], lambda: brainstate.random.uniform(size=d_hidden))
        theta_log = jnp.log(max_phase * u1)
        nu_log = jnp.log(-0.5 * jnp.log(u2 * (r_max**2 - r_min**2) + r_min**2))
        lam = jnp.exp(-jnp.exp(nu_log) + 1j * jnp.exp(theta_log))
        gamma_log = jnp.log(jnp.sqrt(1 - jnp.abs(lam) ** 2))
        self.theta_log = make_param(theta_log, (d_hidden,), self.dtype)
        self.nu_log = make_param(nu_log, (d_hidden,), self.dtype)
        self.gamma_log = make_param(gamma_log, (d_hidden,), self.dtype)
        self.B_re = Linear(d_model, d_hidden, _glorot, None, dtype=self.dtype, key=keys[2])
        self.B_im = Linear(d_model, d_hidden, _glorot, None, dtype=self.dtype, key=keys[3])
        self.C_re = Linear(d_hidden, d_model, _glorot, None, dtype=self.dtype, key=keys[4])
        self.C_im = Linear(d_hidden, d_model, _glorot, None, dtype=self.dtype, key=keys[5])
        self.D = make_param(
            draw(keys[6], lambda: brainstate.random.randn(d_model)), (d_model,), self.dtype
        )

    def update(self, x):
        a = jnp.exp(-jnp.exp(ops.element_wise(self.nu_log.value)))
        b = jnp.exp(ops.element_wise(self.theta_log.value))
        c = jnp.exp(ops.element_wise(self.gamma_log.value))
        a_cos, a_sin = a * jnp.cos(b), a * jnp.sin(b)
        h_re, h_im = self.h_re.value, self.h_im.value
        new_re = a_cos * h_re - a_sin * h_im + c * self.B_re(x)
        new_im = a_sin * h_re + a_cos * h_im + c * self.B_im(x)
        self.h_re.value, self.h_im.value = new_re, new_im
        return self.C_re(new_re) - self.C_im(new_im) + x * ops.element_wise(self.D.value)
