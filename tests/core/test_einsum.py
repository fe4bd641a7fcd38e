"""``einsum`` (braintrace's ETP einsum) as one dense ETP matmul with a placement weight function.

Oracles, float64: ``jnp.einsum`` for values and ``jax.vjp`` of it for the op's gradient
(1e-12; one fixed equation per class and random equations of every letter role); ``jax.grad``
through the unrolled steps (BPTT, ``bptt_grads``) for the online gradients, relative 1e-10:
D-RTRL single-step and multi-step windows on leaky cells whose recurrence is element-wise
(D-RTRL exact there), ES-D-RTRL / hybrid at T = 1, one multi-step window over the whole
sequence for a cell whose recurrent weight is an einsum, and the compiler's dense trace where
a shared axis is summed before the hidden state; ``matmul`` for ``'bk,kn->bn'`` (1e-12).
Every refusal is checked with its message. The catalogue case ``einsum_heads``
(tests/core/models.py) runs the compiler/executor oracles on the op as well.
"""

from __future__ import annotations

import brainstate
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import etrace_core
from etrace_core.ops import etp_matmul_p, is_etp_primitive, rule_for

from ..conftest import x64_enabled
from .test_algorithms_exact import (
    assert_grads_close,
    bptt_grads,
    make_algo,
    per_step_grads,
    window_grads,
)

TOL = 1e-12
LEAK = 0.6
B = 2

# (equation, x shape without batch, weight shape): one per equation class
EQUATIONS = {
    "dense": ("bi,io->bo", (3,), (3, 4)),
    "heads": ("bhi,hio->bho", (2, 3), (2, 3, 4)),
    "shared": ("bti,io->bto", (2, 3), (3, 4)),
    "heads_permuted": ("bih,hoi->boh", (3, 2), (2, 4, 3)),
    "diagonal": ("bd,d->bd", (3,), (3,)),
    "x_summed": ("bij,io->bo", (3, 2), (3, 4)),
    "to_batch": ("bk,k->b", (3,), (3,)),
    "spaces": (" bhi , hio -> bho ", (2, 3), (2, 3, 4)),
}


def _operands(x_shape, w_shape, seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 2)
    return jax.random.normal(k[0], x_shape), jax.random.normal(k[1], w_shape)


@pytest.mark.parametrize("name", list(EQUATIONS))
def test_forward_equals_jnp_einsum(x64, name):
    eq, xs, ws = EQUATIONS[name]
    x, w = _operands((5,) + xs, ws)
    want = jnp.einsum(eq, x, w)
    np.testing.assert_allclose(etrace_core.einsum(eq, x, w), want, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(
        etrace_core.einsum(eq, x, w, weight_fn=jnp.tanh),
        jnp.einsum(eq, x, jnp.tanh(w)),
        rtol=TOL,
        atol=TOL,
    )
    jitted = jax.jit(lambda x, w: etrace_core.einsum(eq, x, w))
    np.testing.assert_allclose(jitted(x, w), want, rtol=TOL, atol=TOL)
    xv = jnp.stack([x, 2 * x, -x])  # vmap over a new leading axis of x
    got = jax.vmap(lambda x: etrace_core.einsum(eq, x, w))(xv)
    np.testing.assert_allclose(got, jnp.stack([want, 2 * want, -want]), rtol=TOL, atol=TOL)
    # one ETP op whose weight operand is the weight itself: the op table's rules apply
    eqns = jax.make_jaxpr(lambda x, w: etrace_core.einsum(eq, x, w))(x, w).jaxpr.eqns
    etp = [e for e in eqns if is_etp_primitive(e.primitive)]
    assert len(etp) == 1 and etp[0].primitive is etp_matmul_p
    assert rule_for(etp[0].primitive) is rule_for(etp_matmul_p)


@pytest.mark.parametrize("name", list(EQUATIONS))
@pytest.mark.parametrize("weight_fn", [None, jnp.tanh], ids=["plain", "tanh"])
def test_vjp_equals_jax_vjp(x64, name, weight_fn):
    eq, xs, ws = EQUATIONS[name]
    x, w = _operands((5,) + xs, ws, seed=1)
    fn = (lambda v: v) if weight_fn is None else weight_fn
    y, vjp = jax.vjp(lambda x, w: etrace_core.einsum(eq, x, w, weight_fn=weight_fn), x, w)
    y_ref, vjp_ref = jax.vjp(lambda x, w: jnp.einsum(eq, x, fn(w)), x, w)
    ct = jax.random.normal(jax.random.PRNGKey(2), y.shape)
    np.testing.assert_allclose(y, y_ref, rtol=TOL, atol=TOL)
    for got, want in zip(vjp(ct), vjp_ref(ct)):
        np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL)


