"""`run_online(..., window=K)` with ``vjp_method='multi-step'``: windows of exact BPTT inside
online learning, traces across windows, in one jitted program.

Oracles (float64, relative error per parameter):
- K = T: jax.grad through an unrolled scan of the model (BPTT), 1e-10, for D-RTRL, ES-D-RTRL
  and a mixed hybrid, on a GRU with recurrent weights.
- K = 1, 2, 3 on T = 7 (the last window shorter): the existing multi-step semantics, the sum
  of brainstate.transform.grad of ``algo(MultiStepData(window))`` over consecutive windows,
  1e-10, for the three algorithms on the GRU (approximate regime: a real check of the windows).
- D-RTRL on element-wise recurrences (leaky, two-state coupled, LIF): K = 1 and 3 equal BPTT,
  1e-10; K = 1 equals the single-step run there (both are BPTT). With recurrent weights K = 1
  is not the single-step run: it propagates the last step through the full Jacobian.
- the loss and the states after the run equal the single-step run's.
"""

from __future__ import annotations

import brainstate
import jax
import jax.numpy as jnp
import pytest

import etrace_core

from .test_algorithms_exact import (
    WINDOW_ALGOS,
    GRUNet,
    assert_grads_close,
    bptt_grads,
    build,
    hand_reference,
    make_algo,
    mse,
    randomize_hidden,
    sequence,
    state_values,
    window_grads,
)

T = 7


def _gru(seed=2):
    model = build(GRUNet, 2)
    randomize_hidden(model, seed)
    xs, ys = sequence(2, T, seed=seed)
    return model, xs, ys, state_values(model)


def _reset(model, init):
    for p, st in model.states(brainstate.HiddenState).items():
        st.value = init[p]


def _window_algo(name, model, x0):
    algo = WINDOW_ALGOS[name](model, vjp_method="multi-step")
    algo.compile_graph(x0)
    algo.init_etrace_state()
    return algo


@pytest.mark.parametrize("name", ["d_rtrl", "es_d_rtrl", "hybrid"])
def test_window_of_the_whole_sequence_is_bptt(x64, name):
    model, xs, ys, init = _gru()
    loss_ref, ref = bptt_grads(model, xs, ys)
    # None and K > T: one window of all T steps (checked once, for D-RTRL)
    for window in (T, None, 100) if name == "d_rtrl" else (T,):
        _reset(model, init)
        algo = _window_algo(name, model, xs[0])
        if name == "hybrid":
            assert sorted(algo._plan.kinds) == ["io", "param"]
        res = etrace_core.run_online(algo, mse, xs, ys, window=window)
        assert abs(float(res.loss - loss_ref)) <= 1e-12 * abs(float(loss_ref))
        assert_grads_close(res.grads, ref)


@pytest.mark.parametrize(
    "name, K", [("d_rtrl", 3), ("es_d_rtrl", 3), ("hybrid", 2), ("es_d_rtrl", 1)]
)
def test_windows_equal_the_multi_step_semantics(x64, name, K):
    """K on T = 7 (the last window shorter for 2 and 3) against algo(MultiStepData) per window
    under brainstate grad; the states and traces after the run agree too."""
    model, xs, ys, init = _gru()
    _, bptt = bptt_grads(model, xs, ys)
    sizes = [K] * (T // K) + ([T % K] if T % K else [])
    _reset(model, init)
    ref_algo = _window_algo(name, model, xs[0])
    ref = window_grads(ref_algo, xs, ys, sizes)
    ref_states = state_values(model)
    ref_traces = ref_algo.etrace.value
    _reset(model, init)
    algo = _window_algo(name, model, xs[0])
    res = etrace_core.run_online(algo, mse, xs, ys, window=K)
    assert_grads_close(res.grads, ref)
    for p, v in state_values(model).items():
        assert jnp.allclose(v, ref_states[p], rtol=1e-12, atol=1e-14), p
    assert int(algo.etrace.value["count"]) == T
    for a, b in zip(jax.tree.leaves(algo.etrace.value), jax.tree.leaves(ref_traces)):
        assert jnp.allclose(a, b, rtol=1e-12, atol=1e-14)
    # the GRU has recurrent weights: windows shorter than T are not BPTT (a real check)
    errs = [
        float(jnp.max(jnp.abs(res.grads[p] - bptt[p])) / jnp.max(jnp.abs(bptt[p]))) for p in bptt
    ]
    assert max(errs) > 1e-6


@pytest.mark.parametrize("name", ["leaky", "two_state", "lif"])
def test_d_rtrl_windows_are_bptt_on_element_wise_models(x64, name):
    model, xs, ys, loss, ref = hand_reference(name, 3, T=T, seed=5)
    init = state_values(model)
    single = etrace_core.run_online(make_algo("d_rtrl", model, xs[0]), mse, xs, ys)
    after = state_values(model)
    assert_grads_close(single.grads, ref)
    for K in (1, 3):  # K = T: test_window_of_the_whole_sequence_is_bptt
        _reset(model, init)
        algo = etrace_core.D_RTRL(model, vjp_method="multi-step")
        algo.compile_graph(xs[0])
        algo.init_etrace_state()
        res = etrace_core.run_online(algo, mse, xs, ys, window=K, return_outputs=True)
        assert abs(float(res.loss - loss)) <= 1e-12 * abs(float(loss))
        assert res.outputs.shape == ys.shape
        assert_grads_close(res.grads, ref)
        assert_grads_close(res.grads, single.grads)  # K = 1 included: the single-step run
        for p, v in state_values(model).items():
            assert jnp.allclose(v, after[p], rtol=1e-12, atol=1e-14), p


def test_window_needs_a_multi_step_algorithm_and_a_positive_length(x64):
    model, xs, ys, _ = _gru()
    algo = make_algo("d_rtrl", model, xs[0])
    with pytest.raises(ValueError, match="vjp_method='multi-step'"):
        etrace_core.run_online(algo, mse, xs, ys, window=2)
    algo = _window_algo("d_rtrl", model, xs[0])
    with pytest.raises(ValueError, match="at least 1"):
        etrace_core.run_online(algo, mse, xs, ys, window=0)
    with pytest.raises(TypeError, match="positive integer"):
        etrace_core.run_online(algo, mse, xs, ys, window=2.5)
