"""The algorithms' API: batching, float32, state handling, bad input, and the digits example."""

from __future__ import annotations

import importlib.util
import pathlib

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import etrace_core
from etrace_core import NotCompiledError

from .test_algorithms_exact import (
    ALGOS,
    GRUNet,
    assert_grads_close,
    hand_reference,
    make_algo,
    mse,
    param_values,
    per_step_grads,
    sequence,
)

ROOT = pathlib.Path(__file__).resolve().parents[2]
B = 3


def gru_setup(batch=B, **kw):
    model = GRUNet()
    brainstate.nn.init_all_states(model, batch_size=batch)
    xs, ys = sequence(batch, 4, seed=1)
    algo = etrace_core.D_RTRL(model, **kw)
    return model, algo, xs, ys


def fresh_grads(params, batch, xs, ys, algo_name="d_rtrl"):
    """run_online gradient of a newly built GRUNet with the given parameters and zero states."""
    model = GRUNet()
    brainstate.nn.init_all_states(model, batch_size=batch)
    for p, st in model.states(brainstate.ParamState).items():
        st.value = params[p]
    return etrace_core.run_online(make_algo(algo_name, model, xs[0]), mse, xs, ys).grads


# ============================================================================ batching, dtypes


@pytest.mark.parametrize("algo_name", list(ALGOS))
def test_batch_gradient_is_sum_of_per_sample_gradients(x64, algo_name):
    """Traces are per sample, so the batched online gradient is the sum of B unbatched runs
    (for every algorithm, exact or not). Stands in for a jax.vmap of an unbatched algorithm,
    which brainstate's state model makes impractical."""
    T = 5
    xs, ys = sequence(B, T, seed=13)
    model = GRUNet()
    brainstate.nn.init_all_states(model, batch_size=B)
    params = param_values(model)
    batched = etrace_core.run_online(make_algo(algo_name, model, xs[0]), mse, xs, ys).grads
    single = GRUNet()
    brainstate.nn.init_all_states(single)
    for p, st in single.states(brainstate.ParamState).items():
        st.value = params[p]
    algo = make_algo(algo_name, single, xs[0, 0])
    total = None
    for b in range(B):
        brainstate.nn.reset_all_states(single)
        algo.init_etrace_state()
        g = etrace_core.run_online(algo, mse, xs[:, b], ys[:, b]).grads
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    assert_grads_close(batched, total, 1e-12)


def test_float32_d_rtrl_close_to_bptt():
    assert jnp.result_type(float) == jnp.float32
    model, xs, ys, _, ref = hand_reference("two_state", B, T=6)
    assert all(v.dtype == jnp.float32 for v in param_values(model).values())
    algo = make_algo("d_rtrl", model, xs[0])
    res = etrace_core.run_online(algo, mse, xs, ys)
    assert all(g.dtype == jnp.float32 for g in res.grads.values())
    assert_grads_close(res.grads, ref, 1e-5)


# ============================================================================ not ready


def test_calls_before_compile_graph_and_compile_graph_creates_traces():
    model, algo, xs, ys = gru_setup()
    for call in (
        lambda: algo(xs[0]),
        algo.init_etrace_state,
        algo.trace_sizes,
        lambda: etrace_core.run_online(algo, mse, xs, ys),
        lambda: algo.get_etrace_of(("rnn", "W_hh", "weight")),
    ):
        with pytest.raises(NotCompiledError, match="compile_graph"):
            call()
    assert not algo.is_compiled
    algo.compile_graph(xs[0])  # braintrace semantics: also creates (zero) traces
    assert algo.is_compiled
    assert all(
        float(jnp.max(jnp.abs(t))) == 0.0
        for t in jax.tree.leaves(algo.get_etrace_of(("rnn", "W_hh", "weight")))
    )
    assert algo(xs[0]).shape == (B, 3)
    assert int(algo.running_index.value) == 1
    algo.init_etrace_state()  # still zeroes them
    assert int(algo.running_index.value) == 0
    assert all(
        float(jnp.max(jnp.abs(t))) == 0.0
        for t in jax.tree.leaves(algo.get_etrace_of(("rnn", "W_hh", "weight")))
    )


def test_get_etrace_of_and_show_graph():
    model, algo, xs, ys = gru_setup()
    algo.compile_graph(xs[0])
    algo.init_etrace_state()
    (tr,) = algo.get_etrace_of(("rnn", "W_hh", "weight")).values()
    assert tr["eps"].shape == (B, 5 + 1, 15, 1)
    with pytest.raises(KeyError, match="no eligibility trace"):
        algo.get_etrace_of(("out", "weight"))  # a readout: not online-traced
    msg = algo.show_graph(verbose=False, return_msg=True)
    assert "param-dim trace" in msg and "('out', 'weight')" in msg


