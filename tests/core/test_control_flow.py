"""Control flow inside one step: weighted inner scans unrolled, while loops, ControlFlowPolicy.

Oracles (float64, relative error max|got - ref| / max|ref| <= 1e-10 unless said otherwise):
- multi-step D-RTRL and pp_prop (full rank) with one window of the whole sequence equal BPTT
  (jax.grad through a lax.scan over time of the *original* model, inner scans left as loops),
  on a tanh RNN whose step is a for_loop of sub-steps applying the same weight (braintrace's
  ``scan_body_rnn`` structure), a leaky sub-stepped unit and a reverse scan over sub-inputs;
- single-step D-RTRL equals BPTT where it is exact (element-wise recurrence inside the inner
  scan, also nested scans and a reverse scan with xs); where it is not (the weight is applied
  to the hidden state inside the loop) every relation is labelled approximate and the gradient
  really differs from BPTT;
- while loops: a weight inside a while body and an ETP op inside one are refused
  (NotSupportedError, a NotImplementedError) by name; a trainable layer upstream of a weight-free
  while layer gets the same gradient as the hand-written twin without the loop (single-step
  D-RTRL, 1e-10) and multi-step D-RTRL on the while model equals BPTT of the twin (1e-10);
- ControlFlowPolicy: stored on module_info, knobs etrace cannot honour refused.
"""

from __future__ import annotations

import brainstate
import jax
import jax.numpy as jnp
import pytest
from jax import lax

import etrace_core as ec
from etrace_core.compiler.errors import NotSupportedError

from .test_algorithms_exact import assert_grads_close, bptt_grads, mse, per_step_grads, rel_err

T, B, N = 6, 2, 3


def _param(key, shape, scale=0.5):
    return brainstate.ParamState(
        scale * jax.random.normal(jax.random.PRNGKey(key), shape, jnp.result_type(float))
    )


def _hidden(n=N):
    return brainstate.HiddenState(jnp.zeros((B, n), jnp.result_type(float)))


class ScanBodyRNN(brainstate.nn.Module):
    """Each step: `loops` sub-steps h <- tanh(x W + h W) in a for_loop (a lax.scan): the weight
    is applied to the hidden state inside the loop (D-RTRL is not exact here)."""

    def __init__(self, loops=3):
        super().__init__()
        self.loops = loops
        self.w = _param(0, (N, N))
        self.h = _hidden()

    def update(self, x):
        def substep(_):
            self.h.value = jnp.tanh(
                ec.matmul(x, self.w.value) + ec.matmul(self.h.value, self.w.value)
            )
            return self.h.value

        return brainstate.transform.for_loop(substep, jnp.arange(self.loops))[-1]


class ScanLeaky(brainstate.nn.Module):
    """Each step: `loops` sub-steps h <- d h + tanh(x W + b), in a lax.scan (element-wise
    recurrence: D-RTRL is exact). `nested`: each sub-step is itself a scan of 2 half-steps."""

    def __init__(self, loops=3, nested=False):
        super().__init__()
        self.loops, self.nested = loops, nested
        self.w = _param(1, (N, N))
        self.b = _param(2, (N,))
        self.h = _hidden()

    def update(self, x):
        def half(h, _):
            return 0.9 * h + 0.5 * jnp.tanh(ec.matmul(x, self.w.value, self.b.value)), None

        def sub(h, _):
            if self.nested:
                return lax.scan(half, h, None, length=2)[0], h
            return 0.8 * h + jnp.tanh(ec.matmul(x, self.w.value, self.b.value)), h

        h, seen = lax.scan(sub, self.h.value, None, length=self.loops)
        self.h.value = h
        return h + 0.1 * seen.sum(0)


class SubInputLeaky(brainstate.nn.Module):
    """The step's input holds `loops` sub-inputs, scanned in reverse (xs and stacked ys)."""

    def __init__(self, loops=3):
        super().__init__()
        self.w = _param(3, (N, N))
        self.h = _hidden()

    def update(self, x):  # x: (B, loops * N)
        xs = x.reshape(B, -1, N).transpose(1, 0, 2)

        def sub(h, xk):
            h = 0.7 * h + jnp.tanh(ec.matmul(xk, self.w.value))
            return h, 2.0 * h

        h, ys = lax.scan(sub, self.h.value, xs, reverse=True)
        self.h.value = h
        return ys[0] - ys[-1] + h


def _sequence(n_in, seed=7):
    xs = jax.random.normal(jax.random.PRNGKey(seed), (T, B, n_in), jnp.result_type(float))
    ys = jax.random.normal(jax.random.PRNGKey(seed + 1), (T, B, N), jnp.result_type(float))
    return xs, ys