def test_equal_equations_give_equal_primitive_params():
    """The placement is a primitive parameter compared by value: equal calls, equal eqns."""
    x, w = jnp.ones((5, 2, 3)), jnp.ones((2, 3, 4))

    def two(x, w):
        a = etrace_core.einsum("bhi,hio->bho", x, w, weight_fn=jnp.tanh)
        return a, etrace_core.einsum("bhi,hio->bho", x, w, weight_fn=jnp.tanh)

    eqns = [e for e in jax.make_jaxpr(two)(x, w).jaxpr.eqns if is_etp_primitive(e.primitive)]
    assert len(eqns) == 2 and eqns[0].params == eqns[1].params
    assert hash(eqns[0].params["weight_fn"]) == hash(eqns[1].params["weight_fn"])
    other = jax.make_jaxpr(lambda x, w: etrace_core.einsum("bhi,hio->bho", x, w))(x, w)
    (plain,) = [e for e in other.jaxpr.eqns if is_etp_primitive(e.primitive)]
    assert plain.params["weight_fn"] != eqns[0].params["weight_fn"]


# how many letters of each role a random equation has at most
ROLES = (("shared", 1), ("heads", 2), ("contracted", 2), ("outputs", 2), ("summed", 1))


@st.composite
def _equations(draw):
    """A random supported equation (every letter role, any order) and its letter sizes."""
    letters = iter("acdefghijklmnopqrstuvwxyz")
    role = {r: [next(letters) for _ in range(draw(st.integers(0, hi)))] for r, hi in ROLES}
    if not role["heads"] + role["contracted"] + role["outputs"]:
        role["outputs"] = [next(letters)]  # a weight needs at least one axis
    x_rest = role["shared"] + role["heads"] + role["contracted"] + role["summed"]
    w = role["heads"] + role["contracted"] + role["outputs"]
    y_rest = role["shared"] + role["heads"] + role["outputs"]
    x_spec = "b" + "".join(draw(st.permutations(x_rest)))
    w_spec = "".join(draw(st.permutations(w)))
    y_spec = "b" + "".join(draw(st.permutations(y_rest)))
    size = {c: draw(st.integers(1, 3)) for c in x_spec + w_spec}
    return f"{x_spec},{w_spec}->{y_spec}", size


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_equations(), seed=st.integers(0, 2**16))
def test_random_equations_value_and_vjp_equal_jnp_einsum(case, seed):
    """Any supported equation: value and vjp (x and weight) equal jnp.einsum's, float64."""
    eq, size = case
    lhs, y_spec = eq.split("->")
    x_spec, w_spec = lhs.split(",")
    with x64_enabled():
        x, w = _operands(tuple(size[c] for c in x_spec), tuple(size[c] for c in w_spec), seed)
        y, vjp = jax.vjp(lambda x, w: etrace_core.einsum(eq, x, w), x, w)
        y_ref, vjp_ref = jax.vjp(lambda x, w: jnp.einsum(eq, x, w), x, w)
        np.testing.assert_allclose(y, y_ref, rtol=TOL, atol=TOL, err_msg=eq)
        ct = jax.random.normal(jax.random.PRNGKey(seed + 1), y.shape)
        for got, want in zip(vjp(ct), vjp_ref(ct)):
            np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL, err_msg=eq)


