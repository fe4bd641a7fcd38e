"""Shared test models for the compiler/executor oracles, each with a hand-written step.

Every :class:`Case` bundles

- ``make(batch)``: a freshly built, state-initialised model (``batch`` is ``None`` or an int);
- ``x(batch, sign)``: one step's input;
- the expected compiled structure: hidden groups (as sets of paths), relations (weight path ->
  the groups it reaches, as path sets) and the parameters that are not online-traced;
- ``oracle(params, h_prev, x, ctx) -> (outputs, h_new)``: the model's step written by hand as
  a pure ``jnp`` function of ``{path: value}`` dicts. It routes every ETP-op output through
  ``ctx.etp(weight_path, y)`` and every produced hidden state through ``ctx.hidden(path, h)``,
  so one function gives all oracles:

  * ``Ctx(cut=True)``: ETP outputs held fixed (their values are still computed from the inputs),
    for D = dh^t/dh^{t-1};
  * ``Ctx(cut=True, dy={key: dy})``: a perturbation added to one ETP output, for df;
  * ``Ctx(p={path: p})``: a perturbation added to h^t where it is produced, for dL/dh^t.

ETP uses are keyed ``(weight_path, n)``: the n-th use of that weight in program order.

Build models inside the ``x64`` fixture for float64 oracles (dtypes are fixed at construction).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from etrace_core import nn, ops
from etrace_core.nn.base import RecurrentModule

Path = tuple[str, ...]

__all__ = [
    # cases and oracles
    "Case",
    "Ctx",
    "CASES",
    "CASE_BY_NAME",
    "SKIP_PATH_CASES",
    "Oracles",
    "oracles",
    "oracle_forward",
    "relation_keys",
    "unit_of_output",
    "G",
    "P",
    # helpers
    "rand",
    "uinit",
    "initialised",
    "signed_input",
    "positive_input",
    "image_input",
    "pure_step",
    "hidden_paths",
    "param_values",
    "set_random_hidden",
    # models
    "RNNReadout",
    "TwoLayerGRU",
    "LSTMReadout",
    "LIFReadout",
    "ConvRNN",
    "CoupledCell",
    "CondCell",
    "TiedLeaky",
    "FusedGateCell",
    "FanOut",
    "LeakyReadout",
    "SkipCell",
    "PartialFused",
    "ConvLeaky",
    "EinsumHeads",
    "CounterRNN",
    "FeedForward",
    "NestedJitLeaky",
    "SubstepLeaky",
    "WhileLeaky",
    "WhileMixInput",
    "WeightInScan",
    "ShapeChanging",
    "ParamWriter",
]


# ---------------------------------------------------------------------------- helpers


def rand(key, *shape, scale=1.0, dtype=None):
    """Standard normal draws (numpy: no XLA compilation per new shape)."""
    dtype = jnp.result_type(float) if dtype is None else dtype
    return jnp.asarray(scale * np.random.default_rng(key).standard_normal(shape), dtype)


def uinit(seed, low=-0.6, high=0.6):
    """An initializer drawing U(low, high) from its own numpy generator (fresh draws per call)."""
    rng = np.random.default_rng(seed)

    def init(shape, dtype=None):
        return jnp.asarray(rng.uniform(low, high, shape), nn.init.resolve_dtype(dtype))

    return init


def _bshape(batch, *shape):
    return shape if batch is None else (batch,) + shape


def param_values(model) -> dict[Path, Any]:
    return {p: s.value for p, s in model.states(brainstate.ParamState).items()}


def hidden_paths(model):
    return tuple(model.states(brainstate.HiddenState).keys())


def set_random_hidden(model, key=0, low=-0.8, high=0.8, overrides=None):
    """Give every hidden state a random value (so Jacobians are non-trivial)."""
    overrides = overrides or {}
    rng = np.random.default_rng(key)
    for path, st in sorted(model.states(brainstate.HiddenState).items()):
        lo, hi = overrides.get(path[-1], (low, high))
        st.value = jnp.asarray(rng.uniform(lo, hi, st.value.shape), st.value.dtype)


def pure_step(model):
    """``step(values, *args) -> (outputs, new_values)``: the model's step as a pure function."""
    graphdef, tree = brainstate.graph.treefy_split(model)
    flat = tree.to_flat()

    def step(values, *args):
        new_tree = type(tree).from_flat(
            {p: flat[p].replace(value=values.get(p, flat[p].value)) for p in flat}
        )
        clone = brainstate.graph.treefy_merge(graphdef, new_tree)
        out = clone(*args)
        return out, {p: s.value for p, s in clone.states().items()}

    return step, {p: s.value for p, s in flat.items()}


class Ctx:
    """How the oracle treats ETP outputs and produced hidden states (see the module docstring)."""

    def __init__(self, cut: bool = False, dy: Optional[dict] = None, p: Optional[dict] = None):
        self.cut, self.dy, self.p = cut, dy or {}, p or {}
        self.count: dict[Path, int] = {}
        self.ys: dict[tuple[Path, int], Any] = {}

    def etp(self, path: Path, y):
        n = self.count.get(path, 0)
        self.count[path] = n + 1
        key = (path, n)
        self.ys[key] = y
        if self.cut:
            y = lax.stop_gradient(y)
        if key in self.dy:
            y = y + self.dy[key]
        return y

    def hidden(self, path: Path, h):
        return h + self.p[path] if path in self.p else h


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[Optional[int]], brainstate.nn.Module]
    x: Callable[..., Any]
    groups: tuple[frozenset, ...]  # expected hidden groups (sets of paths)
    relations: tuple[tuple[Path, tuple[frozenset, ...]], ...]  # (weight, groups reached)
    untraced: tuple[Path, ...]  # parameters with no online-traced use
    oracle: Callable
    full_exact: bool = (
        False  # no weight on the recurrence: the full step Jacobian's group blocks are D
    )
    hidden_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)