def _build(cls, **kw):
    model = cls(**kw)
    brainstate.nn.init_all_states(model, batch_size=B)
    model.h.value = 0.3 * jax.random.normal(jax.random.PRNGKey(11), model.h.value.shape)
    return model


def _algo(make, model, x0, **kw):
    algo = make(model, **kw)
    algo.compile_graph(x0)
    return algo


MODELS = {
    "scan_body": (ScanBodyRNN, N),
    "leaky": (ScanLeaky, N),
    "nested": (lambda: ScanLeaky(nested=True), N),
    "sub_inputs": (SubInputLeaky, 3 * N),
}
MULTI = {
    "d_rtrl": ec.D_RTRL,
    "pp_prop_full": lambda m, **kw: ec.pp_prop(m, decay_or_rank=16, **kw),
}


def _values(model):
    return {p: s.value for p, s in model.states(brainstate.HiddenState).items()}


def _reset(model, values):
    for p, s in model.states(brainstate.HiddenState).items():
        s.value = values[p]


def _bptt_then_d_rtrl(model, xs, ys):
    """BPTT gradients of `model` from its current states, then a single-step D-RTRL compiled
    on it from those same states."""
    h0 = _values(model)
    _, ref = bptt_grads(model, xs, ys)
    _reset(model, h0)
    return ref, _algo(ec.D_RTRL, model, xs[0])


@pytest.mark.parametrize("algo_name", list(MULTI))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_multi_step_window_of_the_sequence_is_bptt(x64, model_name, algo_name):
    cls, n_in = MODELS[model_name]
    model = _build(cls)
    xs, ys = _sequence(n_in)
    h0 = _values(model)
    loss_ref, ref = bptt_grads(model, xs, ys)
    _reset(model, h0)
    algo = _algo(MULTI[algo_name], model, xs[0], vjp_method="multi-step")
    assert all(e.primitive.name != "scan" for e in algo.graph.module_info.jaxpr.eqns)
    res = ec.run_online(algo, mse, xs, ys)
    assert abs(float(res.loss - loss_ref)) <= 1e-12 * abs(float(loss_ref))
    assert_grads_close(res.grads, ref)


@pytest.mark.parametrize("model_name", ["leaky", "nested", "sub_inputs"])
def test_single_step_d_rtrl_is_bptt_on_element_wise_sub_steps(x64, model_name):
    cls, n_in = MODELS[model_name]
    model = _build(cls)
    xs, ys = _sequence(n_in)
    ref, algo = _bptt_then_d_rtrl(model, xs, ys)
    rels = algo.graph.hidden_param_op_relations
    loops = {"leaky": 3, "nested": 6, "sub_inputs": 3}[model_name]
    assert len(rels) == loops  # one relation per unrolled use of the weight
    assert all(not r.approximations for r in rels)
    assert_grads_close(per_step_grads(algo, xs, ys), ref)


def test_single_step_d_rtrl_on_a_weight_applied_to_h_inside_the_loop_is_labelled(x64):
    model = _build(ScanBodyRNN)
    xs, ys = _sequence(N)
    ref, algo = _bptt_then_d_rtrl(model, xs, ys)
    rels = algo.graph.hidden_param_op_relations
    assert rels and all(r.approximations for r in rels)
    assert "approximate" in algo.show_graph(verbose=False, return_msg=True)
    got = per_step_grads(algo, xs, ys)
    assert rel_err(got[("w",)], ref[("w",)]) > 1e-3  # the label is not vacuous


def test_a_scan_longer_than_the_limit_is_refused_by_name_and_the_limit_raises(x64):
    model = _build(ScanLeaky, loops=5)
    x0 = _sequence(N)[0][0]
    with pytest.raises(NotSupportedError) as err:
        _algo(ec.D_RTRL, model, x0, control_flow=ec.ControlFlowPolicy(scan_unroll_limit=4))
    msg = str(err.value)
    for part in ("length 5", "scan_unroll_limit=4", "ControlFlowPolicy(scan_unroll_limit=5)"):
        assert part in msg
    assert "('w',)" in msg and "('b',)" in msg and "test_control_flow.py" in msg
    with pytest.raises(NotSupportedError, match="length 5"):
        ec.compile_etrace_graph(model, x0, control_flow=ec.ControlFlowPolicy(scan_unroll_limit=0))
    policy = ec.ControlFlowPolicy(scan_unroll_limit=5)
    algo = _algo(ec.D_RTRL, model, x0, control_flow=policy)
    assert algo.graph.module_info.control_flow is policy
    assert len(algo.graph.hidden_param_op_relations) == 5


