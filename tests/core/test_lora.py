"""The LoRA ETP op ``lora_matmul`` (``y = alpha x @ b_fn(B) @ a_fn(A) + bias_fn(b)``) and
``nn.LoRA``: both factors are traced weights (one relation each, see etrace_core.ops.lora).

Oracles, float64: the plain jnp product for values, ``jax.vjp``/``jax.jvp`` of it for the op's
derivatives and for the canonical identity ``io_to_params(X^T G) = VJP`` (tolerance 1e-12);
``jax.grad`` through the unrolled steps (BPTT) for D-RTRL's online gradient where the recurrence
is element-wise (exact), for a multi-step window over the whole sequence, and for pp_prop at
T = 1 (tolerance 1e-10). Where D-RTRL / ES-D-RTRL approximate (a recurrent LoRA weight, pp_prop
at T > 1), the oracle is the same algorithm on the equivalent dense weight ``W = alpha B A``
mapped by the chain rule (``dB = alpha G A^T``, ``dA = alpha B^T G``): the factor traces are
exactly the dense trace of ``W`` read through the factors, the approximation is the dense one.
"""

from __future__ import annotations

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import etrace_core
from etrace_core import nn
from etrace_core.ops import etp_lora_mm_p, etp_lora_mv_p, lora_matmul, rule_for

from .test_structured_ops import _online_sum

OP_TOL = dict(rtol=1e-12, atol=1e-12)
TOL = dict(rtol=1e-10, atol=1e-10)
LEAK = 0.6
ALPHA = 0.7
HOOKS = dict(b_fn=jnp.tanh, a_fn=jnp.sin, bias_fn=jnp.cos)


def _ident(v):
    return v


def plain(x, B, A, b=None, *, alpha=ALPHA, b_fn=_ident, a_fn=_ident, bias_fn=_ident):
    y = alpha * x @ b_fn(B) @ a_fn(A)
    return y if b is None else y + bias_fn(b)


def _normal(seed, *shape):
    return jax.random.normal(jax.random.PRNGKey(seed), shape)


def _factors(n_in=3, rank=2, n_out=4):
    return 0.5 * _normal(10, n_in, rank), 0.5 * _normal(11, rank, n_out), 0.1 * _normal(12, n_out)


# ---------------------------------------------------------------- the op


