"""EProp, OSTLRecurrent, OSTLFeedforward (braintrace's names) on etrace's traces.

Oracles, float64, tolerance 1e-10: jax.grad through the unrolled steps (BPTT) where the rule is
exact (EProp with kappa = 0 and symmetric feedback on an element-wise recurrence); for the
filtered trace and random feedback, the e-prop formula evaluated from jax.jacobian of the
unrolled states: e^t = dh^t/dW (exact per-weight trace on this model), e_bar^t = sum_s
kappa^(t-s) e^s, grad = sum_t L^t . e_bar^t with L^t = dl^t/dh^t (or its random projection).
"""

from __future__ import annotations

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import etrace_core

TOL = 1e-10
T, B, I, H = 5, 2, 3, 4
LEAK = 0.7


class LeakyTanh(brainstate.nn.Module):
    """``h' = tanh(LEAK h + x W + b)``: element-wise recurrence, traced input weight."""

    def __init__(self):
        super().__init__()
        k = jax.random.split(jax.random.PRNGKey(3), 2)
        self.w = brainstate.ParamState(0.5 * jax.random.normal(k[0], (I, H)))
        self.b = brainstate.ParamState(0.1 * jax.random.normal(k[1], (H,)))
        self.h = brainstate.HiddenState(jnp.zeros((B, H)))

    def update(self, x):
        self.h.value = jnp.tanh(
            LEAK * self.h.value + etrace_core.matmul(x, self.w.value, self.b.value)
        )
        return self.h.value


def _xs():
    return jax.random.normal(jax.random.PRNGKey(11), (T, B, I))


def _states(w, b, xs):
    h, hs = jnp.zeros((B, H)), []
    for x in xs:
        h = jnp.tanh(LEAK * h + x @ w + b)
        hs.append(h)
    return hs


def _online(algo, xs):
    """Sum over steps of the online gradient of l^t = sum(h^t ** 2)."""
    params = algo.model.states(brainstate.ParamState)
    step = brainstate.transform.grad(lambda x: jnp.sum(algo(x) ** 2), params)
    total = None
    for x in xs:
        g = step(x)
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    return total


def _eprop_oracle(model, xs, kappa, project=None):
    """The e-prop gradient from exact per-weight traces (jax.jacobian of the unrolled states)."""
    w, b = model.w.value, model.b.value
    hs = _states(w, b, xs)
    grads = {("w",): jnp.zeros_like(w), ("b",): jnp.zeros_like(b)}
    e_bar = {("w",): 0.0, ("b",): 0.0}
    for t in range(T):
        jw, jb = jax.jacobian(lambda w_, b_: _states(w_, b_, xs[: t + 1])[-1], (0, 1))(w, b)
        # jw: (B, H, I, H) -> per-weight trace e[b, i, j] = dh_j / dW_ij; jb: (B, H, H)
        e = {
            ("w",): jnp.einsum("bjij->bij", jw),
            ("b",): jnp.einsum("bjj->bj", jb),
        }
        e_bar = {k: kappa * e_bar[k] + e[k] for k in e}
        signal = 2.0 * hs[t]  # dl^t / dh^t
        if project is not None:
            signal = project(signal)
        grads[("w",)] = grads[("w",)] + jnp.einsum("bj,bij->ij", signal, e_bar[("w",)])
        grads[("b",)] = grads[("b",)] + jnp.einsum("bj,bj->j", signal, e_bar[("b",)])
    return grads


def _assert_close(got, want, tol=TOL):
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=tol, atol=tol, err_msg=str(k))


def _algo(cls, **kw):
    model = LeakyTanh()
    algo = cls(model, **kw)
    algo.compile_graph(_xs()[0])
    return algo


def test_eprop_unfiltered_symmetric_is_d_rtrl_and_bptt(x64):
    xs = _xs()
    algo = _algo(etrace_core.EProp)
    assert algo.approximate_options == ()
    got = _online(algo, xs)
    model = LeakyTanh()

    def loss(p):
        return sum(jnp.sum(h**2) for h in _states(p[("w",)], p[("b",)], xs))

    want = jax.grad(loss)({("w",): model.w.value, ("b",): model.b.value})
    _assert_close(got, want)
    _assert_close(got, _online(_algo(etrace_core.D_RTRL), xs))


