"""``compile(model, algorithm, x, batch_size=B, vmap=True)``: the per-sample vmap of a learner.

Oracles (float64, absolute and relative error <= 1e-10): B separate runs of the unbatched model
(one sample each: same traces per sample, the vmap gradient is the sum of theirs);
``compile(..., batch_size=B)`` of the same model with batched states; ``jax.grad`` through the
unrolled steps (BPTT) for D-RTRL on a model where it is exact (element-wise recurrence).
"""

from __future__ import annotations

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import etrace_core
from etrace_core import nn

TOL = 1e-10
B, T = 3, 5


class LeakyNet(brainstate.nn.Module):
    """A recurrent cell (D-RTRL approximate: dense recurrence) and a readout."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LeakyRNNCell(3, 4, tau=4.0, key=0)
        self.out = nn.Linear(4, 2, key=1)

    def update(self, x):
        return self.out(self.rnn(x))


class ExactCell(brainstate.nn.Module):
    """h <- 0.7 h + tanh(x W + b): element-wise recurrence, so D-RTRL is exact (= BPTT)."""

    def __init__(self):
        super().__init__()
        k = jax.random.split(jax.random.PRNGKey(1), 2)
        self.w = brainstate.ParamState(0.5 * jax.random.normal(k[0], (3, 4)))
        self.b = brainstate.ParamState(0.1 * jax.random.normal(k[1], (4,)))

    def init_state(self, batch_size=None, **kwargs):
        shape = (4,) if batch_size is None else (batch_size, 4)
        self.h = brainstate.HiddenState(jnp.zeros(shape))

    def update(self, x):
        self.h.value = 0.7 * self.h.value + jnp.tanh(
            etrace_core.matmul(x, self.w.value, self.b.value)
        )
        return self.h.value


def _data():
    xs = jax.random.normal(jax.random.PRNGKey(7), (T, B, 3))
    ys = jax.random.normal(jax.random.PRNGKey(8), (T, B, 2))
    return xs, ys


def _online(call, params, xs, ys):
    """Sum over the T steps of the gradient of sum((call(x) - y)**2) w.r.t. `params`."""
    grad = brainstate.transform.grad(lambda x, y: jnp.sum((call(x) - y) ** 2), params)
    total = None
    for t in range(xs.shape[0]):
        g = grad(xs[t], ys[t])
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    return total


def _close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.shape == y.shape
        np.testing.assert_allclose(x, y, rtol=TOL, atol=TOL)


@pytest.mark.parametrize(
    "name,options", [("d_rtrl", {}), ("pp_prop", {"decay_or_rank": 0.6}), ("hybrid", {})]
)
def test_vmap_equals_separate_samples_and_batched_states(x64, name, options):
    xs, ys = _data()
    model = LeakyNet()
    learner = etrace_core.compile(model, name, xs[0], batch_size=B, vmap=True, **options)
    assert isinstance(learner, etrace_core.ETraceVmap)
    assert isinstance(learner, brainstate.nn.Vmap)
    algo = learner.module
    assert model.rnn.h.value.shape == (B, 4)  # per-sample states carry the batch axis
    params = model.states(brainstate.ParamState)
    got = _online(learner, params, xs, ys)
    traces = algo.etrace.value["traces"]

    # oracle 1: B separate runs of the unbatched model
    ref, ref_traces = None, []
    for b in range(B):
        single = LeakyNet()
        one = etrace_core.compile(single, name, xs[0, b], **options)
        g = _online(one, single.states(brainstate.ParamState), xs[:, b], ys[:, b])
        ref = g if ref is None else jax.tree.map(jnp.add, ref, g)
        ref_traces.append(one.etrace.value["traces"])
    _close(got, ref)
    assert min(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(got)) > 1e-3
    assert min(float(jnp.max(jnp.abs(v))) for v in jax.tree.leaves(traces)) > 1e-3
    for b in range(B):
        _close(jax.tree.map(lambda v, b=b: v[b], traces), ref_traces[b])

    # oracle 2: the same model with batched states (no vmap)
    batched = LeakyNet()
    whole = etrace_core.compile(batched, name, xs[0], batch_size=B, **options)
    _close(got, _online(whole, batched.states(brainstate.ParamState), xs, ys))


def test_vmap_drtrl_exact_model_equals_bptt(x64):
    xs = jax.random.normal(jax.random.PRNGKey(3), (T, B, 3))
    ys = jax.random.normal(jax.random.PRNGKey(4), (T, B, 4))
    model = ExactCell()
    p0 = {"w": model.w.value, "b": model.b.value}
    learner = etrace_core.compile(model, "d_rtrl", xs[0], batch_size=B, vmap=True)
    got = _online(learner, model.states(brainstate.ParamState), xs, ys)

    def loss(p):
        h, total = jnp.zeros((B, 4)), 0.0
        for x, y in zip(xs, ys):
            h = 0.7 * h + jnp.tanh(x @ p["w"] + p["b"])
            total = total + jnp.sum((h - y) ** 2)
        return total

    ref = jax.grad(loss)(p0)
    _close(got[("w",)], ref["w"])
    _close(got[("b",)], ref["b"])


def test_vmap_mean_loss_averages_and_reset(x64):
    """A mean over the batch gives the mean of the per-sample gradients; the wrapper's
    init_etrace_state zeroes every sample's traces and keeps the batch axis."""
    xs, ys = _data()
    model = LeakyNet()
    learner = etrace_core.compile(model, "d_rtrl", xs[0], batch_size=B, vmap=True)
    params = model.states(brainstate.ParamState)
    mean_grad = brainstate.transform.grad(
        lambda x, y: jnp.mean(jnp.sum((learner(x) - y) ** 2, axis=-1)), params
    )(xs[0], ys[0])
    model2 = LeakyNet()
    learner2 = etrace_core.compile(model2, "d_rtrl", xs[0], batch_size=B, vmap=True)
    sum_grad = _online(learner2, model2.states(brainstate.ParamState), xs[:1], ys[:1])
    _close(mean_grad, jax.tree.map(lambda g: g / B, sum_grad))
    learner.init_etrace_state()
    for v in jax.tree.leaves(learner.module.etrace.value):
        assert v.shape[:1] == (B,) and not np.any(np.asarray(v))