def test_compile_and_every_algorithm_take_the_policy():
    policy = ec.ControlFlowPolicy(scan_unroll_limit=5)
    x0 = _sequence(N)[0][0]
    algo = ec.compile(ScanLeaky(loops=5), "pp_prop", x0, batch_size=B, control_flow=policy)
    assert algo.graph.module_info.control_flow is policy
    for make in (ec.HybridDimVjpAlgorithm, ec.EProp, ec.OSTLRecurrent, ec.OSTLFeedforward):
        algo = _algo(make, _build(ScanLeaky, loops=5), x0, control_flow=policy)
        assert algo.graph.module_info.control_flow is policy
    assert (
        _algo(ec.D_RTRL, _build(ScanLeaky), x0).graph.module_info.control_flow == policy.__class__()
    )


def test_the_unroll_pass_keeps_values_and_derivatives(x64):
    """flatten_control_flow on a program with a reverse scan over xs with stacked ys, a scan
    nested in its body, a length-0 scan and a weight-free scan: same values and JVPs as the
    original program (float64, 1e-12); only the weight-free scan stays a loop."""
    from etrace_core.compiler.unroll_scans import flatten_control_flow

    def f(w, h, xs):
        def inner(c, _):
            return jnp.sin(c @ w.T), c

        def body(c, x):
            c2, seen = lax.scan(inner, c + x, None, length=2)
            return c2 * 0.5, (seen.sum(0), x @ w)

        h, (a, b) = lax.scan(body, h, xs, reverse=True)
        h0, empty = lax.scan(lambda c, x: (c + x @ w, c), h, xs[:0])
        free = lax.scan(lambda c, _: (0.9 * c, None), h0, None, length=4)[0]
        return free, a, b, empty

    key = jax.random.split(jax.random.PRNGKey(3), 3)
    args = (
        jax.random.normal(key[0], (N, N)),
        jax.random.normal(key[1], (B, N)),
        jax.random.normal(key[2], (4, B, N)),
    )
    closed = jax.make_jaxpr(f)(*args)
    flat = flatten_control_flow(closed, [True, False, False], 16)
    assert [e.primitive.name for e in flat.jaxpr.eqns].count("scan") == 1

    def run(*a):
        return jax.core.eval_jaxpr(flat.jaxpr, flat.consts, *a)

    tangents = tuple(jnp.cos(a) for a in args)
    (want, dwant), (got, dgot) = jax.jvp(f, args, tangents), jax.jvp(run, args, tangents)
    for a, b in zip(jax.tree.leaves((want, dwant)), jax.tree.leaves((got, dgot))):
        assert a.shape == b.shape and jnp.allclose(a, b, rtol=1e-12, atol=1e-12)
    kept = flatten_control_flow(closed, [False, False, False], 16)  # no weight: loops stay
    assert [e.primitive.name for e in kept.jaxpr.eqns].count("scan") == 3


