"""The sequence driver contracts io-dim gradient factors per chunk of steps (one GEMM per chunk)
and sums D-RTRL gradients over groups of batch slabs: both must give the per-step gradients
exactly, for sequences split into several chunks, into chunks of one step (prime T) and into
one chunk.

Oracle: the sum over t of brainstate.transform.grad of the loss of `algo(x^t)` (one jitted step
at a time, no chunking), float64, relative tolerance 1e-12; D-RTRL also against hand-written
BPTT (exact for these element-wise models)."""

from __future__ import annotations

import brainstate
import pytest

import etrace_core
from etrace_core.algorithms.sequence import CHUNK_MAX, chunk_length

from .test_algorithms_exact import (
    assert_grads_close,
    hand_reference,
    make_algo,
    mse,
    per_step_grads,
    state_values,
)


@pytest.mark.parametrize("T", [40, 37, 12])  # chunks of 20 (x2), of 1 (prime), one of 12
@pytest.mark.parametrize("algo_name", ["es_d_rtrl", "d_rtrl"])
def test_run_online_equals_per_step_gradients(x64, algo_name, T):
    model, xs, ys, loss, ref = hand_reference("lif", 3, T=T, seed=2)
    init = state_values(model)
    algo = make_algo(algo_name, model, xs[0])
    K = chunk_length(T, algo._plan, algo.etrace.value)
    assert T % K == 0 and K == {40: 20, 37: 1, 12: 12}[T]
    res = etrace_core.run_online(algo, mse, xs, ys)
    assert abs(float(res.loss - loss)) <= 1e-12 * abs(float(loss))
    for p, st in model.states(brainstate.HiddenState).items():
        st.value = init[p]
    algo.init_etrace_state()
    assert_grads_close(res.grads, per_step_grads(algo, xs, ys), 1e-12)
    if algo_name == "d_rtrl":
        assert_grads_close(res.grads, ref, 1e-12)


def test_chunk_length_divides_T_and_bounds_memory():
    model, xs, _, _, _ = hand_reference("lif", 3, T=2)
    algo = make_algo("es_d_rtrl", model, xs[0])
    plan, etrace = algo._plan, algo.etrace.value
    for T in (0, 1, 2, 31, 32, 64, 97, 100, 1000):
        K = chunk_length(T, plan, etrace)
        assert 1 <= K <= max(T, 1) and K <= CHUNK_MAX and (T == 0 or T % K == 0)
    assert chunk_length(100, plan, etrace) == 25
    assert chunk_length(97, plan, etrace) == 1
