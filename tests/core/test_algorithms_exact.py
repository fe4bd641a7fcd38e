"""Online algorithms against BPTT where they are exact (float64, relative error <= 1e-10).

References are written by hand: each model's step as a pure ``jnp`` function of ``{path: value}``
dicts (``*_step`` below), unrolled over the sequence and differentiated with ``jax.grad``.
The generic reference :func:`bptt_grads` (the model itself, made pure with brainstate's
treefy split/merge) is used for GRU/LSTM and is checked against the hand-written one here.

Claims tested:
- D-RTRL (and the hybrid, which picks param-dim traces for these small weights) equals BPTT for
  every weight of models whose recurrence is element-wise: leaky rate cell, LIF without recurrent
  weights (surrogate gradient), a two-state cell with same-step coupling (c^t feeds h^t), and a
  single leaky rate readout; each via ``run_online`` and via per-step
  ``brainstate.transform.grad``, batched and unbatched.
- Weights that are not online-traced (readouts) get their exact same-step gradient in
  single-step mode, for all three algorithms; a gain used with plain ``jnp`` ops on the way to
  a hidden state gets an element-wise trace (more: test_param_traces.py).
- ``vjp_method='multi-step'`` with one window over the whole sequence is BPTT for every
  algorithm, also for GRU and LSTM; for element-wise models any window split is exact.
- ES-D-RTRL: chunking a sequence into MultiStepData of any sizes gives the same gradient as
  stepping (the de-bias counts time steps), and the traces/gradient follow the published formula
  (checked against a hand computation of eps_x, eps_f).
- (Batch = sum of per-sample gradients, float32, bad input: test_algorithms_api.py; the
  approximate regime: test_algorithms_approx.py.)
"""

from __future__ import annotations

import math

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import etrace_core
from etrace_core import nn
from etrace_core.nn.surrogate import spike_fn

EXACT = 1e-10
I, H, O = 4, 5, 3

ALGOS = {
    "d_rtrl": lambda m, **kw: etrace_core.D_RTRL(m, **kw),
    "es_d_rtrl": lambda m, **kw: etrace_core.ES_D_RTRL(m, decay_or_rank=0.7, **kw),
    "hybrid": lambda m, **kw: etrace_core.HybridDimVjpAlgorithm(m, decay_or_rank=0.7, **kw),
}


# ============================================================================ helpers


def mse(y, t):
    return jnp.sum((y - t) ** 2)


def rel_err(got, ref):
    """max |got - ref| / max |ref| (the reference must not vanish)."""
    ref = np.asarray(ref)
    scale = np.max(np.abs(ref))
    assert scale > 0, "reference gradient is identically zero: the check would be vacuous"
    return float(np.max(np.abs(np.asarray(got) - ref)) / scale)


def assert_grads_close(got, ref, tol=EXACT, paths=None):
    paths = list(ref) if paths is None else paths
    assert set(paths) <= set(got), f"missing gradients: {set(paths) - set(got)}"
    errs = {p: rel_err(got[p], ref[p]) for p in paths}
    bad = {p: e for p, e in errs.items() if not e <= tol}
    assert not bad, f"relative errors above {tol}: {bad}"


def param_values(model):
    return {p: s.value for p, s in model.states(brainstate.ParamState).items()}


def state_values(model):
    return {
        p: s.value for p, s in model.states().items() if not isinstance(s, brainstate.ParamState)
    }


def sequence(batch, T, n_in=I, n_out=O, seed=0, scale=1.0):
    shape = (T, n_in) if batch is None else (T, batch, n_in)
    xs = scale * jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.result_type(float))
    ys = jax.random.normal(
        jax.random.PRNGKey(seed + 1), shape[:-1] + (n_out,), jnp.result_type(float)
    )
    return xs, ys


def hand_bptt(step, params, h0, xs, ys, loss=mse):
    """(loss, grads) of sum_t loss(step(params, h^{t-1}, x^t)[0], y^t), by jax.grad."""

    def total(params):
        def body(h, xy):
            out, h = step(params, h, xy[0])
            return h, loss(out, xy[1])

        _, losses = jax.lax.scan(body, h0, (xs, ys))
        return jnp.sum(losses)

    return jax.value_and_grad(total)(params)


