"""UORO (etrace_core.UORO): a rank-one, unbiased, noisy estimate of the RTRL gradient.

Oracles, float64 (the ``x64`` fixture):

- unbiasedness: the mean of the online gradient over N = 2000 independent projection keys
  against ``jax.grad`` through the unrolled steps (BPTT), per gradient element within
  ``5 * SE + 1e-12`` with SE the sample standard error (std, ddof=1, over sqrt(N)). With about
  50 elements checked, a correct estimator fails this with probability ~3e-5; the same bound
  rejects D-RTRL (biased on a recurrent matmul), which checks the test's power;
- T = 1 and a zero carrier: the gradient is BPTT's exactly, whatever the key (1e-10);
- the projector ``nu^T J`` recovered from the carrier after one step equals ``jax.vjp`` of the
  step's drive written with plain ``jnp`` ops (matmul with bias, element-wise, conv, a tied
  weight), 1e-12;
- a multi-step window from a zero carrier is BPTT over the window (1e-10); a single-step
  chunk equals the same steps taken one at a time (1e-12); same key -> same gradients.
"""

from __future__ import annotations

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import etrace_core

B, I, H, O = 1, 3, 4, 2
N_KEYS = 2000


def _normal(seed, shape, scale):
    return scale * jax.random.normal(jax.random.PRNGKey(seed), shape)


class TanhRNN(brainstate.nn.Module):
    """``h' = tanh(x Wx + h Wh + b)``, readout ``y = h' Wo``: the recurrence mixes units."""

    def __init__(self):
        super().__init__()
        self.wx = brainstate.ParamState(_normal(0, (I, H), 0.6))
        self.wh = brainstate.ParamState(_normal(1, (H, H), 0.6))
        self.b = brainstate.ParamState(_normal(2, (H,), 0.1))
        self.wo = brainstate.ParamState(_normal(3, (H, O), 0.5))
        self.h = brainstate.HiddenState(jnp.zeros((B, H)))

    def update(self, x):
        pre = etrace_core.matmul(x, self.wx.value)
        self.h.value = jnp.tanh(pre + etrace_core.matmul(self.h.value, self.wh.value, self.b.value))
        return self.h.value @ self.wo.value


def tanh_rnn_bptt(p, xs):
    h, loss = jnp.zeros((B, H)), 0.0
    for x in xs:
        h = jnp.tanh(x @ p[("wx",)] + h @ p[("wh",)] + p[("b",)])
        loss = loss + jnp.sum(jnp.sin(h @ p[("wo",)]))
    return loss


class TwoLayer(brainstate.nn.Module):
    """Two stacked tanh layers (two hidden groups); layer 1 reaches layer 2's state."""

    def __init__(self):
        super().__init__()
        self.w1 = brainstate.ParamState(_normal(4, (I, H), 0.6))
        self.u1 = brainstate.ParamState(_normal(5, (H, H), 0.6))
        self.w2 = brainstate.ParamState(_normal(6, (H, H), 0.6))
        self.u2 = brainstate.ParamState(_normal(7, (H, H), 0.6))
        self.h1 = brainstate.HiddenState(jnp.zeros((B, H)))
        self.h2 = brainstate.HiddenState(jnp.zeros((B, H)))

    def update(self, x):
        h1 = jnp.tanh(
            etrace_core.matmul(x, self.w1.value) + etrace_core.matmul(self.h1.value, self.u1.value)
        )
        h2 = jnp.tanh(
            etrace_core.matmul(h1, self.w2.value) + etrace_core.matmul(self.h2.value, self.u2.value)
        )
        self.h1.value, self.h2.value = h1, h2
        return h2


def two_layer_bptt(p, xs):
    h1, h2, loss = jnp.zeros((B, H)), jnp.zeros((B, H)), 0.0
    for x in xs:
        h1 = jnp.tanh(x @ p[("w1",)] + h1 @ p[("u1",)])
        h2 = jnp.tanh(h1 @ p[("w2",)] + h2 @ p[("u2",)])
        loss = loss + jnp.sum(jnp.sin(h2))
    return loss


def _xs(T, seed=11):
    return _normal(seed, (T, B, I), 1.0)


