"""etrace_core-native recurrent models whose parameters reach hidden states outside ETP ops.

Each is written the way the published model is written: per-unit or shared parameters used
with plain ``jnp`` element-wise ops (decays, gains, separate biases), or small parameters behind
a position-mixing op (a conv kernel before a dense layer, a weight before an RMS norm).
"""

from __future__ import annotations

import brainstate
import jax
import jax.numpy as jnp
import numpy as np

from etrace_core import nn
from etrace_core.nn.surrogate import spike_fn

I, H, O = 3, 4, 2


def _param(seed, shape, low, high):
    rng = np.random.default_rng(seed)
    return brainstate.ParamState(jnp.asarray(rng.uniform(low, high, shape), jnp.result_type(float)))


class _Cell(brainstate.nn.Module):
    """Hidden states named in `state_names`, shaped (H,) or (batch, H)."""

    state_names = ("h",)

    def init_state(self, batch_size=None, **kw):
        shape = (H,) if batch_size is None else (batch_size, H)
        for name in self.state_names:
            setattr(self, name, brainstate.HiddenState(jnp.zeros(shape, jnp.result_type(float))))


class IndRNN(_Cell):
    """IndRNN (Li et al. 2018): ``h = relu(W x + u * h + b)``, u a per-unit recurrent weight."""

    def __init__(self, seed=0):
        super().__init__()
        self.W = nn.Linear(I, H, bias=False, key=seed)
        self.u = _param(seed + 1, (H,), 0.3, 0.9)
        self.b = _param(seed + 2, (H,), 0.0, 0.4)
        self.out = nn.Linear(H, O, key=seed + 3)

    def update(self, x):
        h = jax.nn.relu(self.W(x) + self.u.value * self.h.value + self.b.value)
        self.h.value = h
        return self.out(h)


class LeakyTau(_Cell):
    """Leaky integrator with a learnable time constant, per unit or one shared scalar::

    d = exp(-dt / exp(log_tau));  h = d * h + (1 - d) * tanh(x W + b)
    """

    def __init__(self, shared=False, seed=0):
        super().__init__()
        self.W = nn.Linear(I, H, key=seed)
        self.log_tau = _param(seed + 1, () if shared else (H,), 0.5, 1.5)
        self.out = nn.Linear(H, O, key=seed + 2)

    def update(self, x):
        d = jnp.exp(-1.0 / jnp.exp(self.log_tau.value))
        h = d * self.h.value + (1 - d) * jnp.tanh(self.W(x))
        self.h.value = h
        return self.out(h)


class MinGRU(_Cell):
    """minGRU (Feng et al. 2024): ``z = sigmoid(x W_z)``, ``h = (1 - z) h + z (x W_h)``."""

    def __init__(self, seed=0):
        super().__init__()
        self.W_z = nn.Linear(I, H, key=seed)
        self.W_h = nn.Linear(I, H, key=seed + 1)
        self.out = nn.Linear(H, O, key=seed + 2)

    def update(self, x):
        z = jax.nn.sigmoid(self.W_z(x))
        h = (1 - z) * self.h.value + z * self.W_h(x)
        self.h.value = h
        return self.out(h)


class RealLRU(_Cell):
    """Linear Recurrent Unit (Orvieto et al. 2023), its complex state as two real states::

    lambda = exp(-exp(nu) + i exp(theta)),  h = lambda h + exp(gamma) (B x),
    y = Re(C h) + D x
    """

    state_names = ("h_re", "h_im")

    def __init__(self, seed=0):
        super().__init__()
        self.nu = _param(seed, (H,), -2.0, -0.5)
        self.theta = _param(seed + 1, (H,), -1.0, 0.5)
        self.gamma = _param(seed + 2, (H,), -0.5, 0.5)
        self.B_re = nn.Linear(I, H, bias=False, key=seed + 3)
        self.B_im = nn.Linear(I, H, bias=False, key=seed + 4)
        self.C_re = _param(seed + 5, (H, O), -0.5, 0.5)
        self.C_im = _param(seed + 6, (H, O), -0.5, 0.5)
        self.D = _param(seed + 7, (I, O), -0.5, 0.5)

    def update(self, x):
        r = jnp.exp(-jnp.exp(self.nu.value))
        a, b = r * jnp.cos(jnp.exp(self.theta.value)), r * jnp.sin(jnp.exp(self.theta.value))
        g = jnp.exp(self.gamma.value)
        h_re, h_im = self.h_re.value, self.h_im.value
        new_re = a * h_re - b * h_im + g * self.B_re(x)
        new_im = b * h_re + a * h_im + g * self.B_im(x)
        self.h_re.value, self.h_im.value = new_re, new_im
        return new_re @ self.C_re.value - new_im @ self.C_im.value + x @ self.D.value


