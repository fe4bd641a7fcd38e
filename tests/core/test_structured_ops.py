"""Structured weights as traced ETP weights: ``sparse_matmul`` / ``nn.SparseLinear`` (a sparse
matrix's stored values) and ``grouped_matmul`` / ``nn.GroupedLinear`` (block-diagonal blocks).

Oracles, float64, tolerance 1e-10: the dense product ``x @ todense()`` (sparse) and
``einsum('...gi,gio->...go')`` (grouped) for values; jax.grad
through the unrolled steps (BPTT) for D-RTRL's online gradient on leaky models, where the
recurrence is element-wise and D-RTRL is exact; jax.grad of the dense product for the op's own
gradient.
"""

from __future__ import annotations

import brainevent
import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import etrace_core
from etrace_core import nn

TOL = 1e-10
LEAK = 0.6
MASK = np.array([[1, 0, 1, 0], [0, 1, 0, 1], [1, 1, 0, 0]], dtype=bool)


def _csr(fmt="CSR"):
    return getattr(brainevent, fmt).fromdense(jnp.asarray(MASK, dtype=float))


def _dense(values, fmt="CSR"):
    return _csr(fmt).with_data(values).todense()


@pytest.mark.parametrize("fmt", ["CSR", "CSC"])
def test_sparse_matmul_values_and_gradient_equal_the_dense_product(x64, fmt):
    nnz = int(MASK.sum())
    w = jax.random.normal(jax.random.PRNGKey(0), (nnz,))
    b = jnp.arange(4.0)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 3))
    mat = _csr(fmt)
    for xx in (x, x[0]):
        got = etrace_core.sparse_matmul(xx, w, sparse_mat=mat, bias=b)
        np.testing.assert_allclose(got, xx @ _dense(w, fmt) + b, rtol=TOL, atol=TOL)
    g = jax.grad(lambda v: jnp.sum(jnp.sin(etrace_core.sparse_matmul(x, v, sparse_mat=mat))))(w)
    want = jax.grad(lambda v: jnp.sum(jnp.sin(x @ _dense(v, fmt))))(w)
    np.testing.assert_allclose(g, want, rtol=TOL, atol=TOL)


def test_sparse_matmul_errors():
    w = jnp.ones(int(MASK.sum()))
    with pytest.raises(TypeError, match="sparse_mat must be a sparse matrix"):
        etrace_core.sparse_matmul(jnp.ones(3), w, sparse_mat=jnp.ones((3, 4)))
    with pytest.raises(ValueError, match="stored values"):
        etrace_core.sparse_matmul(jnp.ones(3), jnp.ones(5), sparse_mat=_csr())
    with pytest.raises(etrace_core.NotSupportedError, match="bias_fn"):
        etrace_core.sparse_matmul(jnp.ones(3), w, sparse_mat=_csr(), bias_fn=jnp.tanh)


class SparseLeaky(brainstate.nn.Module):
    """``h' = tanh(LEAK h + x @ S(fn(w)) + b)``: element-wise recurrence, sparse input weight."""

    def __init__(self, batch, weight_fn=None):
        super().__init__()
        nnz = int(MASK.sum())
        self.w = brainstate.ParamState(0.5 * jax.random.normal(jax.random.PRNGKey(2), (nnz,)))
        self.b = brainstate.ParamState(0.1 * jnp.arange(4.0))
        self.h = brainstate.HiddenState(jnp.zeros((4,) if batch is None else (batch, 4)))
        self.weight_fn = weight_fn
        self.mat = _csr()  # built outside the step: the pattern must be concrete

    def update(self, x):
        drive = etrace_core.sparse_matmul(
            x, self.w.value, sparse_mat=self.mat, bias=self.b.value, weight_fn=self.weight_fn
        )
        self.h.value = jnp.tanh(LEAK * self.h.value + drive)
        return self.h.value


def _online_sum(algo, xs):
    params = algo.model.states(brainstate.ParamState)
    step = brainstate.transform.grad(lambda x: jnp.sum(algo(x) ** 2), params)
    total = None
    for x in xs:
        g = step(x)
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    return total