def _params(model):
    return {k: v.value for k, v in model.states(brainstate.ParamState).items()}


def _online_fn(algo, xs, hidden, loss=lambda y: jnp.sum(jnp.sin(y))):
    """A jitted function key -> the sum over steps of the online gradients from zero states."""
    model = algo.model
    params = model.states(brainstate.ParamState)

    def run(key):
        for st in hidden:
            st.value = jnp.zeros_like(st.value)
        algo.init_etrace_state(key=key)
        total = jax.tree.map(jnp.zeros_like, {k: v.value for k, v in params.items()})
        for x in xs:
            g = brainstate.transform.grad(lambda x: loss(algo(x)), params)(x)
            total = jax.tree.map(jnp.add, total, g)
        return total

    return brainstate.transform.jit(run)


def _samples(fn, n):
    gs = [fn(jax.random.PRNGKey(s)) for s in range(n)]
    return {k: np.stack([np.asarray(g[k]) for g in gs]) for k in gs[0]}


def _z_excess(samples, ref):
    """max over elements of |mean - ref| / (5 SE + 1e-12): <= 1 passes."""
    worst = 0.0
    for k, a in samples.items():
        se = a.std(axis=0, ddof=1) / np.sqrt(a.shape[0])
        worst = max(worst, float(np.max(np.abs(a.mean(0) - np.asarray(ref[k])) / (5 * se + 1e-12))))
    return worst


def _build(model_cls, T, **kwargs):
    model = model_cls()
    brainstate.nn.init_all_states(model)
    algo = etrace_core.UORO(model, vjp_method="single-step", **kwargs)
    algo.compile_graph(_xs(T)[0])
    return model, algo


# ---- (a) unbiasedness ------------------------------------------------------------------------


@pytest.mark.parametrize("T", [3, 5])
def test_mean_over_keys_is_bptt_on_a_recurrent_matmul(x64, T):
    model, algo = _build(TanhRNN, T)
    xs = _xs(T)
    ref = jax.grad(tanh_rnn_bptt)(_params(model), xs)
    samples = _samples(_online_fn(algo, xs, [model.h]), N_KEYS)
    assert _z_excess(samples, ref) <= 1.0
    # the readout reaches no hidden state: its gradient is exact for every key
    np.testing.assert_allclose(
        samples[("wo",)], np.broadcast_to(ref[("wo",)], samples[("wo",)].shape), atol=1e-10
    )
    # a single draw is not BPTT (the estimate is noisy, and labelled so)
    assert np.max(np.abs(samples[("wh",)][0] - ref[("wh",)])) > 1e-3
    assert "unbiased" in algo.approximate_options[0]


def test_the_bound_rejects_a_biased_gradient(x64):
    """Power check: D-RTRL drops the recurrent matmul from its trace; the bound catches it."""
    T = 5
    model, algo = _build(TanhRNN, T)
    xs = _xs(T)
    ref = jax.grad(tanh_rnn_bptt)(_params(model), xs)
    samples = _samples(_online_fn(algo, xs, [model.h]), N_KEYS)
    d_model = TanhRNN()
    brainstate.nn.init_all_states(d_model)
    d_rtrl = etrace_core.D_RTRL(d_model)
    d_rtrl.compile_graph(xs[0])
    params = d_model.states(brainstate.ParamState)
    biased = None
    for x in xs:
        g = brainstate.transform.grad(lambda x: jnp.sum(jnp.sin(d_rtrl(x))), params)(x)
        biased = g if biased is None else jax.tree.map(jnp.add, biased, g)
    shifted = {k: a - np.asarray(ref[k]) + np.asarray(biased[k]) for k, a in samples.items()}
    assert _z_excess(shifted, ref) > 1.0


def test_mean_over_keys_is_bptt_across_two_hidden_groups(x64):
    T = 4
    model, algo = _build(TwoLayer, T)
    assert len(algo.graph.hidden_groups) == 2
    xs = _xs(T)
    ref = jax.grad(two_layer_bptt)(_params(model), xs)
    samples = _samples(_online_fn(algo, xs, [model.h1, model.h2]), N_KEYS)
    assert _z_excess(samples, ref) <= 1.0