def test_units_multiply(x64):
    x, w = _operands((5, 2, 3), (2, 3, 4))
    y = etrace_core.einsum("bhi,hio->bho", x * u.mV, w * u.siemens)
    assert isinstance(y, u.Quantity)
    want = jnp.einsum("bhi,hio->bho", x, w)
    np.testing.assert_allclose(y.to_decimal(u.mV * u.siemens), want, rtol=TOL, atol=TOL)


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "equation, message",
    [
        ("bk,kn", r"the output spec is missing"),
        ("bk->b", r"1 operand\(s\); exactly two"),
        ("bk,kn,nm->bm", r"3 operand\(s\); exactly two"),
        ("bk,kn->bnz", r"output axis 'z' appears in neither x nor the weight"),
        ("Bk,kn->Bn", r"the x spec 'Bk' has characters \['B'\]"),
        ("b...k,kn->b...n", r"the x spec 'b...k' has characters \['.'\]"),
        ("bkk,kn->bn", r"axis 'k' repeats in the x spec 'bkk'"),
        ("bk,kn->bnn", r"axis 'n' repeats in the output spec 'bnn'"),
        ("bk,bn->bn", r"the batch axis 'b' appears in the weight spec 'bn'"),
        ("kb,kn->bn", r"does not lead with x's leading \(batch\) axis 'k'"),
        ("bk,kvn->bn", r"weight axis 'v' appears in neither x nor the output"),
        (",kn->n", r"the x spec '' has an empty spec"),
    ],
)
def test_unsupported_equations_are_refused_by_name(equation, message):
    with pytest.raises(ValueError, match=message) as err:
        etrace_core.einsum(equation, jnp.ones((5, 3)), jnp.ones((3, 4)))
    text = str(err.value)
    assert f"einsum({equation!r})" in text and "supported: two operands" in text


def test_bad_operands_are_refused():
    with pytest.raises(ValueError, match="equation must be a string"):
        etrace_core.einsum(3, jnp.ones((5, 3)), jnp.ones((3, 4)))
    with pytest.raises(ValueError, match=r"x has shape \(5, 3, 2\) \(rank 3\), .* needs rank 2"):
        etrace_core.einsum("bk,kn->bn", jnp.ones((5, 3, 2)), jnp.ones((3, 4)))
    with pytest.raises(ValueError, match=r"weight has shape \(3,\) \(rank 1\), .* needs rank 2"):
        etrace_core.einsum("bk,kn->bn", jnp.ones((5, 3)), jnp.ones((3,)))
    with pytest.raises(ValueError, match="axis 'k' has size 3 in x and 2 in the weight"):
        etrace_core.einsum("bk,kn->bn", jnp.ones((5, 3)), jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="weight_fn must be callable"):
        etrace_core.einsum("bk,kn->bn", jnp.ones((5, 3)), jnp.ones((3, 4)), weight_fn=2.0)
    with pytest.raises(ValueError, match=r"weight_fn must keep the weight's shape \(3, 4\)"):
        etrace_core.einsum("bk,kn->bn", jnp.ones((5, 3)), jnp.ones((3, 4)), weight_fn=jnp.sum)


# ---------------------------------------------------------------- online learning


class LeakyEinsum(brainstate.nn.Module):
    """``h' = LEAK h + tanh(einsum(eq, x, fn(W)) + b)``: the recurrence is element-wise."""

    def __init__(self, eq, w_shape, h_shape, weight_fn=None):
        super().__init__()
        self.eq, self.weight_fn = eq, weight_fn
        self.w = brainstate.ParamState(0.5 * jax.random.normal(jax.random.PRNGKey(3), w_shape))
        self.b = brainstate.ParamState(0.1 * jnp.arange(float(np.prod(h_shape[1:]))))
        self.h = brainstate.HiddenState(jnp.zeros(h_shape))

    def update(self, x):
        y = etrace_core.einsum(self.eq, x, self.w.value, weight_fn=self.weight_fn)
        y = y + self.b.value.reshape(y.shape[1:])
        self.h.value = LEAK * self.h.value + jnp.tanh(y)
        return self.h.value