@pytest.mark.parametrize("lead", [(5,), ()])
@pytest.mark.parametrize("hooks", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_lora_matmul_values_vjp_jvp_equal_the_plain_product(x64, lead, hooks, bias):
    B, A, b = _factors()
    x = _normal(1, *lead, 3)
    kw = HOOKS if hooks else {}
    if not bias:
        kw = {k: v for k, v in kw.items() if k != "bias_fn"}
    args = (x, B, A, b) if bias else (x, B, A)

    def op(*a):
        return lora_matmul(*a[:3], alpha=ALPHA, bias=a[3] if bias else None, **kw)

    def ref(*a):
        return plain(*a, **kw)

    y = op(*args)
    assert y.shape == lead + (4,) and y.dtype == jnp.float64
    np.testing.assert_allclose(y, ref(*args), **OP_TOL)
    ct = _normal(2, *y.shape)
    got, want = jax.vjp(op, *args)[1](ct), jax.vjp(ref, *args)[1](ct)
    for g1, g2 in zip(got, want):
        np.testing.assert_allclose(g1, g2, **OP_TOL)
    tangents = tuple(_normal(3 + i, *a.shape) for i, a in enumerate(args))
    np.testing.assert_allclose(
        jax.jvp(op, args, tangents)[1], jax.jvp(ref, args, tangents)[1], **OP_TOL
    )
    np.testing.assert_allclose(jax.jit(op)(*args), y, **OP_TOL)
    prims = {e.primitive for e in jax.make_jaxpr(op)(*args).eqns}
    assert prims == {etp_lora_mm_p if lead else etp_lora_mv_p}


def test_lora_matmul_vmap(x64):
    """vmap over x stays one batched primitive; over a factor, the plain product."""
    B, A, b = _factors()
    xs = _normal(1, 6, 3)
    f = lambda x: lora_matmul(x, B, A, alpha=ALPHA, bias=b)  # noqa: E731
    jaxpr = jax.make_jaxpr(jax.vmap(f))(xs)
    assert [e.primitive for e in jaxpr.eqns] == [etp_lora_mm_p]
    np.testing.assert_allclose(jax.vmap(f)(xs), plain(xs, B, A, b), **OP_TOL)
    Bs = jnp.stack([B, 2 * B])
    got = jax.vmap(lambda B: lora_matmul(xs, B, A, alpha=ALPHA))(Bs)
    np.testing.assert_allclose(got, jnp.stack([plain(xs, B, A), plain(xs, 2 * B, A)]), **OP_TOL)


@pytest.mark.parametrize("lead", [(2, 5), ()])
@pytest.mark.parametrize("bias", [False, True])
def test_canonical_identity_per_factor(x64, lead, bias):
    """Per factor, io_to_params(sum_l X[l]^T G[l]) equals jax.vjp w.r.t. that factor (and
    the bias), with the hooks: the rules the traces are read back through."""
    B, A, b = _factors()
    kw = HOOKS if bias else {k: v for k, v in HOOKS.items() if k != "bias_fn"}
    x = _normal(1, *lead[-1:], 3)
    args = (x, B, A, b) if bias else (x, B, A)
    f = lambda *a: lora_matmul(*a[:3], alpha=ALPHA, bias=a[3] if bias else None, **kw)  # noqa
    (eqn,) = jax.make_jaxpr(f)(*args).eqns
    y, vjp = jax.vjp(f, *args)
    g = _normal(2, *y.shape)
    want = vjp(g)
    for k in (1, 2):
        rule = rule_for(eqn.primitive, k)
        w = rule.weight_arg(args, k)
        X = rule.x_canon(eqn.params, x, w)
        if bias:
            X = jnp.concatenate([X, jnp.ones(X.shape[:-1] + (1,))], axis=-1)
        M = jnp.einsum("...i,...o->io", X, rule.y_canon(eqn.params, g))
        dw, db = rule.io_to_params(eqn.params, w, M)
        np.testing.assert_allclose(dw, want[k], **OP_TOL)
        if bias:
            np.testing.assert_allclose(db, want[3], **OP_TOL)
        else:
            assert db is None
    with pytest.raises(ValueError, match="M must have shape"):
        rule_for(eqn.primitive, 1).io_to_params(eqn.params, (B, A), jnp.ones((2, 2)))


def test_lora_matmul_errors():
    B, A, b = _factors()
    with pytest.raises(ValueError, match="x.ndim=3"):
        lora_matmul(jnp.ones((2, 5, 3)), B, A)
    with pytest.raises(ValueError, match="B's first dim"):
        lora_matmul(jnp.ones((2, 4)), B, A)
    with pytest.raises(ValueError, match="same rank"):
        lora_matmul(jnp.ones(3), B, A.T)
    with pytest.raises(ValueError, match=r"bias must have shape \(O,\)"):
        lora_matmul(jnp.ones(3), B, A, bias=jnp.ones(3))
    with pytest.raises(ValueError, match="b_fn must be callable"):
        lora_matmul(jnp.ones(3), B, A, b_fn="tanh")
    with pytest.raises(ValueError, match="a_fn must keep"):
        lora_matmul(jnp.ones(3), B, A, a_fn=lambda a: a.T)
    with pytest.raises(ValueError, match="bias_fn given without a bias"):
        lora_matmul(jnp.ones(3), B, A, bias_fn=jnp.cos)
    with pytest.raises(ValueError, match="traced weights at operands"):
        rule_for(etp_lora_mm_p, 3)


def test_lora_matmul_units():
    import brainunit as u

    B, A, b = _factors()
    x = jnp.ones((2, 3)) * u.mV  # mV * mS = uA: the bias in uA adds as it is
    y = lora_matmul(x, B * u.mS, A, alpha=ALPHA, bias=b * u.uA)
    assert y.unit == u.uA
    np.testing.assert_allclose(y.to_decimal(u.uA), plain(x.mantissa, B, A, b), rtol=1e-6)
    with pytest.raises(u.UnitMismatchError):
        lora_matmul(x, B, A, bias=b)


# ---------------------------------------------------------------- online learning


class LoraLeaky(brainstate.nn.Module):
    """``h' = tanh(LEAK h + lora(x) [+ x] )``; `recurrent`: the LoRA weight reads h instead."""

    def __init__(self, batch, hooks=False, recurrent=False, bias=True):
        super().__init__()
        n_in = 4 if recurrent else 3
        B, A, b = _factors(n_in)
        self.B, self.A = brainstate.ParamState(B), brainstate.ParamState(A)
        self.b = brainstate.ParamState(b) if bias else None
        self.h = brainstate.HiddenState(jnp.zeros((4,) if batch is None else (batch, 4)))
        self.kw = dict(HOOKS if hooks else {}) if bias else {}
        self.recurrent = recurrent

    def update(self, x):
        src = self.h.value if self.recurrent else x
        bias = None if self.b is None else self.b.value
        drive = lora_matmul(src, self.B.value, self.A.value, alpha=ALPHA, bias=bias, **self.kw)
        if self.recurrent:
            drive = drive + x
        self.h.value = jnp.tanh(LEAK * self.h.value + drive)
        return self.h.value


class DenseLeaky(brainstate.nn.Module):
    """The recurrent LoraLeaky with ``W = alpha B A`` as one dense weight."""

    def __init__(self, batch):
        super().__init__()
        B, A, b = _factors(4)
        self.W, self.b = brainstate.ParamState(ALPHA * B @ A), brainstate.ParamState(b)
        self.h = brainstate.HiddenState(jnp.zeros((batch, 4)))

    def update(self, x):
        drive = etrace_core.matmul(self.h.value, self.W.value, self.b.value) + x
        self.h.value = jnp.tanh(LEAK * self.h.value + drive)
        return self.h.value


def bptt(model, xs):
    """jax.grad of sum_t sum(h_t^2) through the unrolled steps, from the model's h."""
    names = [n for n in ("B", "A", "b") if getattr(model, n, None) is not None]
    p0 = {n: getattr(model, n).value for n in names}
    h0, kw = model.h.value, model.kw
    fns = {k: kw.get(k, _ident) for k in ("b_fn", "a_fn", "bias_fn")}

    def loss(p):
        h, total = h0, 0.0
        for x in xs:
            src = h if model.recurrent else x
            drive = plain(src, p["B"], p["A"], p.get("b"), **fns)
            h = jnp.tanh(LEAK * h + (drive + x if model.recurrent else drive))
            total = total + jnp.sum(h**2)
        return total

    return {(n,): g for n, g in jax.grad(loss)(p0).items()}


def online(algo, xs, multi_step=False):
    """Sum over the steps of the online gradient of sum(h_t^2) (one window if `multi_step`)."""
    algo.compile_graph(etrace_core.MultiStepData(xs) if multi_step else xs[0])
    algo.init_etrace_state()
    if multi_step:
        params = algo.model.states(brainstate.ParamState)
        f = lambda x: jnp.sum(algo(etrace_core.MultiStepData(x)) ** 2)  # noqa: E731
        return brainstate.transform.grad(f, params)(xs)
    return _online_sum(algo, xs)


def assert_close(got, want, tol=TOL):
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], err_msg=str(k), **tol)