def pure_model_step(model):
    """The model's step as a pure function ``(params, others, x) -> (out, others)``."""
    graphdef, tree = brainstate.graph.treefy_split(model)
    flat = tree.to_flat()

    def step(params, others, x):
        vals = {**others, **params}
        clone = brainstate.graph.treefy_merge(
            graphdef, type(tree).from_flat({p: flat[p].replace(value=vals[p]) for p in flat})
        )
        out = clone(x)
        new = {p: s.value for p, s in clone.states().items() if p in others}
        return out, new

    return step


def bptt_grads(model, xs, ys, loss=mse):
    """Generic BPTT of the model as it is now (parameters and states are not modified)."""
    return hand_bptt(pure_model_step(model), param_values(model), state_values(model), xs, ys, loss)


def make_algo(name, model, x0, **kw):
    algo = ALGOS[name](model, **kw)
    algo.compile_graph(x0)
    algo.init_etrace_state()
    return algo


def per_step_grads(algo, xs, ys, loss=mse):
    """Sum over t of brainstate.transform.grad(loss(algo(x^t), y^t)) (jitted step)."""
    params = algo.model.states(brainstate.ParamState)
    f = brainstate.transform.jit(brainstate.transform.grad(lambda x, y: loss(algo(x), y), params))
    total = None
    for t in range(xs.shape[0]):
        g = f(xs[t], ys[t])
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    return total


def window_grads(algo, xs, ys, sizes, loss=mse):
    """Sum of the gradients of algo(MultiStepData(chunk)) over consecutive chunks of `sizes`."""
    params = algo.model.states(brainstate.ParamState)

    def chunk_loss(x, y):
        return jnp.sum(jax.vmap(loss)(algo(etrace_core.MultiStepData(x)), y))

    f = brainstate.transform.jit(brainstate.transform.grad(chunk_loss, params))
    total, t = None, 0
    for k in sizes:
        g = f(xs[t : t + k], ys[t : t + k])
        total = g if total is None else jax.tree.map(jnp.add, total, g)
        t += k
    assert t == xs.shape[0]
    return total


# ============================================================================ models


def _linear(params, prefix, x):
    y = x @ params[prefix + ("weight",)]
    b = params.get(prefix + ("bias",))
    return y if b is None else y + b


class LeakyNet(brainstate.nn.Module):
    """Leaky rate cell without recurrent weights + Linear readout."""

    tau = 4.0

    def __init__(self):
        super().__init__()
        self.cell = nn.LeakyRNNCell(I, H, tau=self.tau, recurrent=False, key=0)
        self.out = nn.Linear(H, O, key=1)

    def update(self, x):
        return self.out(self.cell(x))


def leaky_step(params, h, x):
    d = math.exp(-1.0 / LeakyNet.tau)
    hh = d * h[("cell", "h")] + (1 - d) * jnp.tanh(_linear(params, ("cell", "W_in"), x))
    return _linear(params, ("out",), hh), {("cell", "h"): hh}


class LIFNet(brainstate.nn.Module):
    """Adaptive LIF without recurrent weights (two states V, a per neuron) + Linear readout."""

    kw = dict(tau_mem=4.0, tau_adapt=20.0, beta=0.3, threshold=1.0)

    def __init__(self):
        super().__init__()
        self.lif = nn.LIF(I, H, recurrent=False, w_init=nn.init.normal(1.5), key=0, **self.kw)
        self.out = nn.Linear(H, O, key=1)

    def update(self, x):
        return self.out(self.lif(x))


def lif_step(params, h, x):
    kw = LIFNet.kw
    alpha, rho = math.exp(-1.0 / kw["tau_mem"]), math.exp(-1.0 / kw["tau_adapt"])
    thr, beta = kw["threshold"], kw["beta"]
    V, a = h[("lif", "V")], h[("lif", "a")]
    s = spike_fn((V - thr - beta * a) / thr)
    V = alpha * V + (1 - alpha) * (x @ params[("lif", "W_in", "weight")]) - thr * s
    a = rho * a + s
    out = spike_fn((V - thr - beta * a) / thr)
    return _linear(params, ("out",), out), {("lif", "V"): V, ("lif", "a"): a}