# ============================================================================ batch size, states


def test_batch_size_change_is_a_clear_value_error():
    model, algo, xs, ys = gru_setup()
    algo.compile_graph(xs[0])
    algo.init_etrace_state()
    brainstate.nn.reset_all_states(model, batch_size=5)
    x5, y5 = sequence(5, 4, seed=2)
    with pytest.raises(ValueError, match="different batch size.*auto_reinit"):
        algo(x5[0])
    with pytest.raises(ValueError, match="different batch size"):
        etrace_core.run_online(algo, mse, x5, y5)
    # init_all_states makes new State objects (of the new shape): same clear error
    brainstate.nn.init_all_states(model, batch_size=2)
    with pytest.raises(ValueError, match="different batch size"):
        algo(x5[0, :2])


def test_auto_reinit_recompiles_for_a_new_batch_size():
    model, algo, xs, ys = gru_setup(auto_reinit=True)
    algo.compile_graph(xs[0])
    algo.init_etrace_state()
    etrace_core.run_online(algo, mse, xs, ys)
    params = param_values(model)
    for batch in (5, 2):
        brainstate.nn.reset_all_states(model, batch_size=batch)
        xb, yb = sequence(batch, 4, seed=batch)
        res = etrace_core.run_online(algo, mse, xb, yb)
        assert algo.trace_sizes()["rel1_group0"] == batch * (5 + 1) * 15
        assert int(algo.etrace.value["count"]) == 4  # re-initialised traces
        assert_grads_close(res.grads, fresh_grads(params, batch, xb, yb), 1e-6)
    # also when the first call at the new size is the per-step grad path (inside a transform)
    brainstate.nn.reset_all_states(model, batch_size=4)
    xb, yb = sequence(4, 4, seed=4)
    grads = per_step_grads(algo, xb, yb)
    assert algo.trace_sizes()["rel1_group0"] == 4 * (5 + 1) * 15
    assert_grads_close(grads, fresh_grads(params, 4, xb, yb), 1e-6)


def test_replaced_states_are_followed():
    """`init_all_states` after compile_graph gives the model new State objects; the algorithm
    must step those (it used to keep stepping the stale ones, silently)."""
    model, algo, xs, ys = gru_setup()
    algo.compile_graph(xs[0])
    algo.init_etrace_state()
    etrace_core.run_online(algo, mse, xs, ys)
    brainstate.nn.init_all_states(model, batch_size=B)  # new, zero hidden states
    algo.init_etrace_state()
    res = etrace_core.run_online(algo, mse, xs, ys, return_outputs=True)
    assert res.outputs.shape == (xs.shape[0], B, 3)
    assert float(jnp.max(jnp.abs(model.rnn.h.value))) > 0  # the model's state advanced
    assert_grads_close(res.grads, fresh_grads(param_values(model), B, xs, ys), 1e-6)


def test_state_replaced_by_hand_or_removed_between_steps_is_seen():
    """The states found by the last walk of the model are re-used while each is still the object
    at its path; a State assigned by hand, a swapped submodule or a removed state is seen at the
    next call (no stale State is stepped)."""
    model, algo, xs, ys = gru_setup()
    algo.compile_graph(xs[0])
    algo.init_etrace_state()
    etrace_core.run_online(algo, mse, xs, ys)  # walks the model and keeps its states
    old = model.rnn.h
    model.rnn.h = brainstate.HiddenState(jnp.zeros_like(old.value))  # a new object, same path
    algo.init_etrace_state()
    res = etrace_core.run_online(algo, mse, xs, ys)
    assert float(jnp.max(jnp.abs(model.rnn.h.value))) > 0  # the new State advanced
    assert_grads_close(res.grads, fresh_grads(param_values(model), B, xs, ys), 1e-6)
    before = np.asarray(old.value)
    algo(xs[0])
    np.testing.assert_array_equal(np.asarray(old.value), before)  # the old one is left alone
    # a whole submodule swapped: its new states are stepped
    readout = GRUNet().out
    model.out = readout
    algo(xs[0])
    assert algo._check_ready()[("out", "weight")] is readout.weight
    # a state removed: the clear error, not a stale read
    del model.rnn.h
    with pytest.raises(ValueError, match="no longer has the states"):
        etrace_core.run_online(algo, mse, xs, ys)


# ============================================================================ bad values