# ---- (b) T = 1 exactness, windows, chunks ----------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_step_from_a_zero_carrier_is_bptt_for_any_key(x64, seed):
    model, algo = _build(TanhRNN, 1)
    xs = _xs(1)
    ref = jax.grad(tanh_rnn_bptt)(_params(model), xs)
    got = _online_fn(algo, xs, [model.h])(jax.random.PRNGKey(seed))
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], atol=1e-10, rtol=0)


def _window_grad(algo, xs):
    """Gradient of sum(sin(outputs)) over one MultiStepData window, by parameter path."""
    params = algo.model.states(brainstate.ParamState)
    return brainstate.transform.grad(
        lambda xs: jnp.sum(jnp.sin(algo(etrace_core.MultiStepData(xs)))), params
    )(xs)


def test_a_window_from_a_zero_carrier_is_bptt(x64):
    T = 4
    model = TanhRNN()
    brainstate.nn.init_all_states(model)
    algo = etrace_core.UORO(model, projection_key=3)  # vjp_method='multi-step' (default)
    xs = _xs(T)
    algo.compile_graph(etrace_core.MultiStepData(xs))
    ref = jax.grad(tanh_rnn_bptt)(_params(model), xs)
    got = _window_grad(algo, xs)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], atol=1e-10, rtol=0)
    # the carrier advanced one step per time step
    assert int(algo._get_etrace_data()["step"]) == T


def test_a_single_step_chunk_equals_the_steps_one_at_a_time(x64):
    T = 4
    xs = _xs(T)
    model, algo = _build(TanhRNN, T, projection_key=7)
    by_step = _online_fn(algo, xs, [model.h])(jax.random.PRNGKey(7))
    carrier_steps = algo._get_etrace_data()

    _, algo2 = _build(TanhRNN, T, projection_key=7)
    chunk = _window_grad(algo2, xs)
    for k in by_step:
        np.testing.assert_allclose(chunk[k], by_step[k], atol=1e-12, rtol=0)
    for a, b in zip(jax.tree.leaves(carrier_steps), jax.tree.leaves(algo2._get_etrace_data())):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-12, rtol=0)


# ---- (c) the projector nu^T J against jax.vjp of the drive -----------------------------------

LEAK = 0.9


class Leaky(brainstate.nn.Module):
    """``h' = LEAK h + drive(x, params)``: dh'/d drive = 1, so the projector is a VJP of drive."""

    def __init__(self, params, hidden_shape, drive):
        super().__init__()
        self.p = {k: brainstate.ParamState(v) for k, v in params.items()}
        self.h = brainstate.HiddenState(jnp.zeros(hidden_shape))
        self.drive = drive

    def update(self, x):
        vals = {k: st.value for k, st in self.p.items()}
        self.h.value = LEAK * self.h.value + self.drive(x, vals, etrace=True)
        return self.h.value


def _mm(x, v, etrace):
    if etrace:
        return etrace_core.matmul(x, v["w"], v["b"])
    return x @ v["w"] + v["b"]


def _ew(x, v, etrace):
    g = etrace_core.element_wise(jnp.exp, v["g"]) if etrace else jnp.exp(v["g"])
    return x[:, :H] * g