def test_weight_free_scans_stay_loops():
    class WeightFreeScan(brainstate.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = _param(4, (N, N))
            self.h = _hidden()

        def update(self, x):
            y = ec.matmul(x, self.w.value)
            h = lax.scan(lambda h, _: (0.5 * h + jnp.tanh(y), None), self.h.value, None, 4)[0]
            self.h.value = h
            return h

    model = _build(WeightFreeScan)
    graph = ec.compile_etrace_graph(model, _sequence(N)[0][0])
    assert [e.primitive.name for e in graph.module_info.jaxpr.eqns].count("scan") == 1
    assert len(graph.hidden_param_op_relations) == 1


# ------------------------------------------------------------------------------------- while


class WeightInWhile(brainstate.nn.Module):
    def __init__(self, const_weight=False):
        super().__init__()
        self.const_weight = const_weight
        self.w = _param(5, (N, N))
        self.h = _hidden()

    def update(self, x):
        w = 0.1 * jnp.ones((N, N)) if self.const_weight else self.w.value.T
        pre = ec.matmul(x, self.w.value)

        def body(c):
            i, h = c
            return i + 1, jnp.tanh(pre + ec.matmul(h, w))

        self.h.value = lax.while_loop(lambda c: c[0] < 3, body, (0, self.h.value))[1]
        return self.h.value


@pytest.mark.parametrize("const_weight", [False, True], ids=["param", "constant"])
def test_weights_and_etp_ops_inside_a_while_body_are_refused(const_weight):
    model = _build(WeightInWhile, const_weight=const_weight)
    with pytest.raises(NotImplementedError) as err:
        ec.compile_etrace_graph(model, _sequence(N)[0][0])
    assert isinstance(err.value, NotSupportedError)
    msg = str(err.value)
    assert "a while loop at" in msg and "test_control_flow.py" in msg
    assert "could not flatten the ETP op(s) ['etp_matmul'] out of the while body" in msg
    assert "Fix: apply the weight outside the loop" in msg
    assert ("[('w',)]" in msg) != const_weight


class StackedWhile(brainstate.nn.Module):
    """A tanh layer (w1) feeding a layer that settles in a weight-free while loop (w2 applied
    before the loop); `while_layer=False`: the same sub-steps written out (the twin)."""

    def __init__(self, while_layer=True, k=3):
        super().__init__()
        self.while_layer, self.k = while_layer, k
        self.w1 = _param(6, (N, 4))
        self.w2 = _param(7, (4, N))
        self.h1 = brainstate.HiddenState(jnp.zeros((B, 4), jnp.result_type(float)))
        self.h2 = _hidden()

    def update(self, x):
        self.h1.value = jnp.tanh(ec.matmul(x, self.w1.value) + 0.5 * self.h1.value)
        pre = ec.matmul(self.h1.value, self.w2.value) + 0.8 * self.h2.value

        def settle(h):
            return h + 0.5 * jnp.tanh(pre - h)

        if self.while_layer:
            body = lambda c: (c[0] + 1, settle(c[1]))  # noqa: E731
            h = lax.while_loop(lambda c: c[0] < self.k, body, (0, self.h2.value))[1]
        else:
            h = self.h2.value
            for _ in range(self.k):
                h = settle(h)
        self.h2.value = h
        return h


def _stacked(while_layer):
    model = StackedWhile(while_layer)
    brainstate.nn.init_all_states(model, batch_size=B)
    return model


def test_upstream_layer_behind_a_while_layer_gets_the_twins_gradient(x64):
    """braintrace returns an exactly-zero gradient for w1 here (its documented limitation);
    etrace's while VJP carries the upstream credit: single-step D-RTRL equals the twin's."""
    xs, ys = _sequence(N)
    got = per_step_grads(_algo(ec.D_RTRL, _stacked(True), xs[0]), xs, ys)
    twin = per_step_grads(_algo(ec.D_RTRL, _stacked(False), xs[0]), xs, ys)
    assert_grads_close(got, twin)
    assert float(jnp.max(jnp.abs(got[("w1",)]))) > 1e-2


def test_multi_step_d_rtrl_on_a_while_model_is_bptt_of_the_twin(x64):
    """braintrace raises (JAX cannot reverse through a while loop); etrace's while VJP gives
    the exact gradient: one window of the sequence equals BPTT through the twin."""
    xs, ys = _sequence(N)
    _, ref = bptt_grads(_stacked(False), xs, ys)
    algo = _algo(ec.D_RTRL, _stacked(True), xs[0], vjp_method="multi-step")
    assert_grads_close(ec.run_online(algo, mse, xs, ys).grads, ref)
    with pytest.raises(ValueError, match="while_loop"):  # the oracle cannot use the while model
        bptt_grads(_stacked(True), xs, ys)


def test_while_hidden_error_refuses_a_loop_that_feeds_a_hidden_state():
    x0 = _sequence(N)[0][0]
    policy = ec.ControlFlowPolicy(while_hidden="error")
    with pytest.raises(NotSupportedError, match=r"a while loop at .* feeds a hidden state"):
        ec.compile_etrace_graph(_stacked(True), x0, control_flow=policy)
    ec.compile_etrace_graph(_stacked(False), x0, control_flow=policy)  # no loop: fine


# ---------------------------------------------------------------------------- the policy


def test_control_flow_policy_values():
    default = ec.ControlFlowPolicy()
    assert (default.cond, default.scan_unroll_limit, default.while_hidden) == (
        "convert",
        16,
        "opaque-fwd",
    )
    assert (default.etp_in_control_flow, default.scan_descent) == ("error", "auto")
    with pytest.raises(AttributeError):
        default.scan_unroll_limit = 3  # frozen
    for bad in (
        {"cond": "maybe"},
        {"while_hidden": "x"},
        {"etp_in_control_flow": "bogus"},
        {"scan_descent": "on"},
        {"scan_unroll_limit": 2.5},
        {"fixpoint_iteration_limit": 0},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ec.ControlFlowPolicy(**bad)
    with pytest.raises(TypeError, match="ControlFlowPolicy"):
        ec.D_RTRL(_build(ScanLeaky), control_flow={"scan_unroll_limit": 3})


@pytest.mark.parametrize(
    "knob, fix",
    [("cond", "sqrt(where(ok, x, 1.))"), ("etp_in_control_flow", "never drops a weight")],
)
def test_knob_values_etrace_cannot_honour_are_refused(knob, fix):
    value = {"cond": "opaque", "etp_in_control_flow": "exclude"}[knob]
    policy = ec.ControlFlowPolicy(**{knob: value})
    model = _build(ScanLeaky)
    with pytest.raises(NotSupportedError, match=rf"{knob}='{value}'") as err:
        _algo(ec.D_RTRL, model, _sequence(N)[0][0], control_flow=policy)
    assert fix in str(err.value)