def test_check_finite_names_the_weight():
    model, algo, xs, ys = gru_setup(check_finite=True)
    algo.compile_graph(xs[0])
    algo.init_etrace_state()
    bad = xs.at[1, 0, 0].set(jnp.nan)  # a NaN input poisons W_ih's trace first
    with pytest.raises(Exception, match=r"non-finite.*\('rnn', 'W_ih', 'weight'\)"):
        jax.block_until_ready(etrace_core.run_online(algo, mse, bad, ys).grads)
    # a NaN planted in a trace, per-step path
    algo.init_etrace_state()
    value = algo.etrace.value
    key = next(k for k in value["traces"] if k in algo.get_etrace_of(("rnn", "W_hh", "weight")))
    value["traces"][key]["eps"] = value["traces"][key]["eps"].at[0, 0, 0, 0].set(jnp.nan)
    algo.etrace.value = value
    with pytest.raises(Exception, match=r"non-finite.*\('rnn', 'W_hh', 'weight'\)"):
        jax.block_until_ready(algo(xs[0]))
    # also in multi-step windows (check_finite used to be ignored there)
    window = etrace_core.D_RTRL(model, vjp_method="multi-step", check_finite=True)
    window.compile_graph(xs[0])
    window.init_etrace_state()
    with pytest.raises(Exception, match=r"non-finite.*\('rnn', 'W_ih', 'weight'\)"):
        jax.block_until_ready(window(etrace_core.MultiStepData(bad)))
    # without check_finite the NaN just propagates
    _, quiet, _, _ = gru_setup()
    quiet.compile_graph(xs[0])
    quiet.init_etrace_state()
    g = etrace_core.run_online(quiet, mse, bad, ys).grads
    assert not bool(jnp.all(jnp.isfinite(g[("rnn", "W_ih", "weight")])))


def test_unknown_vjp_method():
    with pytest.raises(ValueError, match="unknown vjp_method 'bptt'"):
        etrace_core.D_RTRL(GRUNet(), vjp_method="bptt")


@pytest.mark.parametrize("cls", [etrace_core.ES_D_RTRL, etrace_core.HybridDimVjpAlgorithm])
def test_decay_or_rank(cls):
    for bad, err, msg in [
        (1.0, ValueError, r"\[0, 1\)"),
        (-0.1, ValueError, r"\[0, 1\)"),
        (1.5, ValueError, r"\[0, 1\)"),
        (0, ValueError, "rank must be >= 1"),
        (-2, ValueError, "rank must be >= 1"),
        (True, TypeError, "bool"),
        (float("nan"), ValueError, r"\[0, 1\)"),
    ]:
        with pytest.raises(err, match=msg):
            cls(GRUNet(), decay_or_rank=bad)
    for good, alpha in [
        (0.0, 0.0),
        (0.95, 0.95),
        (1, 0.0),
        (3, 0.5),
        (9, 0.8),
        (np.float32(0.5), 0.5),
        (np.int64(3), 0.5),
    ]:
        assert cls(GRUNet(), decay_or_rank=good).decay == pytest.approx(alpha)


def test_hybrid_mode_validation():
    model, _, xs, _ = gru_setup()
    algo = etrace_core.HybridDimVjpAlgorithm(model, mode={("rnn", "W_hx", "weight"): "io"})
    with pytest.raises(ValueError, match=r"not online-traced.*W_hx.*traced weights"):
        algo.compile_graph(xs[0])
    algo = etrace_core.HybridDimVjpAlgorithm(model, mode={("out", "weight"): "param"})
    with pytest.raises(ValueError, match="not online-traced"):  # a readout
        algo.compile_graph(xs[0])
    with pytest.raises(ValueError, match="'param' or 'io'"):
        etrace_core.HybridDimVjpAlgorithm(model, mode={("rnn", "W_hh", "weight"): "full"})
    algo = etrace_core.HybridDimVjpAlgorithm(model, mode={("rnn", "W_hh", "weight"): "io"})
    algo.compile_graph(xs[0])
    kinds = dict(
        zip([r.weight_path for r in algo.graph.hidden_param_op_relations], algo._plan.kinds)
    )
    assert kinds == {("rnn", "W_ih", "weight"): "param", ("rnn", "W_hh", "weight"): "io"}


# ============================================================================ the digits example


def _load_example():
    spec = importlib.util.spec_from_file_location(
        "digits_online", ROOT / "examples" / "digits_online.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_digits_example_learns_above_chance():
    pytest.importorskip("sklearn")
    ex = _load_example()
    hist = ex.train("d_rtrl", epochs=1, max_train=480, verbose=False)
    assert len(hist["test_acc"]) == 2
    assert hist["test_acc"][0] < 0.2  # chance is 0.1
    assert hist["test_acc"][-1] > 0.25, hist
    assert np.isfinite(hist["train_loss"][-1])