def G(*paths) -> frozenset:
    """A hidden group as a set of paths: ``G("lstm.h", "lstm.c")``."""
    return frozenset(tuple(p.split(".")) for p in paths)


def P(path: str) -> Path:
    """A state path from dotted text: ``P("rnn.W_hh.weight")``."""
    return tuple(path.split("."))


def _mm(params, ctx, prefix, x, bias=True):
    """A Linear (io layout) layer at `prefix` of the model, routed through ctx.etp."""
    y = x @ params[prefix + ("weight",)]
    if bias:
        y = y + params[prefix + ("bias",)]
    return ctx.etp(prefix + ("weight",), y)


def _readout(params, prefix, x, ctx=None, bias=True):
    y = x @ params[prefix + ("weight",)]
    y = y + params[prefix + ("bias",)] if bias else y
    return y if ctx is None else ctx.etp(prefix + ("weight",), y)


# ---------------------------------------------------------------------------- 1. vanilla RNN


class RNNReadout(brainstate.nn.Module):
    def __init__(self, n_in=3, n_rec=5, n_out=2):
        super().__init__()
        self.rnn = nn.VanillaRNNCell(n_in, n_rec, w_init=uinit(1), b_init=uinit(10))
        self.out = nn.Linear(n_rec, n_out, w_init=uinit(2), b_init=uinit(20))

    def update(self, x):
        return self.out(self.rnn(x))


def _rnn_oracle(params, h, x, ctx):
    pre = _mm(params, ctx, ("rnn", "W_ih"), x) + _mm(
        params, ctx, ("rnn", "W_hh"), h[P("rnn.h")], False
    )
    h1 = ctx.hidden(P("rnn.h"), jnp.tanh(pre))
    return _readout(params, ("out",), h1, ctx), {P("rnn.h"): h1}


# ---------------------------------------------------------------------------- 2. 2-layer GRU


class TwoLayerGRU(brainstate.nn.Module):
    def __init__(self, n_in=3, n_rec=4, n_out=2):
        super().__init__()
        self.rnn1 = nn.GRUCell(n_in, n_rec, w_init=uinit(3), b_init=uinit(30))
        self.rnn2 = nn.GRUCell(n_rec, n_rec, w_init=uinit(4), b_init=uinit(40))
        self.out = nn.Linear(n_rec, n_out, w_init=uinit(5), b_init=uinit(50))

    def update(self, x):
        return self.out(self.rnn2(self.rnn1(x)))


def _gru(params, ctx, name, h, x):
    """torch's GRUCell: the reset gate multiplies the recurrent matmul's n-part."""
    gi = _mm(params, ctx, (name, "W_ih"), x)
    gh = _mm(params, ctx, (name, "W_hh"), h)
    H = h.shape[-1]
    r = jax.nn.sigmoid(gi[..., :H] + gh[..., :H])
    z = jax.nn.sigmoid(gi[..., H : 2 * H] + gh[..., H : 2 * H])
    n = jnp.tanh(gi[..., 2 * H :] + r * gh[..., 2 * H :])
    return (1 - z) * n + z * h


def _gru2_oracle(params, h, x, ctx):
    h1 = ctx.hidden(P("rnn1.h"), _gru(params, ctx, "rnn1", h[P("rnn1.h")], x))
    h2 = ctx.hidden(P("rnn2.h"), _gru(params, ctx, "rnn2", h[P("rnn2.h")], h1))
    return _readout(params, ("out",), h2, ctx), {P("rnn1.h"): h1, P("rnn2.h"): h2}


# ---------------------------------------------------------------------------- 3. LSTM


class LSTMReadout(brainstate.nn.Module):
    def __init__(self, n_in=3, n_rec=4, n_out=2):
        super().__init__()
        self.lstm = nn.LSTMCell(n_in, n_rec, w_init=uinit(6), b_init=uinit(60))
        self.out = nn.Linear(n_rec, n_out, w_init=uinit(7), b_init=uinit(70))

    def update(self, x):
        return self.out(self.lstm(x))


def _lstm_oracle(params, h, x, ctx):
    gates = _mm(params, ctx, ("lstm", "W_ih"), x) + _mm(
        params, ctx, ("lstm", "W_hh"), h[P("lstm.h")]
    )
    H = h[P("lstm.h")].shape[-1]
    i, f, g, o = (gates[..., k * H : (k + 1) * H] for k in range(4))
    c = ctx.hidden(
        P("lstm.c"), jax.nn.sigmoid(f) * h[P("lstm.c")] + jax.nn.sigmoid(i) * jnp.tanh(g)
    )
    hh = ctx.hidden(P("lstm.h"), jax.nn.sigmoid(o) * jnp.tanh(c))
    return _readout(params, ("out",), hh, ctx), {P("lstm.h"): hh, P("lstm.c"): c}


# ---------------------------------------------------------------------------- 4. recurrent LIF


class LIFReadout(brainstate.nn.Module):
    def __init__(self, n_in=3, n_rec=5, n_out=2, recurrent=True):
        super().__init__()
        self.lif = nn.LIF(
            n_in,
            n_rec,
            recurrent=recurrent,
            beta=0.4,
            tau_mem=10.0,
            tau_adapt=50.0,
            w_init=uinit(8, -1.0, 1.5),
            w_rec_init=uinit(80, -0.5, 0.5),
        )
        self.out = nn.Linear(n_rec, n_out, w_init=uinit(9), b_init=uinit(90))

    def update(self, x):
        return self.out(self.lif(x))


