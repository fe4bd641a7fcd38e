"""Weights whose outputs are summed before the same hidden state share one io-dim output trace.

In ``nn.LIF(recurrent=True)`` the current is ``x @ W_in + s @ W_rec``: both outputs reach
(V, a) only through that ``add``, so their output-side Jacobians df are the same and so are
their ES-D-RTRL output traces and gradient factors; the compiler finds such sets
(``compiler.shared_outputs``, kept in ``StepSpec.shared_outputs``) and the io-dim algorithms
keep one output trace per set.

Oracles: (1) for every shared set the compiler reports in the test-model catalogue, the
hand-written step's df = dh/dy (``jax.jacobian``) of the members are equal, float64, exactly;
(2) gradients with the shared trace equal those of the same algorithm with one trace per
weight (the plan's sharing switched off), float64, relative 1e-12, through ``run_online``
(chunked factors) and through ``brainstate.transform.grad`` of ``algo(x)`` per step.
"""

from __future__ import annotations

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import etrace_core
from etrace_core import nn
from etrace_core.algorithms.base import _Compiled
from etrace_core.compiler.shared_outputs import shared_output_sets

from . import models as M
from .test_algorithms_exact import assert_grads_close, mse, per_step_grads

W_IN, W_REC, W_OUT = ("lif", "W_in", "weight"), ("lif", "W_rec", "weight"), ("out", "W", "weight")
B, N_IN, N_HID, N_OUT, T = 3, 4, 6, 2, 24


@pytest.mark.parametrize("case", M.CASES, ids=[c.name for c in M.CASES])
def test_shared_sets_have_equal_df(x64, case):
    model = case.make(2)
    M.set_random_hidden(model, key=0, overrides=case.hidden_ranges)
    x = case.x(2, 1.0)
    ex = etrace_core.ETraceVjpGraphExecutor(model)
    ex.compile_graph(x)
    graph = ex.graph
    rels = graph.hidden_param_op_relations
    shared_sets = shared_output_sets(graph.module_info.jaxpr, rels)
    if case.name == "lif":  # W_in and W_rec meet in one add; the readout stands alone
        assert [{rels[k].weight_path for k in s} for s in shared_sets] == [{W_IN, W_REC}]
    if case.name == "lif_ff":
        assert shared_sets == ()
    if not shared_sets:
        return
    params = M.param_values(model)
    h_prev = {p: st.value for p, st in model.states(brainstate.HiddenState).items()}
    out_shape = jax.eval_shape(lambda: M.oracle_forward(case, params, h_prev, x)[0]).shape
    keys = M.relation_keys(graph)
    orc = M.oracles(case, params, h_prev, x, M.rand(7, *out_shape), keys=keys)
    for members in shared_sets:
        first = keys[members[0]]
        live = [float(jnp.max(jnp.abs(orc.dh_dy[dst][first]))) > 0 for dst in orc.dh_dy]
        assert any(live), f"{first} reaches no hidden state in the oracle"
        for k in members[1:]:
            for dst in orc.dh_dy:
                a, b = orc.dh_dy[dst][first], orc.dh_dy[dst][keys[k]]
                np.testing.assert_array_equal(a, b, err_msg=f"df of {keys[k]} into {dst}")


class RecurrentLIFNet(brainstate.nn.Module):
    """The benchmark's LIF model (benchmarks/algorithms.py), small: ``nn.LIF(recurrent=True)``
    + ``LeakyRateReadout``."""

    def __init__(self):
        super().__init__()
        self.lif = nn.LIF(
            N_IN,
            N_HID,
            recurrent=True,
            beta=0.3,
            key=0,
            w_init=nn.init.normal(1.5),
            w_rec_init=nn.init.normal(0.8),
        )
        self.out = nn.LeakyRateReadout(N_HID, N_OUT, key=1)

    def update(self, x):
        return self.out(self.lif(x))