ONLINE = ["dense", "heads", "shared", "heads_permuted", "diagonal", "x_summed"]


def _leaky_case(name, T, weight_fn=None, seed=4):
    eq, xs, ws = EQUATIONS[name]
    x, w = _operands((B,) + xs, ws)
    h_shape = jnp.einsum(eq, x, w).shape
    model = LeakyEinsum(eq, ws, h_shape, weight_fn)
    k = jax.random.split(jax.random.PRNGKey(seed), 2)
    xs_ = jax.random.normal(k[0], (T, B) + xs)
    ys = jax.random.normal(k[1], (T,) + h_shape)
    return model, xs_, ys


def _assert_traced_exactly(algo):
    (rel,) = algo.graph.hidden_param_op_relations
    assert rel.weight_path == ("w",) and rel.approximations == ()
    assert rel.primitive is etp_matmul_p


@pytest.mark.parametrize("name", ONLINE)
def test_drtrl_single_step_equals_bptt(x64, name):
    model, xs, ys = _leaky_case(name, T=5)
    _, ref = bptt_grads(model, xs, ys)
    algo = make_algo("d_rtrl", model, xs[0])
    _assert_traced_exactly(algo)
    assert_grads_close(per_step_grads(algo, xs, ys), ref)


@pytest.mark.parametrize("name", ["heads", "shared"])
def test_drtrl_with_weight_fn_equals_bptt(x64, name):
    model, xs, ys = _leaky_case(name, T=4, weight_fn=jnp.tanh, seed=5)
    _, ref = bptt_grads(model, xs, ys)
    algo = make_algo("d_rtrl", model, xs[0])
    _assert_traced_exactly(algo)
    assert_grads_close(per_step_grads(algo, xs, ys), ref)


@pytest.mark.parametrize("name", ["heads", "shared", "diagonal"])
def test_drtrl_multi_step_windows_equal_bptt(x64, name):
    model, xs, ys = _leaky_case(name, T=5, seed=6)
    _, ref = bptt_grads(model, xs, ys)
    algo = make_algo("d_rtrl", model, xs[0], vjp_method="multi-step")
    assert_grads_close(window_grads(algo, xs, ys, [2, 3]), ref)


IO_ALGOS = {
    "pp_prop": lambda m: etrace_core.pp_prop(m, decay_or_rank=0.7),
    "hybrid": lambda m: etrace_core.HybridDimVjpAlgorithm(m, decay_or_rank=0.7),
}


@pytest.mark.parametrize("algo_name", list(IO_ALGOS))
@pytest.mark.parametrize("name", ["dense", "heads", "shared"])
def test_pp_prop_equals_bptt_at_one_step(x64, name, algo_name):
    model, xs, ys = _leaky_case(name, T=1, seed=7)
    _, ref = bptt_grads(model, xs, ys)
    algo = IO_ALGOS[algo_name](model)
    algo.compile_graph(xs[0])
    algo.init_etrace_state()
    assert_grads_close(per_step_grads(algo, xs, ys), ref)


class RecurrentHeads(brainstate.nn.Module):
    """``h' = tanh(x + einsum('bhd,hde->bhe', h, W))``: the recurrent weight is an einsum."""

    def __init__(self, heads=2, dim=3):
        super().__init__()
        self.w = brainstate.ParamState(
            0.4 * jax.random.normal(jax.random.PRNGKey(8), (heads, dim, dim))
        )
        self.h = brainstate.HiddenState(jnp.zeros((B, heads, dim)))

    def update(self, x):
        rec = etrace_core.einsum("bhd,hde->bhe", self.h.value, self.w.value)
        self.h.value = jnp.tanh(x + rec)
        return self.h.value