def _lif_oracle(params, h, x, ctx, recurrent=True):
    alpha, rho, beta, thr = math.exp(-1 / 10.0), math.exp(-1 / 50.0), 0.4, 1.0
    V, a = h[P("lif.V")], h[P("lif.a")]
    s = nn.spike_fn((V - thr - beta * a) / thr)
    cur = _mm(params, ctx, ("lif", "W_in"), x, False)
    if recurrent:
        cur = cur + _mm(params, ctx, ("lif", "W_rec"), s, False)
    V1 = ctx.hidden(P("lif.V"), alpha * V + (1 - alpha) * cur - thr * s)
    a1 = ctx.hidden(P("lif.a"), rho * a + s)
    spike = nn.spike_fn((V1 - thr - beta * a1) / thr)
    return _readout(params, ("out",), spike, ctx), {P("lif.V"): V1, P("lif.a"): a1}


# ---------------------------------------------------------------------------- 5. conv -> RNN


class ConvRNN(brainstate.nn.Module):
    """Conv2d(1 -> 2, 3x3, SAME) on a (1, 5, 5) image, flattened into a vanilla RNN."""

    def __init__(self, n_rec=4, n_out=2, side=5):
        super().__init__()
        self.conv = nn.Conv2d(
            1, 2, kernel_size=3, padding="SAME", w_init=uinit(10), b_init=uinit(100)
        )
        self.rnn = nn.VanillaRNNCell(2 * side * side, n_rec, w_init=uinit(11), b_init=uinit(110))
        self.out = nn.Linear(n_rec, n_out, w_init=uinit(12), b_init=uinit(120))

    def update(self, x):
        feat = self.conv(x)
        feat = feat.reshape(feat.shape[:-3] + (-1,))
        return self.out(self.rnn(feat))


def _conv_oracle(params, h, x, ctx):
    y = _conv2d(x, params[P("conv.weight")], params[P("conv.bias")])
    y = ctx.etp(P("conv.weight"), y)
    feat = y.reshape(y.shape[:-3] + (-1,))
    pre = _mm(params, ctx, ("rnn", "W_ih"), feat) + _mm(
        params, ctx, ("rnn", "W_hh"), h[P("rnn.h")], False
    )
    h1 = ctx.hidden(P("rnn.h"), jnp.tanh(pre))
    return _readout(params, ("out",), h1, ctx), {P("rnn.h"): h1}


# ---------------------------------------------------------------------------- 6. two-state cell


class CoupledCell(RecurrentModule):
    """Two states of one unit, coupled element-wise, with a same-step coupling (v' uses u').

    ``d = sigmoid(decay)`` enters through the ETP element-wise op::

        u' = d * u + 0.3 * tanh(v) + x @ W_u + b_u
        v' = 0.7 * v + 0.5 * sin(u') + (x @ W_v) * u
    """

    state_names = ("u", "v")

    def __init__(self, n_in=3, n=4):
        super().__init__((n,))
        self.W_u = nn.Linear(n_in, n, w_init=uinit(13), b_init=uinit(130))
        self.W_v = nn.Linear(n_in, n, bias=False, w_init=uinit(14))
        self.decay = brainstate.ParamState(jnp.linspace(-1.0, 1.0, n, dtype=self.dtype))

    def update(self, x):
        d = ops.element_wise(jax.nn.sigmoid, self.decay.value, batch_shape=x.shape[:-1])
        u, v = self.u.value, self.v.value
        u1 = d * u + 0.3 * jnp.tanh(v) + self.W_u(x)
        v1 = 0.7 * v + 0.5 * jnp.sin(u1) + self.W_v(x) * u
        self.u.value = u1
        self.v.value = v1
        return v1


def _coupled_oracle(params, h, x, ctx):
    d = ctx.etp(
        P("decay"),
        jnp.broadcast_to(
            jax.nn.sigmoid(params[P("decay")]), x.shape[:-1] + params[P("decay")].shape
        ),
    )
    u, v = h[P("u")], h[P("v")]
    u1 = ctx.hidden(P("u"), d * u + 0.3 * jnp.tanh(v) + _mm(params, ctx, ("W_u",), x))
    v1 = ctx.hidden(P("v"), 0.7 * v + 0.5 * jnp.sin(u1) + _mm(params, ctx, ("W_v",), x, False) * u)
    return v1, {P("u"): u1, P("v"): v1}


# ---------------------------------------------------------------------------- 7. lax.cond cell


class CondCell(RecurrentModule):
    """``h' = cond(sum(x) > 0, 0.9 h + tanh(x W_a + b_a), 0.5 h cos(x W_b) + 0.1)``.

    Each branch has its own weight; both must be found (cond -> both branches + select_n).
    """

    state_names = ("h",)

    def __init__(self, n_in=3, n=4):
        super().__init__((n,))
        self.W_a = nn.Linear(n_in, n, w_init=uinit(15), b_init=uinit(150))
        self.W_b = nn.Linear(n_in, n, bias=False, w_init=uinit(16))

    def update(self, x):
        def on(h, x):
            return 0.9 * h + jnp.tanh(self.W_a(x))

        def off(h, x):
            return 0.5 * h * jnp.cos(self.W_b(x)) + 0.1

        h = lax.cond(jnp.sum(x) > 0, on, off, self.h.value, x)
        self.h.value = h
        return 2.0 * h


def _cond_oracle(params, h, x, ctx):
    ya = _mm(params, ctx, ("W_a",), x)
    yb = _mm(params, ctx, ("W_b",), x, False)
    hp = h[P("h")]
    h1 = jnp.where(jnp.sum(x) > 0, 0.9 * hp + jnp.tanh(ya), 0.5 * hp * jnp.cos(yb) + 0.1)
    h1 = ctx.hidden(P("h"), h1)
    return 2.0 * h1, {P("h"): h1}