@pytest.mark.parametrize("kappa", [0.5, 0.9])
def test_eprop_filtered_trace_equals_the_eprop_formula(x64, kappa):
    xs = _xs()
    algo = _algo(etrace_core.EProp, kappa_filter_decay=kappa)
    assert "kappa_filter_decay" in algo.approximate_options[0]
    got = _online(algo, xs)
    _assert_close(got, _eprop_oracle(LeakyTanh(), xs, kappa))
    # the raw trace is still D-RTRL's: get_etrace_of reads it, not the filtered one
    drtrl = _algo(etrace_core.D_RTRL)
    _online(drtrl, xs)
    a, d = algo.get_etrace_of(("w",)), drtrl.get_etrace_of(("w",))
    assert set(a) == set(d)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(d)):
        np.testing.assert_allclose(u, v, rtol=TOL, atol=TOL)


def test_eprop_random_feedback_projects_the_normalised_signal(x64):
    xs = _xs()
    key = jax.random.PRNGKey(7)
    algo = _algo(
        etrace_core.EProp, feedback="random", random_feedback_key=key, kappa_filter_decay=0.5
    )
    (Bmat,) = algo._plan.rule.feedback
    assert Bmat.shape == (H, H)
    again = _algo(etrace_core.EProp, feedback="random", random_feedback_key=key)
    np.testing.assert_array_equal(again._plan.rule.feedback[0], Bmat)  # fixed by the key

    def project(s):
        s = s / (jnp.sqrt(jnp.sum(s**2, axis=-1, keepdims=True)) + 1e-8)
        return s @ Bmat

    got = _online(algo, xs)
    _assert_close(got, _eprop_oracle(LeakyTanh(), xs, 0.5, project))
    symmetric = _online(_algo(etrace_core.EProp, kappa_filter_decay=0.5), xs)
    assert not np.allclose(got[("w",)], symmetric[("w",)])


def test_eprop_filtered_run_online_equals_stepping(x64):
    """The sequence driver (one jitted scan) uses the same filtered traces as stepping."""
    xs = _xs()
    stepped = _online(_algo(etrace_core.EProp, kappa_filter_decay=0.8), xs)
    algo = _algo(etrace_core.EProp, kappa_filter_decay=0.8)
    res = etrace_core.run_online(algo, lambda y, t: jnp.sum(y**2), xs, jnp.zeros((T,)))
    _assert_close(res.grads, stepped)


def test_eprop_through_compile_and_its_errors():
    x = _xs()[0]
    learner = etrace_core.compile(LeakyTanh(), "eprop", x, kappa_filter_decay=0.5)
    assert isinstance(learner, etrace_core.EProp) and learner.kappa_filter_decay == 0.5
    with pytest.raises(ValueError, match="feedback must be"):
        etrace_core.EProp(LeakyTanh(), feedback="transposed")
    with pytest.raises(ValueError, match="random_feedback_key"):
        etrace_core.EProp(LeakyTanh(), feedback="random")
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        etrace_core.EProp(LeakyTanh(), kappa_filter_decay=1.0)


def test_ostl_regimes_are_d_rtrl_and_pp_prop(x64):
    xs = _xs()
    rec = _algo(etrace_core.OSTLRecurrent)
    assert rec.regime == "with-H"
    _assert_close(_online(rec, xs), _online(_algo(etrace_core.D_RTRL), xs))
    ff = _algo(etrace_core.OSTLFeedforward)
    assert ff.regime == "without-H" and ff.decay == 1e-6
    _assert_close(_online(ff, xs), _online(_algo(etrace_core.pp_prop, decay_or_rank=1e-6), xs))
    ff9 = _algo(etrace_core.OSTLFeedforward, decay_or_rank=0.9)
    _assert_close(_online(ff9, xs), _online(_algo(etrace_core.pp_prop, decay_or_rank=0.9), xs))


@pytest.mark.parametrize("cls", [etrace_core.OSTLRecurrent, etrace_core.D_RTRL, etrace_core.EProp])
@pytest.mark.parametrize(
    "option",
    [
        {"recurrence_scope": "coupled"},
        {"config": None},
        {"chunked_trace": True},
    ],
)
def test_braintrace_rule_knobs_are_refused_not_ignored(cls, option):
    """braintrace's learning-rule knobs (``ETraceConfig``'s ``recurrence_scope``, ...) have no
    etrace counterpart: passing one is an error, never a silently different rule
    (``control_flow=`` is etrace's too: ``ControlFlowPolicy``, tests/core/test_control_flow.py)."""
    with pytest.raises(TypeError, match=next(iter(option))):
        cls(LeakyTanh(), **option)