def _conv(x, v, etrace):
    if etrace:
        return etrace_core.conv(
            x, v["k"], v["b"], padding="SAME", dimension_numbers=("NWC", "WIO", "NWC")
        )
    y = jax.lax.conv_general_dilated(
        x, v["k"], (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC")
    )
    return y + v["b"]


def _tied(x, v, etrace):
    if etrace:
        return etrace_core.matmul(x, v["w"]) + etrace_core.matmul(jnp.tanh(x), v["w"])
    return x @ v["w"] + jnp.tanh(x) @ v["w"]


CASES = {
    "matmul": (_mm, {"w": (I, H), "b": (H,)}, (B, I), (B, H)),
    "element_wise": (_ew, {"g": (H,)}, (B, I + 1), (B, H)),
    "conv": (_conv, {"k": (3, 2, 3), "b": (3,)}, (B, 6, 2), (B, 6, 3)),
    "tied": (_tied, {"w": (I, H)}, (B, I), (B, H)),
}


class TableUORO(etrace_core.UORO):
    """UORO with a fixed projection vector (the braintrace-compatible ``_draw_projection``)."""

    def __init__(self, model, nu, **kwargs):
        super().__init__(model, **kwargs)
        self.nu = nu

    def _draw_projection(self, key, step, group_index, shape, dtype):
        return jnp.reshape(self.nu, shape).astype(dtype)


@pytest.mark.parametrize("name", sorted(CASES))
def test_projector_is_the_vjp_of_the_drive(x64, name):
    drive, pshapes, xshape, hshape = CASES[name]
    params = {k: _normal(20 + n, s, 0.5) for n, (k, s) in enumerate(sorted(pshapes.items()))}
    x = _normal(30, xshape, 1.0)
    nu = jnp.where(jnp.arange(int(np.prod(hshape))) % 3 == 0, 1.0, -1.0).reshape(hshape + (1,))
    model = Leaky(params, hshape, drive)
    brainstate.nn.init_all_states(model)
    algo = TableUORO(model, nu, vjp_method="single-step")
    algo.compile_graph(x)
    algo(x)
    data = algo._get_etrace_data()
    s = np.asarray(data["s_tilde"][0])
    np.testing.assert_allclose(
        s / np.linalg.norm(s), np.asarray(nu) / np.linalg.norm(nu), atol=1e-14
    )
    rho1 = np.linalg.norm(s) / np.linalg.norm(nu)  # s = rho1 nu, theta = proj / rho1
    _, pull = jax.vjp(lambda v: drive(x, v, etrace=False), params)
    (want,) = pull(nu[..., 0])
    got = {path[-1]: rho1 * np.asarray(th) for (blk, path), th in data["theta_tilde"].items()}
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-12, rtol=0)


# ---- (d) determinism, (e) layout -----------------------------------------------------------


def test_same_key_same_gradient_other_key_other_gradient(x64):
    T = 3
    model, algo = _build(TanhRNN, T)
    fn = _online_fn(algo, _xs(T), [model.h])
    a, b, c = fn(jax.random.PRNGKey(1)), fn(jax.random.PRNGKey(1)), fn(jax.random.PRNGKey(2))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert np.max(np.abs(a[("wh",)] - c[("wh",)])) > 1e-6
    # projection_key: the constructor's seed gives the same stream after reset_state
    model2, algo2 = _build(TanhRNN, T, projection_key=1)
    first = algo2._get_etrace_data()["key"]
    np.testing.assert_array_equal(first, jax.random.PRNGKey(1))
    algo2(_xs(T)[0])
    algo2.reset_state()
    np.testing.assert_array_equal(algo2._get_etrace_data()["key"], jax.random.PRNGKey(1))


def test_carrier_layout_two_groups():
    model, algo = _build(TwoLayer, 2)
    data = algo._get_etrace_data()
    groups = algo.graph.hidden_groups
    assert sorted(data["s_tilde"]) == [g.index for g in groups]
    for g in groups:
        assert data["s_tilde"][g.index].shape == tuple(g.varshape) + (g.num_state,)
    assert set(data["theta_tilde"]) == {(0, (n,)) for n in ("w1", "u1", "w2", "u2")}
    for (_, path), th in data["theta_tilde"].items():
        assert th.shape == model.states(brainstate.ParamState)[path].value.shape
    assert set(algo.get_etrace_of(model.w2)) == {(0, ("w2",))}
    sizes = algo.trace_sizes()
    assert sum(sizes.values()) == 2 * B * H + I * H + 3 * H * H


def test_rejects_a_zero_eps_and_compile_by_name():
    with pytest.raises(ValueError, match="projection_eps"):
        etrace_core.UORO(TanhRNN(), projection_eps=0.0)
    model = TanhRNN()
    algo = etrace_core.compile(model, "uoro", _xs(1)[0])
    assert isinstance(algo, etrace_core.UORO)
    assert "UORO" in algo.show_graph(verbose=False, return_msg=True)


def test_run_online_refuses_uoro():
    model, algo = _build(TanhRNN, 2)
    with pytest.raises(etrace_core.NotSupportedError, match="UORO"):
        etrace_core.run_online(
            algo, lambda y, t: jnp.sum((y - t) ** 2), _xs(2), jnp.zeros((2, B, O))
        )