def test_recurrent_einsum_full_window_equals_bptt_and_single_step_is_labelled(x64):
    T = 5
    model = RecurrentHeads()
    k = jax.random.split(jax.random.PRNGKey(9), 2)
    xs, ys = jax.random.normal(k[0], (T, B, 2, 3)), jax.random.normal(k[1], (T, B, 2, 3))
    _, ref = bptt_grads(model, xs, ys)
    algo = etrace_core.D_RTRL(model, vjp_method="multi-step")
    algo.compile_graph(etrace_core.MultiStepData(xs))
    algo.init_etrace_state()
    (rel,) = algo.graph.hidden_param_op_relations
    assert any("diagonal approximation" in note for note in rel.approximations)
    assert_grads_close(window_grads(algo, xs, ys, [T]), ref)


class CollapsedShared(brainstate.nn.Module):
    """The shared axis ``t`` is summed before the hidden state: ``h`` does not keep it."""

    def __init__(self, steps=2, n=3):
        super().__init__()
        self.steps = steps
        self.w = brainstate.ParamState(0.5 * jax.random.normal(jax.random.PRNGKey(10), (n, n)))
        self.h = brainstate.HiddenState(jnp.zeros((B, n)))

    def update(self, x):
        xt = jnp.stack([x * (0.5 + t) for t in range(self.steps)], axis=1)
        rec = etrace_core.einsum("btk,kn->btn", xt, self.w.value)
        self.h.value = LEAK * self.h.value + jnp.tanh(rec.sum(axis=1))
        return self.h.value


def test_shared_axis_summed_into_the_hidden_state_is_traced_densely_and_exact(x64):
    """The sum over t mixes positions: the op's relation ends there and the compiler gives
    the weight a dense trace dh/dW instead (said by show_graph), exact against BPTT."""
    T = 4
    model = CollapsedShared()
    k = jax.random.split(jax.random.PRNGKey(11), 2)
    xs, ys = jax.random.normal(k[0], (T, B, 3)), jax.random.normal(k[1], (T, B, 3))
    _, ref = bptt_grads(model, xs, ys)
    algo = make_algo("d_rtrl", model, xs[0])
    assert algo.graph.hidden_param_op_relations == ()
    msg = algo.show_graph(verbose=False, return_msg=True)
    assert "('w',) (9 elements) via etp_matmul then reduce_sum" in msg
    assert_grads_close(per_step_grads(algo, xs, ys), ref)


class DenseRNN(brainstate.nn.Module):
    """``h' = tanh(x + h W)`` with ``h W`` written as ``einsum('bk,kn->bn')`` or ``matmul``."""

    def __init__(self, use_einsum, n=4):
        super().__init__()
        self.use_einsum = use_einsum
        self.w = brainstate.ParamState(0.4 * jax.random.normal(jax.random.PRNGKey(12), (n, n)))
        self.h = brainstate.HiddenState(jnp.zeros((B, n)))

    def update(self, x):
        h = self.h.value
        if self.use_einsum:
            rec = etrace_core.einsum("bk,kn->bn", h, self.w.value)
        else:
            rec = etrace_core.matmul(h, self.w.value)
        self.h.value = jnp.tanh(x + rec)
        return self.h.value


def test_dense_equation_is_the_matmul_online(x64):
    """'bk,kn->bn' is the plain matmul for the algorithms too: same relation notes, same
    D-RTRL and ES-D-RTRL online gradients (a recurrent weight: approximate, identically)."""
    k = jax.random.split(jax.random.PRNGKey(13), 2)
    xs, ys = jax.random.normal(k[0], (4, B, 4)), jax.random.normal(k[1], (4, B, 4))
    for make in (etrace_core.D_RTRL, lambda m: etrace_core.pp_prop(m, decay_or_rank=0.5)):
        got = {}
        for use_einsum in (True, False):
            algo = make(DenseRNN(use_einsum))
            algo.compile_graph(xs[0])
            algo.init_etrace_state()
            (rel,) = algo.graph.hidden_param_op_relations
            got[use_einsum] = rel.approximations, per_step_grads(algo, xs, ys)
        assert got[True][0] == got[False][0] and got[True][0]
        np.testing.assert_allclose(got[True][1][("w",)], got[False][1][("w",)], rtol=TOL, atol=TOL)