# ---------------------------------------------------------------------------- 8. tied weight


class TiedLeaky(brainstate.nn.Module):
    """One ``W`` used by two ETP ops: ``h1' = .9 h1 + tanh(x W)``, ``h2' = .8 h2 + tanh(h1' W)``."""

    def __init__(self, n=4, n_out=2):
        super().__init__()
        self.W = nn.Linear(n, n, bias=False, w_init=uinit(17))
        self.out = nn.Linear(n, n_out, w_init=uinit(18), b_init=uinit(180))
        self.n = n
        self.init_state()

    def init_state(self, batch_size=None, **kwargs):
        dtype = nn.init.default_dtype()
        self.h1 = brainstate.HiddenState(nn.init.state_zeros((self.n,), batch_size, dtype))
        self.h2 = brainstate.HiddenState(nn.init.state_zeros((self.n,), batch_size, dtype))

    def update(self, x):
        h1 = 0.9 * self.h1.value + jnp.tanh(self.W(x))
        h2 = 0.8 * self.h2.value + jnp.tanh(self.W(h1))
        self.h1.value = h1
        self.h2.value = h2
        return self.out(h2)


def _tied_oracle(params, h, x, ctx):
    W = P("W.weight")
    h1 = ctx.hidden(P("h1"), 0.9 * h[P("h1")] + jnp.tanh(ctx.etp(W, x @ params[W])))
    h2 = ctx.hidden(P("h2"), 0.8 * h[P("h2")] + jnp.tanh(ctx.etp(W, h1 @ params[W])))
    return _readout(params, ("out",), h2, ctx), {P("h1"): h1, P("h2"): h2}


# ---------------------------------------------------------------------------- 9. fused gates


class FusedGateCell(RecurrentModule):
    """One matmul with a torch-layout ``(3H, I)`` weight, sliced into three gates::

    y = x @ W.T + b;  a, c, g = y[:H], y[H:2H], y[2H:]
    h' = sigmoid(a) * h + (1 - sigmoid(a)) * tanh(c) * sigmoid(g)
    """

    state_names = ("h",)

    def __init__(self, n_in=3, n=4):
        super().__init__((n,))
        self.weight = brainstate.ParamState(uinit(19, -1.0, 1.0)((3 * n, n_in), self.dtype))
        self.bias = brainstate.ParamState(uinit(20, -0.3, 0.3)((3 * n,), self.dtype))
        self.n = n

    def update(self, x):
        H = self.n
        y = ops.matmul(x, self.weight.value, self.bias.value, w_layout="oi")
        a, c, g = y[..., :H], y[..., H : 2 * H], y[..., 2 * H :]
        h = jax.nn.sigmoid(a) * self.h.value + (1 - jax.nn.sigmoid(a)) * jnp.tanh(
            c
        ) * jax.nn.sigmoid(g)
        self.h.value = h
        return h


def _fused_oracle(params, h, x, ctx):
    H = h[P("h")].shape[-1]
    y = ctx.etp(P("weight"), x @ params[P("weight")].T + params[P("bias")])
    a, c, g = y[..., :H], y[..., H : 2 * H], y[..., 2 * H :]
    h1 = jax.nn.sigmoid(a) * h[P("h")] + (1 - jax.nn.sigmoid(a)) * jnp.tanh(c) * jax.nn.sigmoid(g)
    h1 = ctx.hidden(P("h"), h1)
    return h1, {P("h"): h1}


# ---------------------------------------------------------------------------- 10. fan-out


class FanOut(brainstate.nn.Module):
    """One ETP output feeding two independent groups; a recurrent weight links them::

    y = x W + b;  h1' = 0.9 h1 + y + h2 W_r;  h2' = 0.6 h2 + 0.5 tanh(y)
    """

    def __init__(self, n_in=3, n=4):
        super().__init__()
        self.W = nn.Linear(n_in, n, w_init=uinit(21), b_init=uinit(210))
        self.W_r = nn.Linear(n, n, bias=False, w_init=uinit(22))
        self.n = n
        self.init_state()

    def init_state(self, batch_size=None, **kwargs):
        dtype = nn.init.default_dtype()
        self.h1 = brainstate.HiddenState(nn.init.state_zeros((self.n,), batch_size, dtype))
        self.h2 = brainstate.HiddenState(nn.init.state_zeros((self.n,), batch_size, dtype))

    def update(self, x):
        y = self.W(x)
        h1 = 0.9 * self.h1.value + y + self.W_r(self.h2.value)
        h2 = 0.6 * self.h2.value + 0.5 * jnp.tanh(y)
        self.h1.value = h1
        self.h2.value = h2
        return h1 * h2


def _fanout_oracle(params, h, x, ctx):
    y = _mm(params, ctx, ("W",), x)
    h1 = ctx.hidden(P("h1"), 0.9 * h[P("h1")] + y + _mm(params, ctx, ("W_r",), h[P("h2")], False))
    h2 = ctx.hidden(P("h2"), 0.6 * h[P("h2")] + 0.5 * jnp.tanh(y))
    return h1 * h2, {P("h1"): h1, P("h2"): h2}


# ---------------------------------------------------------------------------- 11. leaky + readout


class LeakyReadout(brainstate.nn.Module):
    """Leaky cell without recurrent weights, then a linear readout (one hidden group)."""

    def __init__(self, n_in=3, n=5, n_out=2):
        super().__init__()
        self.cell = nn.LeakyRNNCell(
            n_in, n, tau=4.0, recurrent=False, w_init=uinit(23), b_init=uinit(230)
        )
        self.out = nn.Linear(n, n_out, w_init=uinit(24), b_init=uinit(240))

    def update(self, x):
        return self.out(self.cell(x))


