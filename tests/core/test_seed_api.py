"""braintrace's API forms (issue 10): compile semantics, constructors, units, pytree states, x64.

Oracles: jax.grad through the unrolled steps (BPTT) in float64, relative/absolute error <= 1e-10
unless stated; jax.lax convolution; plain jnp formulas for layer outputs.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import brainstate
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import etrace_core
from etrace_core import nn
from etrace_core.nn import surrogate

REPO = pathlib.Path(__file__).resolve().parents[2]
TOL = 1e-10


def _sum_grads(f, *seqs):
    total = None
    for t in range(seqs[0].shape[0]):
        g = f(*(s[t] for s in seqs))
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    return total


def _online_grads(algo, xs, ys=None):
    params = algo.model.states(brainstate.ParamState)
    if ys is None:
        loss = lambda x: jnp.sum(algo(x) ** 2)
        return _sum_grads(brainstate.transform.grad(loss, params), xs)
    loss = lambda x, y: jnp.sum((algo(x) - y) ** 2)
    return _sum_grads(brainstate.transform.grad(loss, params), xs, ys)


def _max_abs(a, b):
    return max(
        float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


# ============================================================== item 5: pytree-valued states


class DictCell(brainstate.nn.Module):
    """The issue's cell: ``ParamState({'weight': W, 'bias': b})`` used as
    ``matmul(h, p['weight'], p['bias'])`` (recurrent) or ``matmul(x, ...)`` with a leaky,
    element-wise recurrence (D-RTRL exact over many steps)."""

    def __init__(self, recurrent: bool, h0):
        super().__init__()
        k = jax.random.split(jax.random.PRNGKey(0), 2)
        self.recurrent = recurrent
        self.p = brainstate.ParamState(
            {
                "weight": 0.4 * jax.random.normal(k[0], (4, 4)),
                "bias": 0.1 * jax.random.normal(k[1], (4,)),
            }
        )
        self.h = brainstate.HiddenState(h0)

    def update(self, x):
        w, b = self.p.value["weight"], self.p.value["bias"]
        if self.recurrent:
            h = jnp.tanh(etrace_core.matmul(self.h.value, w, b) + x)
        else:
            h = jnp.tanh(0.5 * self.h.value + etrace_core.matmul(x, w, b))
        self.h.value = h
        return h


def _dict_bptt(recurrent, p, h0, xs):
    def loss(p):
        h, total = h0, 0.0
        for x in xs:
            pre = (
                (h @ p["weight"] + p["bias"] + x)
                if recurrent
                else (0.5 * h + x @ p["weight"] + p["bias"])
            )
            h = jnp.tanh(pre)
            total = total + jnp.sum(h**2)
        return total

    return jax.grad(loss)(p)


@pytest.mark.parametrize("recurrent,T", [(True, 1), (False, 6)])
def test_dict_param_state_cell_drtrl_equals_bptt(x64, recurrent, T):
    h0 = jax.random.normal(jax.random.PRNGKey(2), (1, 4))
    cell = DictCell(recurrent, h0)
    xs = jax.random.normal(jax.random.PRNGKey(5), (T, 1, 4))
    p0 = cell.p.value
    algo = etrace_core.D_RTRL(cell)
    algo.compile_graph(xs[0])  # compiles ("changes from [4, 4] to [1, 4]" before)
    got = _online_grads(algo, xs)[("p",)]
    assert isinstance(got, dict) and set(got) == {"weight", "bias"}
    ref = _dict_bptt(recurrent, p0, h0, xs)
    for k in ref:
        assert got[k].dtype == jnp.float64
        np.testing.assert_allclose(got[k], ref[k], rtol=TOL, atol=TOL)
    # the state keeps its dict value; the graph names its leaves
    assert set(cell.p.value) == {"weight", "bias"}
    (rel,) = algo.graph.hidden_param_op_relations
    assert rel.trainable_paths == {"weight": ("p", "weight"), "bias": ("p", "bias")}
    assert rel.connected_hidden_paths == (("h",),)
    traces = algo.get_etrace_of(cell.p)  # by ParamState
    assert traces and traces == algo.get_etrace_of(("p",))


def test_dict_short_term_state_and_dict_element_wise_param(x64):
    """A dict-valued ShortTermState written every step, and a dict ParamState whose entries are
    a matmul weight and an element-wise decay: D-RTRL = BPTT for both entries."""

    class Cell(brainstate.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = brainstate.ParamState(
                {"w": 0.3 * jnp.ones((3, 2)), "decay": jnp.array([0.2, 0.6])}
            )
            self.h = brainstate.HiddenState(jnp.zeros((1, 2)))
            self.log = brainstate.ShortTermState({"n": jnp.zeros(()), "last": jnp.zeros((1, 2))})

        def update(self, x):
            d = etrace_core.element_wise(self.p.value["decay"], weight_fn=jax.nn.sigmoid)
            h = d * self.h.value + jnp.tanh(etrace_core.matmul(x, self.p.value["w"]))
            self.h.value = h
            self.log.value = {"n": self.log.value["n"] + 1, "last": h}
            return h

    cell = Cell()
    p0 = cell.p.value
    xs = jax.random.normal(jax.random.PRNGKey(3), (4, 1, 3))
    algo = etrace_core.D_RTRL(cell)
    algo.compile_graph(xs[0])
    got = _online_grads(algo, xs)[("p",)]
    assert float(cell.log.value["n"]) == 4.0
    np.testing.assert_allclose(cell.log.value["last"], cell.h.value)

    def loss(p):
        h, total = jnp.zeros((1, 2)), 0.0
        for x in xs:
            h = jax.nn.sigmoid(p["decay"]) * h + jnp.tanh(x @ p["w"])
            total = total + jnp.sum(h**2)
        return total

    ref = jax.grad(loss)(p0)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=TOL, atol=TOL)


# ============================================================== item 1 and 4: compile semantics


class LeakyNet(brainstate.nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LeakyRNNCell(3, 4, tau=4.0, key=0)
        self.out = nn.Linear(4, 2, key=1)

    def update(self, x):
        return self.out(self.rnn(x))


@pytest.mark.parametrize(
    "cls", [etrace_core.D_RTRL, etrace_core.ES_D_RTRL, etrace_core.HybridDimVjpAlgorithm]
)
def test_compile_graph_creates_traces(cls):
    model = LeakyNet()
    brainstate.nn.init_all_states(model, batch_size=2)
    algo = cls(model)
    assert not algo.is_compiled
    x = jnp.ones((2, 3))
    algo.compile_graph(x)
    assert algo.is_compiled
    assert algo(x).shape == (2, 2)
    assert int(algo.running_index.value) == 1
    assert algo.graph_executor is algo.executor
    assert set(algo.param_states) == set(model.states(brainstate.ParamState))
    assert set(algo.hidden_states) == {("rnn", "h")}


def test_compile_one_call_matches_manual_setup(x64):
    xs = jax.random.normal(jax.random.PRNGKey(0), (5, 2, 3))
    manual_model = LeakyNet()
    brainstate.nn.init_all_states(manual_model, batch_size=2)
    manual = etrace_core.ES_D_RTRL(manual_model, decay_or_rank=0.5)
    manual.compile_graph(xs[0])
    manual.init_etrace_state()
    model = LeakyNet()
    learner = etrace_core.compile(model, "pp_prop", xs[0], batch_size=2, decay_or_rank=0.5)
    assert isinstance(learner, etrace_core.IODimVjpAlgorithm) and learner.is_compiled
    assert learner.decay == 0.5
    assert _max_abs(_online_grads(learner, xs), _online_grads(manual, xs)) == 0.0
    for name, cls in [
        ("D_RTRL", etrace_core.ParamDimVjpAlgorithm),
        ("es_d_rtrl", etrace_core.IODimVjpAlgorithm),
        (etrace_core.HybridDimVjpAlgorithm, etrace_core.HybridDimVjpAlgorithm),
    ]:
        assert type(etrace_core.compile(LeakyNet(), name, xs[0], batch_size=2)) is cls


def test_compile_errors():
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="unknown algorithm name 'rtrl'"):
        etrace_core.compile(LeakyNet(), "rtrl", x)
    with pytest.raises(etrace_core.NotSupportedError, match="'snap' is not implemented"):
        etrace_core.compile(LeakyNet(), "snap", x)
    with pytest.raises(ValueError, match="at least one example input"):
        etrace_core.compile(LeakyNet(), "d_rtrl")
    assert issubclass(etrace_core.NotSupportedError, NotImplementedError)

    class Plain(brainstate.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = brainstate.ParamState(jnp.ones((3, 4)))
            self.h = brainstate.HiddenState(jnp.zeros((2, 4)))

        def update(self, x):
            self.h.value = jnp.tanh(x @ self.w.value + self.h.value)
            return self.h.value

    with pytest.raises(etrace_core.CompilationError, match="no trainable weight"):
        etrace_core.compile(Plain(), "d_rtrl", x)


def test_trace_dtype_and_fast_solve(x64):
    model = LeakyNet()
    brainstate.nn.init_all_states(model, batch_size=2)
    algo = etrace_core.D_RTRL(model, trace_dtype=jnp.float32, fast_solve=False)
    x = jnp.ones((2, 3))
    algo.compile_graph(x)
    algo(x)
    algo(x)
    leaves = jax.tree.leaves(algo.etrace.value["traces"])
    assert leaves and all(t.dtype == jnp.float32 for t in leaves)
    assert model.rnn.h.value.dtype == jnp.float64 and algo.fast_solve is False


def test_compile_etrace_graph_without_perturbation():
    model = LeakyNet()
    brainstate.nn.init_all_states(model, batch_size=2)
    x = jnp.ones((2, 3))
    assert etrace_core.compile_etrace_graph(model, x).hidden_perturb is not None
    graph = etrace_core.compile_etrace_graph(model, x, include_hidden_perturb=False)
    assert graph.hidden_perturb is None and len(graph.hidden_param_op_relations) == 1


# ============================================================== item 3: brainunit quantities


class UnitLIF(brainstate.nn.Module):
    """A LIF layer written as brainstate's spiking models are: V in mV, tau and dt in ms, the
    input weight in mV, threshold and rest potential in mV."""

    def __init__(self, n_in, n):
        super().__init__()
        w = jax.random.uniform(jax.random.PRNGKey(3), (n_in, n), minval=0.0, maxval=4.0)
        self.W = brainstate.ParamState(w * u.mV)
        self.tau, self.dt = 10.0 * u.ms, 1.0 * u.ms
        self.V_th, self.V_rest = 1.0 * u.mV, 0.0 * u.mV
        self.n = n

    def init_state(self, batch_size=None, **kwargs):
        self.V = brainstate.HiddenState(jnp.zeros((batch_size, self.n)) * u.mV)

    def update(self, x):
        V = self.V.value
        s = surrogate.spike_fn((V - self.V_th) / self.V_th)
        current = etrace_core.matmul(x, self.W.value)  # mV
        V = V + self.dt / self.tau * (self.V_rest - V + current) - s * self.V_th
        self.V.value = V
        return surrogate.spike_fn((V - self.V_th) / self.V_th)


def _unit_lif_bptt(W, xs, ys):
    def loss(w):
        W = w * u.mV
        V, total = jnp.zeros((xs.shape[1], W.shape[1])) * u.mV, 0.0
        for x, y in zip(xs, ys):
            s = surrogate.spike_fn((V - 1 * u.mV) / (1 * u.mV))
            V = V + (1 * u.ms) / (10 * u.ms) * (0 * u.mV - V + x @ W) - s * (1 * u.mV)
            total = total + jnp.sum((surrogate.spike_fn((V - 1 * u.mV) / (1 * u.mV)) - y) ** 2)
        return total

    return jax.grad(loss)(W)


def test_units_lif_drtrl_equals_bptt_and_trains_online(x64):
    xs = jax.random.uniform(jax.random.PRNGKey(1), (8, 2, 3))
    ys = jax.random.uniform(jax.random.PRNGKey(2), (8, 2, 4))
    model = UnitLIF(3, 4)
    W0 = model.W.value
    learner = etrace_core.compile(model, "d_rtrl", xs[0], batch_size=2)
    g = _online_grads(learner, xs, ys)[("W",)]
    assert isinstance(model.V.value, u.Quantity) and model.V.value.unit == u.mV
    assert u.get_mantissa(g).dtype == jnp.float64
    ref = _unit_lif_bptt(W0.mantissa, xs, ys)
    np.testing.assert_allclose(u.get_mantissa(g), ref, rtol=1e-9, atol=TOL)
    assert float(jnp.max(jnp.abs(ref))) > 1e-3

    # online training with the unit-carrying weight: the sequence loss goes down
    def seq_loss():
        learner.init_etrace_state()
        model.reset_state(batch_size=2)
        return sum(float(jnp.sum((learner(x) - y) ** 2)) for x, y in zip(xs, ys))

    before = seq_loss()
    for _ in range(15):
        model.reset_state(batch_size=2)
        learner.init_etrace_state()
        grad = _online_grads(learner, xs, ys)[("W",)]
        model.W.value = model.W.value - 0.5 * grad
    assert model.W.value.unit == u.mV
    assert seq_loss() < before


def test_units_through_ops_and_element_wise():
    x = jnp.ones((2, 3)) * u.mV
    w = jnp.full((3, 4), 2.0) * u.mS
    y = etrace_core.matmul(x, w, bias=jnp.ones(4) * u.uA)
    assert y.unit == u.uA and np.allclose(y.mantissa, 7.0)
    with pytest.raises(u.UnitMismatchError):
        etrace_core.matmul(x, w, jnp.ones(4))
    tau = etrace_core.element_wise(jnp.full((3,), 2.0) * u.ms)
    assert tau.unit == u.ms and np.allclose(tau.mantissa, 2.0)


# ============================================================== item 4: op forms


def test_matmul_bias_keyword_and_weight_fn_gradients(x64):
    """``matmul(x, w, bias=b, weight_fn=f)`` = x @ f(w) + b; D-RTRL through it = BPTT."""
    mask = (jnp.arange(12).reshape(3, 4) % 3 != 0).astype(float)

    class Cell(brainstate.nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.fn = fn
            self.w = brainstate.ParamState(0.5 * jax.random.normal(jax.random.PRNGKey(0), (3, 4)))
            self.b = brainstate.ParamState(jnp.full((4,), 0.1))
            self.h = brainstate.HiddenState(jnp.zeros((2, 4)))

        def update(self, x):
            y = etrace_core.matmul(x, self.w.value, bias=self.b.value, weight_fn=self.fn)
            self.h.value = jnp.tanh(0.7 * self.h.value + y)
            return self.h.value

    xs = jax.random.normal(jax.random.PRNGKey(1), (5, 2, 3))
    masked = lambda w: w * mask
    for fn in (masked, jnp.tanh):
        cell = Cell(fn)
        w0, b0 = cell.w.value, cell.b.value
        algo = etrace_core.D_RTRL(cell)
        algo.compile_graph(xs[0])
        got = _online_grads(algo, xs)

        def loss(w, b):
            h, total = jnp.zeros((2, 4)), 0.0
            for x in xs:
                h = jnp.tanh(0.7 * h + x @ fn(w) + b)
                total = total + jnp.sum(h**2)
            return total

        rw, rb = jax.grad(loss, argnums=(0, 1))(w0, b0)
        np.testing.assert_allclose(got[("w",)], rw, rtol=TOL, atol=TOL)
        np.testing.assert_allclose(got[("b",)], rb, rtol=TOL, atol=TOL)
        if fn is masked:  # masked-out weights get exactly zero gradient
            assert float(jnp.max(jnp.abs(jnp.where(mask == 0, got[("w",)], 0.0)))) == 0.0
            assert float(jnp.max(jnp.abs(got[("w",)]))) > 1e-3
    with pytest.raises(ValueError, match="pass the bias once"):
        etrace_core.matmul(xs[0], w0, b0, bias=b0)
    with pytest.raises(ValueError, match="keep w's shape"):
        etrace_core.matmul(xs[0], w0, weight_fn=lambda w: w[:2])


def test_element_wise_braintrace_signature():
    w = jnp.array([0.5, -1.0, 2.0])
    np.testing.assert_allclose(etrace_core.element_wise(w), w)
    np.testing.assert_allclose(etrace_core.element_wise(w, weight_fn=jnp.exp), jnp.exp(w))
    np.testing.assert_allclose(etrace_core.element_wise(jnp.exp, w), jnp.exp(w))
    with pytest.raises(ValueError, match="give the function once"):
        etrace_core.element_wise(jnp.exp, w, weight_fn=jnp.exp)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_conv_strides_keyword_and_3d(dims):
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(k[0], (2, 3) + (7,) * dims)
    w = jax.random.normal(k[1], (4, 3) + (3,) * dims)
    b = jax.random.normal(k[2], (4,))
    y = etrace_core.conv(x, w, bias=b, strides=2, padding="VALID")
    spec = {1: ("NCH", "OIH", "NCH"), 2: ("NCHW", "OIHW", "NCHW"), 3: ("NCDHW", "OIDHW", "NCDHW")}[
        dims
    ]
    ref = jax.lax.conv_general_dilated(x, w, (2,) * dims, "VALID", dimension_numbers=spec)
    ref = ref + b.reshape((-1,) + (1,) * dims)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "numbers",
    [("NWC", "WIO", "NWC"), ("NCW", "WIO", "NCW"), ("NWC", "OIW", "NWC"), ("NHWC", "HWIO", "NHWC")],
)
def test_conv_dimension_numbers_drtrl_equals_bptt(x64, numbers):
    """lax-style layouts: channels-last data is moved around the op, a channels-last kernel is
    read in place (still the traced operand); D-RTRL = BPTT on a leaky conv cell."""
    n = len(numbers[0]) - 2
    k = jax.random.split(jax.random.PRNGKey(1), 3)
    c_in, c_out, size = 2, 3, 5
    spatial = (size,) * n
    kernel_shape = (
        (3,) * n + (c_in, c_out) if numbers[1].endswith("IO") else (c_out, c_in) + (3,) * n
    )
    w0 = 0.3 * jax.random.normal(k[0], kernel_shape)
    b0 = 0.1 * jax.random.normal(k[1], (c_out,))
    last = numbers[0].endswith("C")
    x_shape = (2,) + (spatial + (c_in,) if last else (c_in,) + spatial)
    h_shape = (2,) + (spatial + (c_out,) if last else (c_out,) + spatial)
    xs = jax.random.normal(k[2], (3,) + x_shape)

    def ref_conv(x, w, b):
        y = jax.lax.conv_general_dilated(x, w, (1,) * n, "SAME", dimension_numbers=numbers)
        return y + (b if last else b.reshape((-1,) + (1,) * n))

    np.testing.assert_allclose(
        etrace_core.conv(xs[0], w0, b0, padding="SAME", dimension_numbers=numbers),
        ref_conv(xs[0], w0, b0),
        rtol=TOL,
        atol=TOL,
    )

    class Net(brainstate.nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.b = brainstate.ParamState(w0), brainstate.ParamState(b0)
            self.h = brainstate.HiddenState(jnp.zeros(h_shape))

        def update(self, x):
            drive = etrace_core.conv(
                x, self.w.value, self.b.value, padding="SAME", dimension_numbers=numbers
            )
            self.h.value = jnp.tanh(0.6 * self.h.value + drive)
            return self.h.value

    learner = etrace_core.D_RTRL(Net())
    learner.compile_graph(xs[0])
    assert {r.weight_path for r in learner.graph.hidden_param_op_relations} == {("w",)}
    got = _online_grads(learner, xs)

    def loss(p):
        h, total = jnp.zeros(h_shape), 0.0
        for x in xs:
            h = jnp.tanh(0.6 * h + ref_conv(x, p[("w",)], p[("b",)]))
            total = total + jnp.sum(h**2)
        return total

    want = jax.grad(loss)({("w",): w0, ("b",): b0})
    assert _max_abs(got, want) < TOL
    with pytest.raises(etrace_core.NotSupportedError, match="dimension_numbers"):
        etrace_core.conv(xs[0], w0, dimension_numbers=("NWC", "WOI", "NCW"))


def test_conv_channels_last_kernel_grouped_canonical_gradient(x64):
    """A grouped conv with a ``(*K, C_in/g, C_out)`` kernel: the canonical-form gradient
    ``io_to_params(sum X^T G)`` equals ``jax.vjp`` of the op (kernel and bias, float64)."""
    import importlib

    conv_mod = importlib.import_module("etrace_core.ops.conv")
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    x = jax.random.normal(k[0], (2, 4, 6, 5))
    w = jax.random.normal(k[1], (3, 3, 2, 6))
    b = jax.random.normal(k[2], (6,))
    dn = ("NCHW", "HWIO", "NCHW")
    f = lambda w, b: etrace_core.conv(x, w, b, padding="SAME", groups=2, dimension_numbers=dn)
    ref = jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=dn, feature_group_count=2
    )
    np.testing.assert_allclose(f(w, b), ref + b[:, None, None], rtol=TOL, atol=TOL)
    ct = jax.random.normal(k[3], ref.shape)
    gw, gb = jax.vjp(f, w, b)[1](ct)
    eqn = next(e for e in jax.make_jaxpr(f)(w, b).jaxpr.eqns if e.primitive is conv_mod.etp_conv_p)
    X = conv_mod.x_canon(eqn.params, x, w)
    X = jnp.concatenate([X, jnp.ones(X.shape[:-1] + (1,))], -1)
    M = jnp.einsum("...i,...o->io", X, conv_mod.y_canon(eqn.params, ct))
    dw, db = conv_mod.io_to_params(eqn.params, w, M)
    np.testing.assert_allclose(dw, gw, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(db, gb, rtol=TOL, atol=TOL)


# ============================================================== item 2: constructor forms


def test_linear_constructor_forms():
    w, b = jnp.arange(6.0).reshape(2, 3), jnp.array([1.0, 2.0, 3.0])
    x = jnp.array([[1.0, -1.0]])
    for lin in (
        nn.Linear(2, 3, w, b),
        nn.Linear(in_size=2, out_size=3, w_init=w, b_init=b),
        nn.Linear((5, 2), (3,), lambda shape: w, lambda shape: b),
    ):
        np.testing.assert_allclose(lin(x), x @ w + b)
        assert lin.in_size[-1] == 2 and lin.out_size == (3,)
    no_bias = nn.Linear(2, 3, w, None)
    assert no_bias.bias is None
    np.testing.assert_allclose(no_bias(x), x @ w)
    mask = jnp.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    masked = nn.Linear(2, 3, w, b, mask)
    np.testing.assert_allclose(masked(x), x @ (w * mask) + b)
    g = jax.grad(lambda W: jnp.sum(etrace_core.matmul(x, W, weight_fn=masked._masked)))(w)
    assert float(jnp.max(jnp.abs(g * (1 - mask)))) == 0.0


def test_rnn_cell_constructor_forms():
    one = lambda shape: jnp.full(shape, 0.1)
    state = lambda shape: jnp.full(shape, 0.5)
    v = nn.VanillaRNNCell(3, 4, state, one, one, "relu")  # braintrace's positional order
    g = nn.GRUCell(3, 4, one, one, state, jax.nn.relu)
    l_ = nn.LSTMCell(
        in_size=3, out_size=4, w_init=one, b_init=one, state_init=state, activation="sigmoid"
    )
    for cell in (v, g, l_):
        cell.init_state(batch_size=2)
        assert cell.in_size == (3,) and cell.out_size == (4,)
        assert float(cell.h.value[0, 0]) == 0.5
        assert float(cell.W_ih.weight.value[0, 0]) == pytest.approx(0.1)
    x = jnp.ones((2, 3))
    h = jnp.full((2, 4), 0.5)
    np.testing.assert_allclose(
        v(x), jax.nn.relu(x @ jnp.full((3, 4), 0.1) + 0.1 + h @ jnp.full((4, 4), 0.1)), rtol=1e-6
    )
    gi = x @ jnp.full((3, 12), 0.1) + 0.1
    gh = h @ jnp.full((4, 12), 0.1) + 0.1
    r = jax.nn.sigmoid(gi[:, :4] + gh[:, :4])
    z = jax.nn.sigmoid(gi[:, 4:8] + gh[:, 4:8])
    n = jax.nn.relu(gi[:, 8:] + r * gh[:, 8:])
    np.testing.assert_allclose(g(x), (1 - z) * n + z * h, rtol=1e-6)
    c = jnp.full((2, 4), 0.5)
    gates = x @ jnp.full((3, 16), 0.1) + 0.1 + h @ jnp.full((4, 16), 0.1) + 0.1
    i, f, gg, o = jnp.split(gates, 4, axis=-1)
    c2 = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jax.nn.sigmoid(gg)
    np.testing.assert_allclose(l_(x), jax.nn.sigmoid(o) * jax.nn.sigmoid(c2), rtol=1e-6)
    nb = nn.GRUCell(3, 4, one, None)
    assert nb.W_ih.bias is None and nb.W_hh.bias is None
    leaky = nn.LeakyRNNCell(in_size=(3,), out_size=(4,), tau=2.0)
    assert leaky.num_in == 3 and leaky.num_out == 4


def test_braintools_initialisers():
    init = pytest.importorskip("braintools").init
    lin = nn.Linear(3, 4, init.Constant(0.5), init.ZeroInit())
    np.testing.assert_allclose(lin.weight.value, 0.5)
    np.testing.assert_allclose(lin.bias.value, 0.0)
    for w_init in (
        init.KaimingNormal(),
        init.VarianceScaling(1.0, "fan_in", "normal"),
        init.XavierNormal(),
        init.Orthogonal(),
    ):
        cell = nn.GRUCell(3, 5, w_init, init.ZeroInit())
        assert cell.W_ih.weight.value.shape == (3, 15)
        assert cell.W_ih.weight.value.dtype == jnp.result_type(float)
        assert float(jnp.std(cell.W_ih.weight.value)) > 0
    cell = nn.ValinaRNNCell(
        3, 4, state_init=init.Constant(1.0), w_init=init.Constant(0.5), b_init=init.Constant(0.1)
    )
    cell.init_state(batch_size=8)
    assert cell.h.value.shape == (8, 4) and jnp.allclose(cell.h.value, 1.0)
    lstm = nn.LSTMCell(in_size=3, out_size=4, w_init=init.KaimingNormal(), activation="tanh")
    lstm.init_state(batch_size=2)
    assert lstm(jnp.ones((2, 3))).shape == (2, 4)


# ============================================================== item 6: x64 across imports


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    env.pop("JAX_ENABLE_X64", None)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize("package", ["etrace_core", "etrace_bridge"])
@pytest.mark.parametrize("enable_first", [True, False])
def test_import_keeps_x64(package, enable_first):
    enable = "jax.config.update('jax_enable_x64', True)"
    code = f"""
        import jax
        {enable if enable_first else ""}
        import {package}
        {"" if enable_first else enable}
        import brainstate, jax.numpy as jnp
        assert jax.config.read('jax_enable_x64') is True, 'x64 lost'
        assert jnp.ones(2).dtype == jnp.float64
        print('ok')
    """
    r = _run(code)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]
    off = _run(f"""
        import jax
        import {package}
        assert jax.config.read('jax_enable_x64') is False
        print('ok')
    """)
    assert off.returncode == 0, off.stderr[-2000:]


@pytest.mark.parametrize("enable_first", [True, False])
def test_bridge_converts_float64_torch_model_after_either_import_order(enable_first):
    pytest.importorskip("torch")
    enable = "jax.config.update('jax_enable_x64', True)"
    r = _run(f"""
        import jax
        {enable if enable_first else ""}
        import etrace_bridge
        {"" if enable_first else enable}
        import numpy as np, torch, jax.numpy as jnp
        torch.manual_seed(0)
        cell = torch.nn.RNNCell(3, 4).double()
        x = torch.randn(2, 3, dtype=torch.float64)
        m = etrace_bridge.from_torch(cell, (x,))
        assert all(s.value.dtype == jnp.float64 for s in m.states().values())
        y = m(etrace_bridge.to_jax(x))
        ref = cell(x).detach().numpy()
        assert np.asarray(y).dtype == np.float64
        assert np.max(np.abs(np.asarray(y) - ref)) < 1e-12
        print('ok')
    """)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


# ============================================================== item 4: new layers


def _rand(*shape, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), shape)


def test_gated_cells_equations_and_online_step():
    x = _rand(2, 3)
    cells = (
        nn.MGUCell(3, 4, key=0),
        nn.MinimalRNNCell(3, 4, key=0),
        nn.MiniGRU(3, 4, key=0),
        nn.MiniLSTM(3, 4, key=0),
        nn.CFNCell(3, 4, activation="relu", key=0),
    )
    for cell in cells:
        brainstate.nn.init_all_states(cell, batch_size=2)
        cell.h.value = _rand(2, 4, seed=1)
        h = cell.h.value
        lin = lambda layer, v: v @ layer.weight.value + layer.bias.value
        if isinstance(cell, nn.MGUCell):
            f = jax.nn.sigmoid(lin(cell.Wf, jnp.concatenate([x, h], -1)))
            cand = jnp.tanh(lin(cell.Wh, jnp.concatenate([x, f * h], -1)))
            ref = (1 - f) * h + f * cand
        elif isinstance(cell, nn.MinimalRNNCell):
            z = lin(cell.phi, x)
            g = jax.nn.sigmoid(lin(cell.W_u, jnp.concatenate([z, h], -1)))
            ref = g * h + (1 - g) * z
        elif isinstance(cell, nn.MiniGRU):
            z = jax.nn.sigmoid(lin(cell.W_z, jnp.concatenate([x, h], -1)))
            ref = (1 - z) * h + z * lin(cell.W_x, x)
        elif isinstance(cell, nn.MiniLSTM):
            f = jax.nn.sigmoid(lin(cell.W_f, jnp.concatenate([x, h], -1)))
            i = jax.nn.sigmoid(lin(cell.W_i, jnp.concatenate([x, h], -1)))
            ref = f * h + i * lin(cell.W_x, x)
        else:  # CFN, relu
            f = jax.nn.sigmoid(lin(cell.Wf, jnp.concatenate([x, h], -1)))
            i = jax.nn.sigmoid(lin(cell.Wi, jnp.concatenate([x, h], -1)))
            ref = f * jax.nn.relu(h) + i * jax.nn.relu(lin(cell.Wh, x))
        np.testing.assert_allclose(cell(x), ref, rtol=1e-5, atol=1e-6)
        learner = etrace_core.compile(cell, "d_rtrl", x, batch_size=2)
        grads = _online_grads(learner, x[None])
        assert set(grads) == set(cell.states(brainstate.ParamState))


def test_urlstm_cell_equations_and_multi_step_drtrl_is_bptt(x64):
    """UR-LSTM: the paper's gates (``g = r (1 - (1 - f)^2) + (1 - r) f^2``), the uniform gate
    bias in (logit(1/H), logit(1 - 1/H)); one multi-step window of the sequence = BPTT."""
    from .test_algorithms_exact import assert_grads_close, bptt_grads, mse, window_grads

    H = 4
    cell = nn.URLSTMCell(3, H, key=0)
    brainstate.nn.init_all_states(cell, batch_size=2)
    b = cell.bias.value
    assert b.shape == (H,) and bool(jnp.all(jnp.abs(b) <= np.log(H - 1) + 1e-12))
    assert {p[0] for p in cell.states(brainstate.ParamState)} == {"Wu", "Wf", "Wr", "Wo", "bias"}
    cell.h.value, cell.c.value = _rand(2, H, seed=1), _rand(2, H, seed=2)
    h, c, x = cell.h.value, cell.c.value, _rand(2, 3)
    xh = jnp.concatenate([x, h], -1)
    f = jax.nn.sigmoid(xh @ cell.Wf.weight.value + b)
    r = jax.nn.sigmoid(xh @ cell.Wr.weight.value - b)
    g = r * (1 - (1 - f) ** 2) + (1 - r) * f**2
    c_ref = g * c + (1 - g) * jnp.tanh(xh @ cell.Wu.weight.value)
    h_ref = jax.nn.sigmoid(xh @ cell.Wo.weight.value) * jnp.tanh(c_ref)
    np.testing.assert_allclose(cell(x), h_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cell.c.value, c_ref, rtol=1e-12, atol=1e-12)

    xs, ys = _rand(5, 2, 3, seed=3), _rand(5, 2, H, seed=4)
    _, ref = bptt_grads(cell, xs, ys)
    algo = etrace_core.D_RTRL(cell, vjp_method="multi-step")
    algo.compile_graph(xs[0])
    algo.init_etrace_state()
    traced = {r.weight_path for r in algo.graph.hidden_param_op_relations}
    assert {("Wu", "weight"), ("Wf", "weight"), ("Wr", "weight"), ("Wo", "weight")} <= traced
    assert algo.get_etrace_of(cell.bias)  # the element-wise bias: a parameter trace
    assert_grads_close(window_grads(algo, xs, ys, [5], loss=mse), ref)


def test_lru_cell_matches_complex_recurrence(x64):
    cell = nn.LRUCell(3, 5, key=0)
    brainstate.nn.init_all_states(cell, batch_size=2)
    xs = _rand(4, 2, 3)
    lam = jnp.exp(-jnp.exp(cell.nu_log.value) + 1j * jnp.exp(cell.theta_log.value))
    gamma = jnp.exp(cell.gamma_log.value)
    B = cell.B_re.weight.value + 1j * cell.B_im.weight.value
    C = cell.C_re.weight.value + 1j * cell.C_im.weight.value
    h = jnp.zeros((2, 5), complex)
    learner = etrace_core.compile(cell, "d_rtrl", xs[0], batch_size=2)
    for x in xs:
        h = lam * h + gamma * (x @ B)
        ref = (h @ C).real + x * cell.D.value
        np.testing.assert_allclose(learner(x), ref, rtol=1e-10, atol=1e-12)
    traced = {r.weight_path for r in learner.graph.hidden_param_op_relations}
    assert {("B_re", "weight"), ("B_im", "weight")} <= traced
    grads = _online_grads(learner, xs[:1])
    assert set(grads) == set(cell.states(brainstate.ParamState))


def test_linear_variants_and_embedding(x64):
    x = _rand(2, 3)
    sign = jnp.array([1.0, -1.0, 1.0, -1.0])
    s = nn.SignedWLinear(3, 4, w_sign=sign, key=0)
    np.testing.assert_allclose(s(x), x @ (jnp.abs(s.weight.value) * sign))
    ws = nn.ScaledWSLinear(3, 4, key=0)
    ref = x @ brainstate.nn.weight_standardization(ws.weight.value["weight"], 1e-4, None)
    np.testing.assert_allclose(ws(x), ref * ws.weight.value["gain"] + ws.weight.value["bias"])
    lora = nn.LoRA(3, 2, 4, key=0)
    p = lora.weight.value
    np.testing.assert_allclose(lora(x), x @ p["lora_a"] @ p["lora_b"] / 2)
    emb = nn.Embedding(6, 3, key=0)
    idx = jnp.array([[0, 5], [2, 2]])
    np.testing.assert_allclose(emb(idx), emb.weight.value[idx])
    with pytest.raises(NotImplementedError, match="padding_idx=0"):
        nn.Embedding(6, 3, padding_idx=0)
    # every offender with its value, in declaration order, and nothing else
    with pytest.raises(NotImplementedError) as err:
        nn.Embedding(6, 3, freeze=True, padding_idx=2, scale_grad_by_freq=True)
    assert str(err.value).startswith(
        "Embedding does not support: freeze=True, scale_grad_by_freq=True, padding_idx=2. "
    )
    # tuple sizes (..., features) are kept as given; the weight is (in features, out features)
    s2 = nn.SignedWLinear((2, 3), (2, 4), key=0)
    assert (s2.in_size, s2.out_size, s2.weight.value.shape) == ((2, 3), (2, 4), (3, 4))
    assert s2(_rand(5, 2, 3)).shape == (5, 2, 4)
    conv = nn.Conv3d(2, 3, 3, key=0)
    assert conv(_rand(1, 2, 4, 4, 4)).shape == (1, 3, 4, 4, 4)

    # weights behind a constraint are traced exactly: signed input weights of a leaky cell
    class Net(brainstate.nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.SignedWLinear(3, 4, w_sign=sign, key=1)
            self.h = brainstate.HiddenState(jnp.zeros((2, 4)))

        def update(self, x):
            self.h.value = jnp.tanh(0.8 * self.h.value + self.inp(x))
            return self.h.value

    net = Net()
    w0 = net.inp.weight.value
    xs = _rand(5, 2, 3, seed=4)
    learner = etrace_core.D_RTRL(net)
    learner.compile_graph(xs[0])
    got = _online_grads(learner, xs)[("inp", "weight")]

    def loss(w):
        h, total = jnp.zeros((2, 4)), 0.0
        for x in xs:
            h = jnp.tanh(0.8 * h + x @ (jnp.abs(w) * sign))
            total = total + jnp.sum(h**2)
        return total

    np.testing.assert_allclose(got, jax.grad(loss)(w0), rtol=TOL, atol=TOL)


def test_conv_layer_channels_last_form(x64):
    """brainstate's ``Conv2d(in_size=(H, W, C), out_channels, kernel_size)`` with its parameter
    layout (dict ParamState, kernel (*K, C_in, C_out), bias (1, 1, C_out)) equals lax's
    channels-last convolution; a masked kernel is traced: D-RTRL = BPTT on a leaky conv cell."""
    x = _rand(2, 6, 5, 3)
    layer = nn.Conv2d(
        in_size=(6, 5, 3), out_channels=4, kernel_size=3, stride=(2, 1), b_init=jnp.ones, key=0
    )
    p = layer.weight.value
    assert layer.kernel_shape == p["weight"].shape == (3, 3, 3, 4)
    assert p["bias"].shape == (1, 1, 4) and layer.bias is None
    ref = jax.lax.conv_general_dilated(
        x, p["weight"], (2, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    np.testing.assert_allclose(layer(x), ref + p["bias"], rtol=TOL, atol=TOL)
    assert layer.out_size == (3, 5, 4) and layer(x).shape[1:] == layer.out_size
    assert layer(x[0]).shape == (3, 5, 4)
    assert "bias" not in nn.Conv1d(in_size=(10, 3), out_channels=2, kernel_size=3).weight.value
    pad = nn.Conv2d(in_size=(6, 5, 3), out_channels=2, kernel_size=3, padding=[(1, 1), (0, 2)])
    assert pad.out_size == (6, 5, 2) and pad(x).shape == (2, 6, 5, 2)
    with pytest.raises(ValueError, match="in_size"):
        nn.Conv2d(in_size=(6, 3), out_channels=4, kernel_size=3)
    with pytest.raises(ValueError, match="'SAME' or 'VALID'"):
        nn.Conv2d(in_size=(6, 5, 3), out_channels=4, kernel_size=3, padding="FULL")
    with pytest.raises(ValueError, match="one entry"):
        nn.Conv2d(in_size=(6, 5, 3), out_channels=4, kernel_size=3, padding=[(1, 1)] * 3)
    with pytest.raises(ValueError, match=r"in_size=\(6, 5, 3\)"):
        layer(_rand(2, 7, 5, 3))
    first = nn.Conv2d(3, 4, 3, key=0)
    assert first.kernel_shape == first.weight.value.shape == (4, 3, 3, 3)

    mask = (jnp.arange(3 * 3 * 4).reshape(3, 3, 4) % 3 != 0).astype(float)

    class Net(brainstate.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(
                in_size=(5, 3), out_channels=4, kernel_size=3, b_init=jnp.ones, w_mask=mask, key=1
            )
            self.h = brainstate.HiddenState(jnp.zeros((2, 5, 4)))

        def update(self, x):
            self.h.value = jnp.tanh(0.6 * self.h.value + self.conv(x))
            return self.h.value

    net = Net()
    xs = _rand(4, 2, 5, 3, seed=3)
    learner = etrace_core.D_RTRL(net)
    learner.compile_graph(xs[0])
    traced = {r.weight_path for r in learner.graph.hidden_param_op_relations}
    assert traced == {("conv", "weight", "weight")}
    got = _online_grads(learner, xs)[("conv", "weight")]

    def loss(q):
        h, total = jnp.zeros((2, 5, 4)), 0.0
        for xt in xs:
            y = jax.lax.conv_general_dilated(
                xt, q["weight"] * mask, (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC")
            )
            h = jnp.tanh(0.6 * h + y + q["bias"])
            total = total + jnp.sum(h**2)
        return total

    want = jax.grad(loss)(net.conv.weight.value)
    assert _max_abs(got, want) < TOL
    assert float(jnp.max(jnp.abs(got["weight"] * (1 - mask)))) == 0.0