def _xs(batch, n, T=5, seed=3):
    return _normal(seed, *((T, n) if batch is None else (T, batch, n)))


@pytest.mark.parametrize("batch", [2, None])
@pytest.mark.parametrize("hooks", [False, True])
def test_drtrl_single_step_equals_bptt_with_lora_input(x64, batch, hooks):
    """Element-wise recurrence: D-RTRL traces of B (as the effective weight), A and the bias
    give the BPTT gradient exactly, with and without hooks, batched or not."""
    model = LoraLeaky(batch, hooks)
    xs = _xs(batch, 3)
    want = bptt(model, xs)
    algo = etrace_core.D_RTRL(model)
    got = online(algo, xs)
    rels = algo.graph.hidden_param_op_relations
    assert [(r.weight_path, r.bias_path, r.weight_operand) for r in rels] == [
        (("B",), ("b",), 1),
        (("A",), None, 2),
    ]
    assert all(not r.approximations for r in rels)
    assert rels[0].primitive is (etp_lora_mv_p if batch is None else etp_lora_mm_p)
    assert_close(got, want)


def test_drtrl_without_bias(x64):
    model = LoraLeaky(2, bias=False)
    xs = _xs(2, 3)
    want = bptt(model, xs)  # before the online run moves h on
    assert_close(online(etrace_core.D_RTRL(model), xs), want)