def _leaky_oracle(params, h, x, ctx):
    d = math.exp(-1 / 4.0)
    h1 = ctx.hidden(
        P("cell.h"), d * h[P("cell.h")] + (1 - d) * jnp.tanh(_mm(params, ctx, ("cell", "W_in"), x))
    )
    return _readout(params, ("out",), h1, ctx), {P("cell.h"): h1}


# ---------------------------------------------------------------------------- 12. skip path


class SkipCell(RecurrentModule):
    """``y = x W + b``; ``h' = 0.9 h + tanh(y)``; output ``h' + y`` (y also skips the state)."""

    state_names = ("h",)

    def __init__(self, n_in=3, n=4):
        super().__init__((n,))
        self.W = nn.Linear(n_in, n, w_init=uinit(25), b_init=uinit(250))

    def update(self, x):
        y = self.W(x)
        h = 0.9 * self.h.value + jnp.tanh(y)
        self.h.value = h
        return h + y


def _skip_oracle(params, h, x, ctx):
    y = _mm(params, ctx, ("W",), x)
    h1 = ctx.hidden(P("h"), 0.9 * h[P("h")] + jnp.tanh(y))
    return h1 + y, {P("h"): h1}


# ---------------------------------------------------------------------------- 13. partial fan-out


class PartialFused(RecurrentModule):
    """One ``(I, 2H)`` matmul: the first half drives ``h``, the second half gates the output::

    y = x W + b;  h' = 0.9 h + tanh(y[:H]);  output = h' * y[H:]
    """

    state_names = ("h",)

    def __init__(self, n_in=3, n=4):
        super().__init__((n,))
        self.W = nn.Linear(n_in, 2 * n, w_init=uinit(26), b_init=uinit(260))
        self.n = n

    def update(self, x):
        y = self.W(x)
        h = 0.9 * self.h.value + jnp.tanh(y[..., : self.n])
        self.h.value = h
        return h * y[..., self.n :]


def _partial_oracle(params, h, x, ctx):
    H = h[P("h")].shape[-1]
    y = _mm(params, ctx, ("W",), x)
    h1 = ctx.hidden(P("h"), 0.9 * h[P("h")] + jnp.tanh(y[..., :H]))
    return h1 * y[..., H:], {P("h"): h1}


# ---------------------------------------------------------------------------- 14. conv recurrence


class ConvLeaky(RecurrentModule):
    """An image-shaped state with convolutional input and recurrent kernels::

    h' = 0.8 h + 0.2 tanh(conv_in(x) + conv_rec(h)),   h: (2, 5, 5) or (B, 2, 5, 5)
    """

    state_names = ("h",)

    def __init__(self, side=5):
        super().__init__((2, side, side))
        self.conv_in = nn.Conv2d(1, 2, 3, padding="SAME", w_init=uinit(27), b_init=uinit(270))
        self.conv_rec = nn.Conv2d(2, 2, 3, padding="SAME", bias=False, w_init=uinit(28, -0.3, 0.3))

    def update(self, x):
        h = 0.8 * self.h.value + 0.2 * jnp.tanh(self.conv_in(x) + self.conv_rec(self.h.value))
        self.h.value = h
        return h


def _conv2d(x, w, b=None):
    xb = x if x.ndim == 4 else x[None]
    y = lax.conv_general_dilated(
        xb,
        w,
        (1, 1),
        "SAME",
        dimension_numbers=("NCHW", "OIHW", "NCHW"),
        precision=lax.Precision.HIGHEST,
    )
    if b is not None:
        y = y + b[:, None, None]
    return y if x.ndim == 4 else y[0]


def _conv_leaky_oracle(params, h, x, ctx):
    a = ctx.etp(
        P("conv_in.weight"), _conv2d(x, params[P("conv_in.weight")], params[P("conv_in.bias")])
    )
    r = ctx.etp(P("conv_rec.weight"), _conv2d(h[P("h")], params[P("conv_rec.weight")]))
    h1 = ctx.hidden(P("h"), 0.8 * h[P("h")] + 0.2 * jnp.tanh(a + r))
    return h1, {P("h"): h1}


# ---------------------------------------------------------------------------- 15. einsum heads


class EinsumHeads(RecurrentModule):
    """Per-head input and recurrent weights through ``ops.einsum``, state ``h: (2 heads, 3)``::

    h' = 0.7 h + tanh(einsum('bih,hie->beh', x, W_in).swapaxes(1, 2)
                      + einsum('bhd,hde->bhe', h, W_rec))
    """

    state_names = ("h",)

    def __init__(self):
        super().__init__((2, 3))
        self.W_in = brainstate.ParamState(rand(29, 2, 2, 3, scale=0.5))
        self.W_rec = brainstate.ParamState(rand(30, 2, 3, 3, scale=0.3))

    def update(self, x):
        h = self.h.value
        xb, hb = x.reshape((-1, 2, 2)), h.reshape((-1, 2, 3))
        a = ops.einsum("bih,hie->beh", xb, self.W_in.value).swapaxes(1, 2)
        r = ops.einsum("bhd,hde->bhe", hb, self.W_rec.value)
        self.h.value = 0.7 * h + jnp.tanh((a + r).reshape(h.shape))
        return self.h.value


def _einsum_heads_oracle(params, h, x, ctx):
    """The ETP outputs in the op's canonical layout ``(batch, heads * out)``."""
    hp = h[P("h")]
    xb, hb = x.reshape((-1, 2, 2)), hp.reshape((-1, 2, 3))
    n = xb.shape[0]
    a = jnp.einsum("bih,hie->bhe", xb, params[P("W_in")]).reshape(n, 6)
    r = jnp.einsum("bhd,hde->bhe", hb, params[P("W_rec")]).reshape(n, 6)
    a, r = ctx.etp(P("W_in"), a), ctx.etp(P("W_rec"), r)
    h1 = ctx.hidden(P("h"), 0.7 * hp + jnp.tanh((a + r).reshape(hp.shape)))
    return h1, {P("h"): h1}