def test_vmap_manual_vmap_new_states_flow(x64):
    """braintrace's documented manual form: init + compile_graph inside vmap_new_states, then
    brainstate.nn.Vmap(algo, vmap_states='new'), equals compile(..., vmap=True)."""
    xs, ys = _data()
    model = LeakyNet()
    algo = etrace_core.D_RTRL(model)

    @brainstate.transform.vmap_new_states(state_tag="new", axis_size=B)
    def init():
        brainstate.nn.init_all_states(model)
        algo.compile_graph(xs[0, 0])

    init()
    assert all(v.shape[0] == B for v in jax.tree.leaves(algo.etrace.value))
    got = _online(brainstate.nn.Vmap(algo, vmap_states="new"), algo.param_states, xs, ys)
    model2 = LeakyNet()
    learner = etrace_core.compile(model2, "d_rtrl", xs[0], batch_size=B, vmap=True)
    _close(got, _online(learner, model2.states(brainstate.ParamState), xs, ys))


def test_vmap_errors():
    x = jnp.ones((B, 3))
    with pytest.raises(ValueError, match="needs batch_size"):
        etrace_core.compile(LeakyNet(), "d_rtrl", x, vmap=True)
    with pytest.raises(ValueError, match=r"batch_size=2 there; found leaf 0 of shape \(3, 3\)"):
        etrace_core.compile(LeakyNet(), "d_rtrl", x, batch_size=2, vmap=True)


class ConvCell(brainstate.nn.Module):
    """A leaky conv cell, channels last, written for one (6, 6, 1) sample."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d((6, 6, 1), 2, kernel_size=3, padding="SAME", key=2)

    def init_state(self, batch_size=None, **kwargs):
        self.h = brainstate.HiddenState(jnp.zeros((6, 6, 2)))

    def update(self, x):
        self.h.value = 0.6 * self.h.value + jnp.tanh(self.conv(x))
        return self.h.value.sum(axis=(-3, -2))


def test_vmap_conv_compiled_inside_jit(x64):
    """compile(..., vmap=True) inside a jitted function (braintrace's examples compile in
    their jitted train step) gives the gradient of the same compile done eagerly."""
    xs = jax.random.normal(jax.random.PRNGKey(9), (2, B, 6, 6, 1))
    ys = jax.random.normal(jax.random.PRNGKey(10), (2, B, 2))

    def run(model, xs):
        learner = etrace_core.compile(model, "d_rtrl", xs[0], batch_size=B, vmap=True)
        return _online(learner, model.states(brainstate.ParamState), xs, ys)

    eager_model, jit_model = ConvCell(), ConvCell()
    ref = run(eager_model, xs)
    got = brainstate.transform.jit(lambda xs: run(jit_model, xs))(xs)
    _close(got, ref)
    assert min(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(ref)) > 1e-3