@pytest.mark.parametrize("batch", [2, None])
def test_pp_prop_is_exact_at_t1(x64, batch):
    model = LoraLeaky(batch, hooks=True)
    xs = _xs(batch, 3, T=1)
    want = bptt(model, xs)
    algo = etrace_core.pp_prop(model, decay_or_rank=0.9)
    assert_close(online(algo, xs), want)


@pytest.mark.parametrize("algo_name", ["d_rtrl", "pp_prop", "hybrid"])
def test_multi_step_window_over_the_sequence_is_bptt_for_a_recurrent_lora_weight(x64, algo_name):
    model = LoraLeaky(2, hooks=True, recurrent=True)
    xs = _xs(2, 4)
    want = bptt(model, xs)
    make = {
        "d_rtrl": lambda m: etrace_core.D_RTRL(m, vjp_method="multi-step"),
        "pp_prop": lambda m: etrace_core.pp_prop(m, 0.9, vjp_method="multi-step"),
        "hybrid": lambda m: etrace_core.HybridDimVjpAlgorithm(m, vjp_method="multi-step"),
    }[algo_name]
    assert_close(online(make(model), xs, multi_step=True), want)


@pytest.mark.parametrize("algo_name", ["d_rtrl", "pp_prop"])
def test_recurrent_lora_weight_is_labelled_and_equals_the_dense_weight_traces(x64, algo_name):
    """A LoRA weight reading h: the relations say the diagonal approximation; the factor
    gradients are the dense weight's (same algorithm, W = alpha B A) through the chain rule,
    so the approximation is exactly the documented dense one, nothing added."""
    make = {
        "d_rtrl": lambda m: etrace_core.D_RTRL(m),
        "pp_prop": lambda m: etrace_core.pp_prop(m, decay_or_rank=0.9),
    }[algo_name]
    xs = _xs(2, 4)
    lora_algo = make(LoraLeaky(2, recurrent=True))
    got = online(lora_algo, xs)
    for r in lora_algo.graph.hidden_param_op_relations:
        assert any("diagonal approximation" in a for a in r.approximations)
    dense = online(make(DenseLeaky(2)), xs)
    B, A, _ = _factors(4)
    G = dense[("W",)]
    np.testing.assert_allclose(got[("B",)], ALPHA * G @ A.T, **TOL)
    np.testing.assert_allclose(got[("A",)], ALPHA * B.T @ G, **TOL)
    np.testing.assert_allclose(got[("b",)], dense[("b",)], **TOL)


def test_pp_prop_keeps_one_output_side_trace_for_both_factors(x64):
    """The two relations share y, so io-dim keeps one output-side trace for both; at T > 1
    the gradient is the dense weight's (same decay) through the chain rule."""
    model = LoraLeaky(2)
    xs = _xs(2, 3)
    algo = etrace_core.pp_prop(model, decay_or_rank=0.9)
    got = online(algo, xs)
    assert algo._plan.spec.shared_outputs == ((0, 1),)
    B, A, b = _factors()

    class Dense(brainstate.nn.Module):
        def __init__(self):
            super().__init__()
            self.W, self.b = brainstate.ParamState(ALPHA * B @ A), brainstate.ParamState(b)
            self.h = brainstate.HiddenState(jnp.zeros((2, 4)))

        def update(self, x):
            self.h.value = jnp.tanh(
                LEAK * self.h.value + etrace_core.matmul(x, self.W.value, self.b.value)
            )
            return self.h.value

    dense = online(etrace_core.pp_prop(Dense(), decay_or_rank=0.9), xs)
    np.testing.assert_allclose(got[("B",)], ALPHA * dense[("W",)] @ A.T, **TOL)
    np.testing.assert_allclose(got[("A",)], ALPHA * B.T @ dense[("W",)], **TOL)
    np.testing.assert_allclose(got[("b",)], dense[("b",)], **TOL)