# ---------------------------------------------------------------------------- the case table


def positive_input(n):
    """Positive inputs (times `sign`): the sign picks the branch of CondCell."""
    return lambda batch, sign=1.0: sign * (jnp.abs(rand(99, *_bshape(batch, n))) + 0.1)


def signed_input(n):
    """Standard normal inputs of size n (times `sign`)."""
    return lambda batch, sign=1.0: sign * rand(98, *_bshape(batch, n))


def image_input(batch, sign=1.0):
    return sign * rand(97, *_bshape(batch, 1, 5, 5))


def initialised(cls, **kw):
    """``make(batch)``: build ``cls(**kw)`` and initialise its states for ``batch``."""

    def make(batch):
        model = cls(**kw)
        brainstate.nn.init_all_states(model, batch)
        return model

    return make


RNN_H = G("rnn.h")

CASES = (
    Case(
        "rnn",
        initialised(RNNReadout),
        signed_input(3),
        groups=(RNN_H,),
        relations=((P("rnn.W_ih.weight"), (RNN_H,)), (P("rnn.W_hh.weight"), (RNN_H,))),
        untraced=(P("out.weight"), P("out.bias")),
        oracle=_rnn_oracle,
    ),
    Case(
        "gru2",
        initialised(TwoLayerGRU),
        signed_input(3),
        groups=(G("rnn1.h"), G("rnn2.h")),
        relations=(
            (P("rnn1.W_ih.weight"), (G("rnn1.h"),)),
            (P("rnn1.W_hh.weight"), (G("rnn1.h"),)),
            (P("rnn2.W_ih.weight"), (G("rnn2.h"),)),
            (P("rnn2.W_hh.weight"), (G("rnn2.h"),)),
        ),
        untraced=(P("out.weight"), P("out.bias")),
        oracle=_gru2_oracle,
    ),
    Case(
        "lstm",
        initialised(LSTMReadout),
        signed_input(3),
        groups=(G("lstm.h", "lstm.c"),),
        relations=(
            (P("lstm.W_ih.weight"), (G("lstm.h", "lstm.c"),)),
            (P("lstm.W_hh.weight"), (G("lstm.h", "lstm.c"),)),
        ),
        untraced=(P("out.weight"), P("out.bias")),
        oracle=_lstm_oracle,
    ),
    Case(
        "lif",
        initialised(LIFReadout),
        signed_input(3),
        groups=(G("lif.V", "lif.a"),),
        relations=(
            (P("lif.W_in.weight"), (G("lif.V", "lif.a"),)),
            (P("lif.W_rec.weight"), (G("lif.V", "lif.a"),)),
        ),
        untraced=(P("out.weight"), P("out.bias")),
        oracle=_lif_oracle,
        hidden_ranges={"V": (0.6, 1.4), "a": (0.0, 0.5)},
    ),
    Case(
        "lif_ff",
        initialised(LIFReadout, recurrent=False),
        signed_input(3),
        groups=(G("lif.V", "lif.a"),),
        relations=((P("lif.W_in.weight"), (G("lif.V", "lif.a"),)),),
        untraced=(P("out.weight"), P("out.bias")),
        oracle=lambda p, h, x, ctx: _lif_oracle(p, h, x, ctx, recurrent=False),
        full_exact=True,
        hidden_ranges={"V": (0.6, 1.4), "a": (0.0, 0.5)},
    ),
    Case(
        "conv_rnn",
        initialised(ConvRNN),
        image_input,
        groups=(RNN_H,),
        relations=((P("rnn.W_ih.weight"), (RNN_H,)), (P("rnn.W_hh.weight"), (RNN_H,))),
        untraced=(P("conv.weight"), P("conv.bias"), P("out.weight"), P("out.bias")),
        oracle=_conv_oracle,
    ),
    Case(
        "coupled",
        initialised(CoupledCell),
        signed_input(3),
        groups=(G("u", "v"),),
        relations=(
            (P("decay"), (G("u", "v"),)),
            (P("W_u.weight"), (G("u", "v"),)),
            (P("W_v.weight"), (G("u", "v"),)),
        ),
        untraced=(),
        oracle=_coupled_oracle,
        full_exact=True,
    ),
    Case(
        "cond",
        initialised(CondCell),
        positive_input(3),
        groups=(G("h"),),
        relations=((P("W_a.weight"), (G("h"),)), (P("W_b.weight"), (G("h"),))),
        untraced=(),
        oracle=_cond_oracle,
        full_exact=True,
    ),
    Case(
        "tied",
        initialised(TiedLeaky),
        signed_input(4),
        groups=(G("h1"), G("h2")),
        relations=((P("W.weight"), (G("h1"),)), (P("W.weight"), (G("h2"),))),
        untraced=(P("out.weight"), P("out.bias")),
        oracle=_tied_oracle,
    ),
    Case(
        "fused",
        initialised(FusedGateCell),
        signed_input(3),
        groups=(G("h"),),
        relations=((P("weight"), (G("h"),)),),
        untraced=(),
        oracle=_fused_oracle,
        full_exact=True,
    ),
    Case(
        "fanout",
        initialised(FanOut),
        signed_input(3),
        groups=(G("h1"), G("h2")),
        relations=((P("W.weight"), (G("h1"), G("h2"))), (P("W_r.weight"), (G("h1"),))),
        untraced=(),
        oracle=_fanout_oracle,
    ),
    Case(
        "leaky",
        initialised(LeakyReadout),
        signed_input(3),
        groups=(G("cell.h"),),
        relations=((P("cell.W_in.weight"), (G("cell.h"),)),),
        untraced=(P("out.weight"), P("out.bias")),
        oracle=_leaky_oracle,
        full_exact=True,
    ),
    Case(
        "skip",
        initialised(SkipCell),
        signed_input(3),
        groups=(G("h"),),
        relations=((P("W.weight"), (G("h"),)),),
        untraced=(),
        oracle=_skip_oracle,
        full_exact=True,
    ),
    Case(
        "partial",
        initialised(PartialFused),
        signed_input(3),
        groups=(G("h"),),
        relations=((P("W.weight"), (G("h"),)),),
        untraced=(),
        oracle=_partial_oracle,
        full_exact=True,
    ),
    Case(
        "conv_leaky",
        initialised(ConvLeaky),
        image_input,
        groups=(G("h"),),
        relations=((P("conv_in.weight"), (G("h"),)), (P("conv_rec.weight"), (G("h"),))),
        untraced=(),
        oracle=_conv_leaky_oracle,
    ),
    Case(
        "einsum_heads",
        initialised(EinsumHeads),
        signed_input(4),
        groups=(G("h"),),
        relations=((P("W_in"), (G("h"),)), (P("W_rec"), (G("h"),))),
        untraced=(),
        oracle=_einsum_heads_oracle,
    ),
)