def _build(make, share):
    model = RecurrentLIFNet()
    brainstate.nn.init_all_states(model, batch_size=B)
    xs = 3.0 * jax.random.normal(jax.random.PRNGKey(0), (T, B, N_IN), jnp.result_type(float))
    ys = jax.random.normal(jax.random.PRNGKey(1), (T, B, N_OUT), jnp.result_type(float))
    algo = make(model)
    algo.compile_graph(xs[0])
    if not share:  # the same plan with one output trace per weight
        plan = algo._plan._replace(f_owner=())
        algo._compiled = _Compiled(plan=plan, example=algo._compiled.example)
    algo.init_etrace_state()
    return algo, xs, ys


MAKERS = {
    "es_d_rtrl": lambda m: etrace_core.ES_D_RTRL(m, decay_or_rank=0.8),
    "hybrid": lambda m: etrace_core.HybridDimVjpAlgorithm(
        m, decay_or_rank=0.8, mode={W_IN: "io", W_REC: "io"}
    ),
}


@pytest.mark.parametrize("name", list(MAKERS))
def test_shared_output_trace_gradients_equal_unshared(x64, name):
    shared, xs, ys = _build(MAKERS[name], share=True)
    alone, _, _ = _build(MAKERS[name], share=False)
    rels = shared.graph.hidden_param_op_relations
    k_in, k_rec = [[r.weight_path for r in rels].index(p) for p in (W_IN, W_REC)]

    # one output trace: held under W_in's key, given to both weights by get_etrace_of
    sizes, sizes_alone = shared.trace_sizes(), alone.trace_sizes()
    (key_in,), (key_rec,) = shared.get_etrace_of(W_IN), shared.get_etrace_of(W_REC)
    assert sizes[key_rec] == B * N_HID  # its input trace only
    assert sizes_alone[key_rec] == B * N_HID + B * N_HID * 2  # + its own f (V, a)
    assert sum(sizes.values()) == sum(sizes_alone.values()) - B * N_HID * 2
    assert f"shared with {W_IN}" in shared.show_graph(verbose=False, return_msg=True)
    assert shared._plan.f_owner[k_rec] == k_in  # one connection per relation here

    got = etrace_core.run_online(shared, mse, xs, ys)
    ref = etrace_core.run_online(alone, mse, xs, ys)
    assert float(jnp.max(jnp.abs(ref.grads[W_REC]))) > 0  # spikes: the recurrent path is live
    assert_grads_close(got.grads, ref.grads, tol=1e-12)
    tr_in, tr_rec = shared.get_etrace_of(W_IN)[key_in], shared.get_etrace_of(W_REC)[key_rec]
    assert tr_rec["f"] is tr_in["f"]
    ref_rec = alone.get_etrace_of(W_REC)[key_rec]
    np.testing.assert_allclose(tr_rec["f"], ref_rec["f"], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(tr_rec["x"], ref_rec["x"], rtol=1e-12, atol=1e-15)

    # step by step (brainstate.transform.grad of the loss of algo(x)), fresh states and traces
    shared, xs, ys = _build(MAKERS[name], share=True)
    alone, _, _ = _build(MAKERS[name], share=False)
    got = per_step_grads(shared, xs[:8], ys[:8])
    ref = per_step_grads(alone, xs[:8], ys[:8])
    assert_grads_close(got, ref, tol=1e-12)


def test_param_dim_weights_keep_their_own_trace(x64):
    """Sharing is only between io-dim traces: a hybrid with W_in param-dim shares nothing."""
    make = lambda m: etrace_core.HybridDimVjpAlgorithm(m, mode={W_IN: "param", W_REC: "io"})
    algo, _, _ = _build(make, share=True)
    assert algo._plan.spec.shared_outputs  # the compiler still reports the set
    assert all(o == c for c, o in enumerate(algo._plan.f_owner))
    assert "shared with" not in algo.show_graph(verbose=False, return_msg=True)