class TwoStateCell(brainstate.nn.Module):
    """Two hidden states per unit with a same-step coupling (h^t reads c^t):
    c' = 0.8 c + 0.2 tanh(x W1 + b1) - 0.3 h;   h' = tanh(c') + 0.5 h sigmoid(x W2)."""

    def __init__(self, n_in, n):
        super().__init__()
        self.n = n
        self.W1 = nn.Linear(n_in, n, key=10)
        self.W2 = nn.Linear(n_in, n, bias=False, key=11)

    def init_state(self, batch_size=None, **kw):
        shape = (self.n,) if batch_size is None else (batch_size, self.n)
        self.c = brainstate.HiddenState(jnp.zeros(shape, jnp.result_type(float)))
        self.h = brainstate.HiddenState(jnp.zeros(shape, jnp.result_type(float)))

    def update(self, x):
        c = 0.8 * self.c.value + 0.2 * jnp.tanh(self.W1(x)) - 0.3 * self.h.value
        h = jnp.tanh(c) + 0.5 * self.h.value * jax.nn.sigmoid(self.W2(x))
        self.c.value = c
        self.h.value = h
        return h


class TwoStateNet(brainstate.nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = TwoStateCell(I, H)
        self.out = nn.Linear(H, O, key=1)

    def update(self, x):
        return self.out(self.cell(x))


def two_state_step(params, h, x):
    c0, h0 = h[("cell", "c")], h[("cell", "h")]
    c = 0.8 * c0 + 0.2 * jnp.tanh(_linear(params, ("cell", "W1"), x)) - 0.3 * h0
    hh = jnp.tanh(c) + 0.5 * h0 * jax.nn.sigmoid(x @ params[("cell", "W2", "weight")])
    return _linear(params, ("out",), hh), {("cell", "c"): c, ("cell", "h"): hh}


class RateReadoutNet(brainstate.nn.Module):
    """A single leaky rate readout on the input (element-wise recurrence r' = d r + (1-d) x W)."""

    tau = 3.0

    def __init__(self):
        super().__init__()
        self.ro = nn.LeakyRateReadout(I, O, tau=self.tau, key=2)

    def update(self, x):
        return self.ro(x)


def rate_readout_step(params, h, x):
    d = math.exp(-1.0 / RateReadoutNet.tau)
    r = d * h[("ro", "r")] + (1 - d) * (x @ params[("ro", "W", "weight")])
    return r, {("ro", "r"): r}


EXACT_MODELS = {
    "leaky": (LeakyNet, leaky_step, 1.0),
    "lif": (LIFNet, lif_step, 3.0),
    "two_state": (TwoStateNet, two_state_step, 1.0),
    "rate_readout": (RateReadoutNet, rate_readout_step, 1.0),
}


def build(cls, batch):
    model = cls()
    brainstate.nn.init_all_states(model, batch_size=batch)
    return model


def randomize_hidden(model, seed=0):
    """Non-zero initial hidden states: exactness must not rely on starting from zero."""
    for i, st in enumerate(model.states(brainstate.HiddenState).values()):
        st.value = jax.random.uniform(
            jax.random.PRNGKey(100 * seed + i), st.value.shape, st.value.dtype, -0.5, 0.5
        )


def hand_reference(name, batch, T, seed=0):
    cls, step, scale = EXACT_MODELS[name]
    model = build(cls, batch)
    randomize_hidden(model, seed)
    xs, ys = sequence(batch, T, seed=seed, scale=scale)
    loss, grads = hand_bptt(step, param_values(model), state_values(model), xs, ys)
    return model, xs, ys, loss, grads


# ============================================================================ tests


def test_generic_bptt_reference_matches_hand_written(x64):
    """The generic reference (used for GRU/LSTM) agrees with a hand-written step."""
    model, xs, ys, loss, ref = hand_reference("two_state", 2, 5)
    loss2, got = bptt_grads(model, xs, ys)
    assert abs(float(loss2 - loss)) <= 1e-12 * abs(float(loss))
    assert_grads_close(got, ref, 1e-12)


@pytest.mark.parametrize("batch", [None, 3])
@pytest.mark.parametrize("name", list(EXACT_MODELS))
def test_d_rtrl_equals_bptt(x64, name, batch):
    """Every weight, through run_online and through per-step brainstate grad of algo(x),
    from random (non-zero) initial hidden states."""
    model, xs, ys, loss, ref = hand_reference(name, batch, T=6)
    init = state_values(model)
    algo = make_algo("d_rtrl", model, xs[0])
    assert set(algo._plan.kinds) == {"param"}
    res = etrace_core.run_online(algo, mse, xs, ys)
    assert abs(float(res.loss - loss)) <= 1e-12 * abs(float(loss))
    assert set(res.grads) == set(ref)
    assert_grads_close(res.grads, ref)
    if name == "leaky":
        check_leaky_trace(model, algo, xs, batch)
    # the same sequence again, one (jitted) brainstate.transform.grad per step
    for p, st in model.states(brainstate.HiddenState).items():
        st.value = init[p]
    algo.init_etrace_state()
    assert_grads_close(per_step_grads(algo, xs, ys), ref)


def check_leaky_trace(model, algo, xs, batch):
    """The stored D-RTRL trace of the leaky cell is eps^t = d eps^{t-1} + df^t X^t."""
    params = param_values(model)
    lead = () if batch is None else (batch,)
    (eps,) = algo.get_etrace_of(("cell", "W_in", "weight")).values()
    assert eps["eps"].shape == lead + (I + 1, H, 1)
    d = math.exp(-1.0 / LeakyNet.tau)
    ref = jnp.zeros(lead + (I + 1, H))
    for t in range(xs.shape[0]):
        X = jnp.concatenate([xs[t], jnp.ones(lead + (1,))], axis=-1)
        df = (1 - d) * (1 - jnp.tanh(_linear(params, ("cell", "W_in"), xs[t])) ** 2)
        ref = d * ref + X[..., :, None] * df[..., None, :]
    np.testing.assert_allclose(eps["eps"][..., 0], ref, rtol=1e-12, atol=1e-14)


def test_hybrid_picks_param_dim_for_small_weights_and_is_exact(x64):
    model, xs, ys, _, ref = hand_reference("lif", 3, T=6, seed=5)
    algo = make_algo("hybrid", model, xs[0])
    assert set(algo._plan.kinds) == {"param"}
    assert_grads_close(etrace_core.run_online(algo, mse, xs, ys).grads, ref)


# ---------------------------------------------------------------- untraced weights


class PlainWeights(brainstate.nn.Module):
    """A leaky cell whose gain weight `g` is used with plain jnp (not an ETP op), an ETP readout
    and a plain-jnp readout `R` (+ `c`)."""

    def __init__(self):
        super().__init__()
        self.cell = nn.LeakyRNNCell(I, H, tau=4.0, recurrent=False, key=0)
        self.g = brainstate.ParamState(jnp.linspace(0.5, 1.5, H))
        self.out = nn.Linear(H, O, key=1)
        self.R = brainstate.ParamState(
            0.3 * jax.random.normal(jax.random.PRNGKey(7), (H, O), jnp.result_type(float))
        )
        self.c = brainstate.ParamState(jnp.full((O,), 0.1))

    def init_state(self, batch_size=None, **kw):
        shape = (H,) if batch_size is None else (batch_size, H)
        self.m = brainstate.HiddenState(jnp.zeros(shape, jnp.result_type(float)))

    def update(self, x):
        h = self.cell(x)
        m = 0.5 * self.m.value + jnp.tanh(self.g.value * h)  # g: plain jnp, reaches a state
        self.m.value = m
        return self.out(m) + m @ self.R.value + self.c.value


def plain_step(params, h, x):
    d = math.exp(-1.0 / 4.0)
    hh = d * h[("cell", "h")] + (1 - d) * jnp.tanh(_linear(params, ("cell", "W_in"), x))
    m = 0.5 * h[("m",)] + jnp.tanh(params[("g",)] * hh)
    out = _linear(params, ("out",), m) + m @ params[("R",)] + params[("c",)]
    return out, {("cell", "h"): hh, ("m",): m}


def same_step_grads(step, params, h0, xs, ys, loss=mse):
    """sum_t d loss_t / d params with h^{t-1} held fixed (the exact same-step gradient)."""
    grad_t = jax.jit(jax.grad(lambda p, h, x, y: loss(step(p, h, x)[0], y)))
    h, total = h0, None
    for t in range(xs.shape[0]):
        g = grad_t(params, h, xs[t], ys[t])
        total = g if total is None else jax.tree.map(jnp.add, total, g)
        h = step(params, h, xs[t])[1]
    return total


def test_untraced_weights_get_exact_same_step_gradient(x64):
    """Readouts (plain jnp or ETP) get their exact same-step gradient (= BPTT's); the gain `g`,
    used with plain jnp ops on the way to a hidden state, gets an element-wise trace and BPTT's
    gradient (its same-step gradient would not be: the check is not vacuous)."""
    model = build(PlainWeights, 3)
    randomize_hidden(model, 1)
    xs, ys = sequence(3, 5, seed=11)
    params, h0 = param_values(model), state_values(model)
    _, bptt = hand_bptt(plain_step, params, h0, xs, ys)
    same = same_step_grads(plain_step, params, h0, xs, ys)
    untraced = [("R",), ("c",), ("out", "weight"), ("out", "bias")]
    assert rel_err(same[("g",)], bptt[("g",)]) > 1e-3
    for name in ALGOS:
        for p, st in model.states(brainstate.HiddenState).items():
            st.value = h0[p]
        algo = make_algo(name, model, xs[0])
        traced = {r.weight_path for r in algo.graph.hidden_param_op_relations}
        assert traced == {("cell", "W_in", "weight")}, name
        assert {r.path: r.kind for r in algo.executor.param_trace_relations} == {
            ("g",): "elementwise"
        }
        got = etrace_core.run_online(algo, mse, xs, ys).grads
        for p in untraced:
            assert float(jnp.max(jnp.abs(got[p]))) > 0, f"{name}: {p} got a zero gradient"
        assert_grads_close(got, same, paths=untraced)
        assert_grads_close(got, bptt, paths=untraced + [("g",)])  # readouts: same-step = BPTT


# ---------------------------------------------------------------- multi-step windows


class GRUNet(brainstate.nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRUCell(I, H, key=0)
        self.out = nn.Linear(H, O, key=1)

    def update(self, x):
        return self.out(self.rnn(x))


class LSTMNet(brainstate.nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTMCell(I, H, key=0)
        self.out = nn.Linear(H, O, key=1)

    def update(self, x):
        return self.out(self.rnn(x))


WINDOW_ALGOS = {
    "d_rtrl": etrace_core.D_RTRL,
    "es_d_rtrl": lambda m, **kw: etrace_core.ES_D_RTRL(m, decay_or_rank=0.7, **kw),
    # a mixed hybrid: param-dim for the input weight, io-dim for the recurrent one
    "hybrid": lambda m, **kw: etrace_core.HybridDimVjpAlgorithm(
        m, decay_or_rank=0.7, mode={("rnn", "W_hh", "weight"): "io"}, **kw
    ),
}


@pytest.mark.parametrize(
    "cls, algo_names",
    [(GRUNet, ["d_rtrl", "es_d_rtrl", "hybrid"]), (LSTMNet, ["d_rtrl", "es_d_rtrl"])],
    ids=["gru", "lstm"],
)
def test_one_window_over_the_sequence_is_bptt(x64, cls, algo_names):
    """vjp_method='multi-step', one MultiStepData window of all T steps: every algorithm gives
    the BPTT gradient, also with recurrent weights."""
    T = 5
    model = build(cls, 2)
    randomize_hidden(model, 2)
    init = state_values(model)
    xs, ys = sequence(2, T, seed=2)
    _, ref = bptt_grads(model, xs, ys)
    for name in algo_names:
        for p, st in model.states(brainstate.HiddenState).items():
            st.value = init[p]
        algo = WINDOW_ALGOS[name](model, vjp_method="multi-step")
        algo.compile_graph(etrace_core.MultiStepData(xs))
        algo.init_etrace_state()
        if name == "hybrid":
            assert sorted(algo._plan.kinds) == ["io", "param"]
        assert_grads_close(window_grads(algo, xs, ys, [T]), ref)


@pytest.mark.parametrize("sizes", [[1, 3, 2]])
def test_windows_of_any_size_are_exact_for_element_wise_models(x64, sizes):
    """D-RTRL traces carry the exact gradient across window boundaries when D is diagonal."""
    model, xs, ys, _, ref = hand_reference("two_state", 2, T=6, seed=4)
    algo = etrace_core.D_RTRL(model, vjp_method="multi-step")
    algo.compile_graph(xs[0])
    algo.init_etrace_state()
    assert_grads_close(window_grads(algo, xs, ys, sizes), ref)


# ---------------------------------------------------------------- single-step chunks, ES-D-RTRL


def test_chunks_equal_stepping_and_count_time_steps(x64, algo_name="es_d_rtrl"):
    """vjp_method='single-step' on MultiStepData chunks of any sizes = the per-step online
    gradients, summed. For ES-D-RTRL this needs the de-bias 1/(1 - a^t) to count time steps."""
    T = 6
    model = build(GRUNet, 2)
    randomize_hidden(model, 3)
    init = state_values(model)
    xs, ys = sequence(2, T, seed=8)

    def fresh():
        for p, st in model.states(brainstate.HiddenState).items():
            st.value = init[p]
        algo = make_algo(algo_name, model, xs[0])
        return algo

    ref = etrace_core.run_online(fresh(), mse, xs, ys).grads
    for sizes in ([1, 2, 3], [T]):
        algo = fresh()
        assert_grads_close(window_grads(algo, xs, ys, sizes), ref)
        assert int(algo.etrace.value["count"]) == T


@pytest.mark.parametrize("decay_or_rank, alpha", [(0.6, 0.6), (4, 0.6), (1, 0.0)])
def test_es_d_rtrl_formula_by_hand(x64, decay_or_rank, alpha):
    """1-layer leaky cell, loss on h^t directly: eps_x = a eps_x + X, eps_f = a d eps_f + (1-a) df,
    grad_t = sum_b outer(eps_x, dL/dh^t * eps_f) / (1 - a^t)."""
    B, T = 3, 6
    cell = nn.LeakyRNNCell(I, H, tau=4.0, recurrent=False, key=0)
    brainstate.nn.init_all_states(cell, batch_size=B)
    W, b = cell.W_in.weight.value, cell.W_in.bias.value
    xs, ys = sequence(B, T, n_out=H, seed=12)
    algo = etrace_core.ES_D_RTRL(cell, decay_or_rank=decay_or_rank)
    assert algo.decay == pytest.approx(alpha, abs=1e-15)
    algo.compile_graph(xs[0])
    algo.init_etrace_state()
    got = etrace_core.run_online(algo, mse, xs, ys).grads

    d = math.exp(-1.0 / 4.0)
    h = jnp.zeros((B, H))
    ex, ef = jnp.zeros((B, I + 1)), jnp.zeros((B, H))
    gW, gb = jnp.zeros((I, H)), jnp.zeros((H,))
    for t in range(T):
        pre = xs[t] @ W + b
        h = d * h + (1 - d) * jnp.tanh(pre)
        df = (1 - d) * (1 - jnp.tanh(pre) ** 2)
        ex = alpha * ex + jnp.concatenate([xs[t], jnp.ones((B, 1))], axis=-1)
        ef = alpha * d * ef + (1 - alpha) * df
        delta = 2 * (h - ys[t])
        M = jnp.einsum("bi,bo->io", ex, delta * ef) / (1 - alpha ** (t + 1))
        gW, gb = gW + M[:I], gb + M[I]
    assert_grads_close(got, {("W_in", "weight"): gW, ("W_in", "bias"): gb})
    (tr,) = algo.get_etrace_of(("W_in", "weight")).values()
    assert tr["x"].shape == (B, I + 1) and tr["f"].shape == (B, H, 1)
    np.testing.assert_allclose(tr["x"], ex, rtol=1e-12)
    np.testing.assert_allclose(tr["f"][..., 0], ef, rtol=1e-12)


@pytest.mark.parametrize("name", ["leaky", "two_state"])
def test_single_step_vjp_over_multistep_data_is_exact_for_element_wise_models(x64, name):
    """``vjp_method='single-step'`` given ``MultiStepData`` (braintrace raises
    NotImplementedError there) runs the chunk's steps online one after the other: for a model
    whose recurrence is element-wise, D-RTRL's gradient of the chunk's summed loss is BPTT's
    (``jax.grad`` through the unrolled sequence), whatever the chunk sizes."""
    model, xs, ys, _, ref = hand_reference(name, 2, T=6, seed=4)
    init = state_values(model)
    for sizes in ([6], [2, 4], [1, 3, 2]):
        for p, st in model.states(brainstate.HiddenState).items():
            st.value = init[p]
        algo = make_algo("d_rtrl", model, xs[0])
        assert algo.vjp_method == "single-step"
        assert_grads_close(window_grads(algo, xs, ys, sizes), ref)