# cases whose relation outputs also reach the model output by a path that avoids hidden states
SKIP_PATH_CASES = frozenset({"skip", "partial"})

CASE_BY_NAME = {c.name: c for c in CASES}


# ---------------------------------------------------------------------------- special models


class CounterRNN(brainstate.nn.Module):
    """A vanilla RNN with a non-hidden ``ShortTermState`` step counter and a readout."""

    def __init__(self, n_in=3, n=4, n_out=2):
        super().__init__()
        self.rnn = nn.VanillaRNNCell(n_in, n, w_init=uinit(30), b_init=uinit(300))
        self.out = nn.Linear(n, n_out, w_init=uinit(31), b_init=uinit(310))
        self.count = brainstate.ShortTermState(jnp.zeros(()))

    def update(self, x):
        self.count.value = self.count.value + 1.0
        return self.out(self.rnn(x))


class FeedForward(brainstate.nn.Module):
    """No hidden state at all: two Linear layers."""

    def __init__(self, n_in=3, n=4, n_out=2):
        super().__init__()
        self.l1 = nn.Linear(n_in, n, w_init=uinit(32), b_init=uinit(320))
        self.l2 = nn.Linear(n, n_out, w_init=uinit(33), b_init=uinit(330))

    def update(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


@jax.jit
def _jitted_leak(h, y):
    return 0.8 * h + 0.2 * jnp.tanh(y) * jnp.cos(h)


class NestedJitLeaky(RecurrentModule):
    """Leaky cell whose element-wise update runs inside a nested ``jax.jit``."""

    state_names = ("h",)

    def __init__(self, n_in=3, n=4):
        super().__init__((n,))
        self.W = nn.Linear(n_in, n, w_init=uinit(34), b_init=uinit(340))

    def update(self, x):
        h = _jitted_leak(self.h.value, self.W(x))
        self.h.value = h
        return h


def nested_jit_oracle(params, h, x, ctx):
    y = _mm(params, ctx, ("W",), x)
    h1 = ctx.hidden(P("h"), 0.8 * h[P("h")] + 0.2 * jnp.tanh(y) * jnp.cos(h[P("h")]))
    return h1, {P("h"): h1}


class SubstepLeaky(RecurrentModule):
    """A leaky integrator sub-stepped 3 times by a weight-free ``lax.fori_loop`` (a scan)."""

    state_names = ("h",)

    def __init__(self, n_in=3, n=4, substeps=3):
        super().__init__((n,))
        self.W = nn.Linear(n_in, n, w_init=uinit(35), b_init=uinit(350))
        self.substeps = substeps

    def update(self, x):
        y = self.W(x)
        h = lax.fori_loop(
            0, self.substeps, lambda i, h: h + 0.25 * (-h + jnp.tanh(y + h)), self.h.value
        )
        self.h.value = h
        return h


def substep_oracle(params, h, x, ctx, substeps=3):
    y = _mm(params, ctx, ("W",), x)
    hh = h[P("h")]
    for _ in range(substeps):
        hh = hh + 0.25 * (-hh + jnp.tanh(y + hh))
    hh = ctx.hidden(P("h"), hh)
    return hh, {P("h"): hh}


class WhileLeaky(RecurrentModule):
    """Like :class:`SubstepLeaky`, with a ``lax.while_loop`` carrying a counter."""

    state_names = ("h",)

    def __init__(self, n_in=3, n=4):
        super().__init__((n,))
        self.W = nn.Linear(n_in, n, w_init=uinit(36), b_init=uinit(360))

    def update(self, x):
        y = self.W(x)

        def body(carry):
            i, h = carry
            return i + 1, h + 0.25 * (-h + jnp.tanh(y + h))

        _, h = lax.while_loop(lambda c: c[0] < 3, body, (0, self.h.value))
        self.h.value = h
        return h


class WhileMixInput(RecurrentModule):
    """The input goes through a weight-free ``lax.while_loop`` that mixes positions (a roll)."""

    state_names = ("h",)

    def __init__(self, n_in=3, n=4):
        super().__init__((n,))
        self.W = nn.Linear(n_in, n, w_init=uinit(41), b_init=uinit(410))

    def update(self, x):
        def body(carry):
            i, v = carry
            return i + 1, v + 0.5 * jnp.roll(v, 1, axis=-1)

        _, xm = lax.while_loop(lambda c: c[0] < 2, body, (0, x))
        h = 0.9 * self.h.value + jnp.tanh(self.W(xm))
        self.h.value = h
        return h


def while_mix_oracle(params, h, x, ctx):
    for _ in range(2):
        x = x + 0.5 * jnp.roll(x, 1, axis=-1)
    h1 = ctx.hidden(P("h"), 0.9 * h[P("h")] + jnp.tanh(_mm(params, ctx, ("W",), x)))
    return h1, {P("h"): h1}


class WeightInScan(RecurrentModule):
    """A recurrent weight used inside a ``lax.scan`` of length 2 (unrolled by the compiler)."""

    state_names = ("h",)

    def __init__(self, n=4):
        super().__init__((n,))
        self.W_hh = nn.Linear(n, n, bias=False, w_init=uinit(37))

    def update(self, x):
        w = self.W_hh.weight.value

        def body(h, _):
            return jnp.tanh(ops.matmul(h, w) + x), None

        h, _ = lax.scan(body, self.h.value, None, length=2)
        self.h.value = h
        return h


class ShapeChanging(brainstate.nn.Module):
    """A HiddenState whose shape changes over one step (bad input)."""

    def __init__(self, n=3):
        super().__init__()
        self.W = nn.Linear(n, n, w_init=uinit(38), b_init=uinit(380))
        self.h = brainstate.HiddenState(jnp.zeros(n))

    def update(self, x):
        self.h.value = jnp.stack([self.h.value, self.W(x)])
        return x


class ParamWriter(brainstate.nn.Module):
    """Writes one of its ParamStates inside the step (bad input)."""

    def __init__(self, n=3):
        super().__init__()
        self.W = nn.Linear(n, n, w_init=uinit(39), b_init=uinit(390))
        self.h = brainstate.HiddenState(jnp.zeros(n))

    def update(self, x):
        self.h.value = 0.5 * self.h.value + self.W(x)
        self.W.bias.value = self.W.bias.value * 0.99
        return self.h.value


def unit_of_output(varshape, n_out_cols, col_to_unit):
    """Expected y_to_hidden of a matmul whose column o lands in unit col_to_unit(o)."""
    rows = int(np.prod(varshape[:-1], dtype=int))
    n = varshape[-1]
    out = np.array([[r * n + col_to_unit(o) for o in range(n_out_cols)] for r in range(rows)])
    return out.reshape(tuple(varshape[:-1]) + (n_out_cols,))


# ---------------------------------------------------------------------------- oracles


def relation_keys(graph):
    """Per relation, its oracle key ``(weight_path, n)``: the n-th ETP use of that weight."""
    from etrace_core.compiler.relations import etp_operands
    from etrace_core.ops import is_etp_primitive

    minfo = graph.module_info
    path_of = {v: p for p, v in minfo.param_invars.items()}
    counts, key_of = {}, {}
    for eqn in minfo.jaxpr.eqns:
        if not is_etp_primitive(eqn.primitive):
            continue
        _, w, _ = etp_operands(eqn)
        path = path_of.get(w)
        if path is None:
            continue
        n = counts.get(path, 0)
        counts[path] = n + 1
        key_of[id(eqn)] = (path, n)
    return [key_of[id(r.eqn)] for r in graph.hidden_param_op_relations]


def oracle_forward(case, params, h_prev, x):
    """(outputs, h_new, {etp key: y}) of the hand-written step."""
    ctx = Ctx()
    out, h_new = case.oracle(params, h_prev, x, ctx)
    return out, h_new, ctx.ys


class Oracles(NamedTuple):
    outputs: Any
    h_new: dict[Path, Any]
    ys: dict[tuple[Path, int], Any]  # every ETP output, by (weight path, use)
    dh_dh_cut: dict[Path, dict[Path, Any]]  # [dst][src]: varshape + varshape, ETP outputs fixed
    dh_dh_full: Optional[dict]  # [dst][src]: the full step Jacobian (full_exact cases)
    dh_dy: dict[Path, dict[Any, Any]]  # [dst][etp key]: varshape + y shape, others fixed
    dL_dh: dict[Path, Any]  # L = sum(outputs * cot), h^t perturbed where made
    dL_dx: Any  # same-step dL/dx


def oracles(case, params, h_prev, x, cot, keys=None) -> Oracles:
    """Every oracle quantity of one step, in one jitted computation (one XLA compilation).

    ``dh_dy`` covers the ETP uses in ``keys`` (default: all); ``dh_dh_full`` is only computed
    for ``case.full_exact`` cases (else None).
    """
    ys = oracle_forward(case, params, h_prev, x)[2]
    keys = list(ys) if keys is None else list(keys)

    @jax.jit
    def run(params, h_prev, x, cot):
        out, h_new, _ = oracle_forward(case, params, h_prev, x)
        cut = jax.jacfwd(lambda h: case.oracle(params, h, x, Ctx(cut=True))[1])(h_prev)
        full = (
            jax.jacfwd(lambda h: case.oracle(params, h, x, Ctx())[1])(h_prev)
            if case.full_exact
            else None
        )
        dy0 = {k: jnp.zeros_like(ys[k]) for k in keys}
        dh_dy = jax.jacobian(lambda dy: case.oracle(params, h_prev, x, Ctx(cut=True, dy=dy))[1])(
            dy0
        )

        def loss(p, x):
            return jnp.sum(case.oracle(params, h_prev, x, Ctx(p=p))[0] * cot)

        p0 = {p: jnp.zeros_like(v) for p, v in h_prev.items()}
        dl_dh, dl_dx = jax.grad(loss, argnums=(0, 1))(p0, x)
        return Oracles(out, h_new, {}, cut, full, dh_dy, dl_dh, dl_dx)

    return run(params, h_prev, x, cot)._replace(ys=ys)