def test_factor_whose_partner_is_not_a_parameter_is_traced_densely_and_exact(x64):
    """A fixed (non-parameter) A: B's LoRA relation cannot map back without A's value, so B
    is not an ETP relation; it gets a dense parameter trace instead, still exact here."""
    B, A, _ = _factors()

    class Half(brainstate.nn.Module):
        def __init__(self):
            super().__init__()
            self.B = brainstate.ParamState(B)
            self.h = brainstate.HiddenState(jnp.zeros((2, 4)))

        def update(self, x):
            drive = lora_matmul(x, self.B.value, A, alpha=ALPHA)
            self.h.value = jnp.tanh(LEAK * self.h.value + drive)
            return self.h.value

    xs = _xs(2, 3)
    model = Half()
    algo = etrace_core.D_RTRL(model)
    got = online(algo, xs)
    assert algo.graph.hidden_param_op_relations == ()
    assert [r.path for r in algo.executor.param_trace_relations] == [("B",)]

    def loss(Bv):
        h, total = jnp.zeros((2, 4)), 0.0
        for x in xs:
            h = jnp.tanh(LEAK * h + plain(x, Bv, A))
            total = total + jnp.sum(h**2)
        return total

    np.testing.assert_allclose(got[("B",)], jax.grad(loss)(B), **TOL)


# ---------------------------------------------------------------- nn.LoRA


def test_nn_lora_routes_through_the_lora_primitive():
    lora = nn.LoRA(5, 2, 4, key=0)
    prims = {str(e.primitive) for e in jax.make_jaxpr(lora)(jnp.ones((8, 5))).eqns}
    assert prims == {"etp_lora_mm"}
    prims = {str(e.primitive) for e in jax.make_jaxpr(lora)(jnp.ones(5)).eqns}
    assert prims == {"etp_lora_mv"}
    x = _normal(1, 4, 8, 5)
    p = lora.weight.value
    y = lora(x)
    assert y.shape == (4, 8, 4)
    np.testing.assert_allclose(y, x @ p["lora_a"] @ p["lora_b"] / 2, rtol=1e-5, atol=1e-6)


def test_nn_lora_with_base_module():
    base = brainstate.nn.Linear(5, 4)
    lora = nn.LoRA(5, 2, 4, base_module=base, key=0)
    x = _normal(1, 8, 5)
    prims = {str(e.primitive) for e in jax.make_jaxpr(lora)(x).eqns}
    assert "etp_lora_mm" in prims
    p = lora.weight.value
    np.testing.assert_allclose(lora(x), x @ p["lora_a"] @ p["lora_b"] / 2 + base(x), atol=1e-5)


def test_nn_lora_non_callable_base_module_fails_at_the_call():
    lora = nn.LoRA(3, 2, 4, base_module="not_callable", key=0)
    with pytest.raises(ValueError, match="base_module must be callable.*'not_callable'.*str"):
        lora(jnp.ones((2, 3)))


def test_nn_lora_cell_drtrl_equals_bptt(x64):
    """nn.LoRA's dict ParamState: both leaves are traced (D-RTRL = BPTT, element-wise cell)."""

    class Cell(brainstate.nn.Module):
        def __init__(self):
            super().__init__()
            self.lora = nn.LoRA(3, 2, 4, key=0)
            self.h = brainstate.HiddenState(jnp.zeros((2, 4)))

        def update(self, x):
            self.h.value = jnp.tanh(LEAK * self.h.value + self.lora(x))
            return self.h.value

    model = Cell()
    xs = _xs(2, 3)
    p0 = dict(model.lora.weight.value)
    algo = etrace_core.D_RTRL(model)
    got = online(algo, xs)
    paths = [r.weight_path for r in algo.graph.hidden_param_op_relations]
    assert paths == [("lora", "weight", "lora_a"), ("lora", "weight", "lora_b")]

    def loss(p):
        h, total = jnp.zeros((2, 4)), 0.0
        for x in xs:
            h = jnp.tanh(LEAK * h + x @ p["lora_a"] @ p["lora_b"] / 2)
            total = total + jnp.sum(h**2)
        return total

    want = jax.grad(loss)(p0)
    g = got[("lora", "weight")]
    for k in ("lora_a", "lora_b"):
        np.testing.assert_allclose(g[k], want[k], err_msg=k, **TOL)