@pytest.mark.parametrize("batch,weight_fn", [(2, None), (None, None), (2, jnp.tanh)])
def test_sparse_weight_drtrl_equals_bptt(x64, batch, weight_fn):
    T = 5
    shape = (T, 3) if batch is None else (T, batch, 3)
    xs = jax.random.normal(jax.random.PRNGKey(3), shape)
    model = SparseLeaky(batch, weight_fn)
    w0, b0 = model.w.value, model.b.value
    algo = etrace_core.D_RTRL(model)
    algo.compile_graph(xs[0])
    assert {r.weight_path for r in algo.graph.hidden_param_op_relations} == {("w",)}
    got = _online_sum(algo, xs)
    fn = (lambda v: v) if weight_fn is None else weight_fn

    def loss(w, b):
        h, total = model.h.value * 0.0, 0.0
        for x in xs:
            h = jnp.tanh(LEAK * h + x @ _dense(fn(w)) + b)
            total = total + jnp.sum(h**2)
        return total

    gw, gb = jax.grad(loss, (0, 1))(w0, b0)
    np.testing.assert_allclose(got[("w",)], gw, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(got[("b",)], gb, rtol=TOL, atol=TOL)


def test_sparse_linear_layer_is_traced_and_exact(x64):
    """brainstate's SparseLinear constructor; the stored values train exactly online."""
    mat = brainevent.CSR.fromdense(jnp.asarray(MASK, dtype=jnp.float64) * 0.3)
    layer = nn.SparseLinear(mat, b_init=brainstate.init.Constant(0.1))
    x = jax.random.normal(jax.random.PRNGKey(4), (2, 3))
    w = layer.weight.value["weight"]
    np.testing.assert_allclose(layer(x), x @ mat.with_data(w).todense() + 0.1, rtol=TOL)
    with pytest.raises(AssertionError):
        nn.SparseLinear(jnp.ones((3, 4)))

    class Net(brainstate.nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.SparseLinear(mat, b_init=brainstate.init.Constant(0.1))
            self.h = brainstate.HiddenState(jnp.zeros((2, 4)))

        def update(self, x):
            self.h.value = jnp.tanh(LEAK * self.h.value + self.inp(x))
            return self.h.value

    net = Net()
    xs = jax.random.normal(jax.random.PRNGKey(5), (4, 2, 3))
    learner = etrace_core.compile(net, "d_rtrl", xs[0])
    got = _online_sum(learner, xs)[("inp", "weight")]

    def loss(p):
        h, total = jnp.zeros((2, 4)), 0.0
        for x in xs:
            h = jnp.tanh(LEAK * h + x @ mat.with_data(p["weight"]).todense() + p["bias"])
            total = total + jnp.sum(h**2)
        return total

    want = jax.grad(loss)(net.inp.weight.value)
    for k in ("weight", "bias"):
        np.testing.assert_allclose(got[k], want[k], rtol=TOL, atol=TOL)


# ---------------------------------------------------------------- grouped (block-diagonal)

G, GI, GO = 2, 3, 4


def _grouped_ref(x, w, b):
    return jnp.einsum("...gi,gio->...go", x, w) + b


def test_grouped_matmul_values_gradient_and_errors(x64):
    k = jax.random.split(jax.random.PRNGKey(6), 3)
    w = jax.random.normal(k[0], (G, GI, GO))
    b = jax.random.normal(k[1], (G, GO))
    x = jax.random.normal(k[2], (6, 5, G, GI))
    for xx in (x, x[0], x[0, 0]):
        got = etrace_core.grouped_matmul(xx, w, b)
        np.testing.assert_allclose(got, _grouped_ref(xx, w, b), rtol=TOL, atol=TOL)
    f = lambda fn: jax.grad(lambda w, b: jnp.sum(jnp.sin(fn(x, w, b))), (0, 1))(w, b)
    for got, want in zip(f(etrace_core.grouped_matmul), f(_grouped_ref)):
        np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL)
    with pytest.raises(ValueError, match="groups, in"):
        etrace_core.grouped_matmul(jnp.ones((2, 4)), w)
    with pytest.raises(ValueError, match="bias must have shape"):
        etrace_core.grouped_matmul(x, w, jnp.ones(GO))


def test_grouped_linear_drtrl_equals_bptt(x64):
    """Both dict entries of GroupedLinear are traced; D-RTRL = BPTT on a leaky cell."""

    class Net(brainstate.nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.GroupedLinear(G, GI, GO, key=0)
            self.h = brainstate.HiddenState(jnp.zeros((2, G, GO)))

        def update(self, x):
            self.h.value = jnp.tanh(LEAK * self.h.value + self.inp(x))
            return self.h.value

    net = Net()
    assert net.inp.weight.value["weight"].shape == (G, GI, GO)
    assert "bias" not in nn.GroupedLinear(G, GI, GO, b_init=None).weight.value
    xs = jax.random.normal(jax.random.PRNGKey(7), (4, 2, G, GI))
    learner = etrace_core.compile(net, "d_rtrl", xs[0])
    traced = {r.weight_path for r in learner.graph.hidden_param_op_relations}
    assert traced == {("inp", "weight", "weight")}
    got = _online_sum(learner, xs)[("inp", "weight")]

    def loss(p):
        h, total = jnp.zeros((2, G, GO)), 0.0
        for x in xs:
            h = jnp.tanh(LEAK * h + _grouped_ref(x, p["weight"], p["bias"]))
            total = total + jnp.sum(h**2)
        return total

    want = jax.grad(loss)(net.inp.weight.value)
    for k in ("weight", "bias"):
        np.testing.assert_allclose(got[k], want[k], rtol=TOL, atol=TOL)