class ConvLeaky(_Cell):
    """Conv2d -> reshape -> Linear into a leaky cell (an element-wise recurrence): the kernel
    reaches h only through the dense layer, so it needs a dense trace."""

    def __init__(self, side=4, seed=0):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, kernel_size=3, padding="SAME", key=seed)
        self.W = nn.Linear(2 * side * side, H, key=seed + 1)
        self.out = nn.Linear(H, O, key=seed + 2)

    def update(self, x):
        feat = self.conv(x)
        feat = feat.reshape(feat.shape[:-3] + (-1,))
        h = 0.7 * self.h.value + 0.3 * jnp.tanh(self.W(feat))
        self.h.value = h
        return self.out(h)


class NormLeaky(_Cell):
    """An encoder before a reduction: ``h = 0.8 h + tanh(g * rmsnorm(x W) + b)``; W reaches h
    only through the norm (dense trace), the gain g and bias b element-wise."""

    def __init__(self, seed=0):
        super().__init__()
        self.W = nn.Linear(I, H, bias=False, key=seed)
        self.g = _param(seed + 1, (H,), 0.5, 1.5)
        self.b = _param(seed + 2, (H,), -0.3, 0.3)
        self.out = nn.Linear(H, O, key=seed + 3)

    def update(self, x):
        y = self.W(x)
        y = y / jnp.sqrt(jnp.mean(y**2, axis=-1, keepdims=True) + 1e-3)
        h = 0.8 * self.h.value + jnp.tanh(self.g.value * y + self.b.value)
        self.h.value = h
        return self.out(h)


class LIFDecay(_Cell):
    """Adaptive LIF with a learnable per-unit membrane decay ``alpha = sigmoid(alpha_logit)``::

    s = spike(V - 0.5 - 0.4 a);  V = alpha V + 5 (1 - alpha) x W - s;  a = 0.95 a + s
    """

    state_names = ("V", "a")

    def __init__(self, seed=0):
        super().__init__()
        self.W = nn.Linear(I, H, bias=False, key=seed)
        self.alpha_logit = _param(seed + 1, (H,), 0.5, 2.5)
        self.out = nn.Linear(H, O, key=seed + 2)

    def update(self, x):
        V, a = self.V.value, self.a.value
        s = spike_fn(V - 0.5 - 0.4 * a)
        alpha = jax.nn.sigmoid(self.alpha_logit.value)
        V = alpha * V + 5.0 * (1 - alpha) * self.W(x) - s
        a = 0.95 * a + s
        self.V.value, self.a.value = V, a
        return self.out(spike_fn(V - 0.5 - 0.4 * a))


@jax.custom_vjp
def heaviside_vjp(x):
    """A spike with its surrogate as a custom VJP (what a torch.autograd.Function lowers to)."""
    return (x > 0).astype(x.dtype)


heaviside_vjp.defvjp(
    lambda x: (heaviside_vjp(x), x), lambda x, g: (g / (10 * jnp.abs(x) + 1) ** 2,)
)


class LIFCustomVjp(_Cell):
    """LIF whose adaptation reads the new spike (a custom-VJP surrogate) in the same step, with
    a learnable per-unit decay and a learnable shared adaptation decay ``rho``::

        V = alpha V + 5 (1 - alpha) x W - 0.3 a;  s = spike(V - 0.5);  a = rho a + s
    """

    state_names = ("V", "a")

    def __init__(self, seed=0):
        super().__init__()
        self.W = nn.Linear(I, H, bias=False, key=seed)
        self.alpha_logit = _param(seed + 1, (H,), 0.5, 2.5)
        self.rho = _param(seed + 2, (), 0.5, 0.9)
        self.out = nn.Linear(H, O, key=seed + 3)

    def update(self, x):
        V, a = self.V.value, self.a.value
        alpha = jax.nn.sigmoid(self.alpha_logit.value)
        V = alpha * V + 5.0 * (1 - alpha) * self.W(x) - 0.3 * a
        s = heaviside_vjp(V - 0.5)
        a = self.rho.value * a + s
        self.V.value, self.a.value = V, a
        return self.out(s)


__all__ = [
    "I",
    "H",
    "O",
    "LIFCustomVjp",
    "IndRNN",
    "LeakyTau",
    "MinGRU",
    "RealLRU",
    "ConvLeaky",
    "NormLeaky",
    "LIFDecay",
]
