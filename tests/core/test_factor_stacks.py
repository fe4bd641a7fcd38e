"""The sequence driver contracts the io-dim input factors of weights that share an output side
side by side, in one GEMM per output side, from stacks kept transposed (``factor_stacks``).

Oracles, float64, relative tolerance 1e-12:
(1) ``factor_stacks.contract`` equals the per-weight contraction ``sum_t A_c(t)^T B(t)``
    (``numpy.einsum``) for a group whose members have different input widths;
(2) ``run_online`` on a recurrent cell whose current is the sum of three ETP matmuls of
    different input sizes (one with a bias, one with a ``weight_fn`` mask) equals the sum over
    t of ``brainstate.transform.grad`` of the loss of ``algo(x^t)`` (one step at a time, no
    stacks), and equals the same plan with one output trace (and one GEMM) per weight; for
    several chunks, chunks of one step (prime T) and one chunk.
"""

from __future__ import annotations

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import etrace_core
from etrace_core import nn
from etrace_core.algorithms import factor_stacks
from etrace_core.algorithms.base import _Compiled
from etrace_core.algorithms.sequence import chunk_length

from .test_algorithms_exact import assert_grads_close, mse, per_step_grads

B, N_X, N_Z, N_HID, N_OUT = 3, 4, 2, 5, 2
W_X, B_X = ("cell", "wx", "weight"), ("cell", "wx", "bias")
W_Z, W_H = ("cell", "wz", "weight"), ("cell", "wh", "weight")


def test_contract_equals_per_weight_contraction(x64):
    K, N, O = 5, 3, 4
    widths = (2, 7, 3)
    group = factor_stacks.FactorGroup(0, (0, 1, 2), widths, N, jnp.float64)
    rng = np.random.default_rng(0)
    A = {c: rng.standard_normal((K, N, w)) for c, w in enumerate(widths)}
    Bs = rng.standard_normal((K, N, O))
    (stack,) = factor_stacks.init_stacks((group,), K)
    assert stack.shape == (sum(widths), K, N)
    for t in range(K):
        (stack,) = factor_stacks.write_step(
            (group,), [stack], {c: jnp.asarray(a[t]) for c, a in A.items()}, jnp.int32(t)
        )
    got = factor_stacks.contract((group,), [stack], {0: jnp.asarray(Bs)})
    assert sorted(got) == [0, 1, 2]
    for c, a in A.items():
        ref = np.einsum("kni,kno->io", a, Bs)
        np.testing.assert_allclose(np.asarray(got[c]), ref, rtol=1e-12, atol=1e-12)


class SumCell(brainstate.nn.Module):
    """h' = 0.7 h + tanh(x @ Wx + bx + z @ (Wz * mask) + h @ Wh): three ETP matmuls of input
    sizes 4 (+ bias), 2 and 5 summed before one hidden state."""

    def __init__(self):
        super().__init__()
        self.wx = nn.Linear(N_X, N_HID, w_init=nn.init.normal(0.8), key=0)
        mask = np.array([[1.0, 0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0, 1.0]])
        self.wz = nn.Linear(N_Z, N_HID, w_init=nn.init.normal(0.8), w_mask=mask, bias=False, key=1)
        self.wh = nn.Linear(N_HID, N_HID, w_init=nn.init.normal(0.6), bias=False, key=2)
        self.h = None

    def init_state(self, batch_size=None, **kwargs):
        self.h = brainstate.HiddenState(jnp.zeros((batch_size, N_HID), jnp.result_type(float)))

    def update(self, xz):
        x, z = xz[..., :N_X], xz[..., N_X:]
        h = self.h.value
        self.h.value = 0.7 * h + jnp.tanh(self.wx(x) + self.wz(z) + self.wh(h))
        return self.h.value


class SumNet(brainstate.nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = SumCell()
        self.out = nn.LeakyRateReadout(N_HID, N_OUT, key=3)

    def update(self, x):
        return self.out(self.cell(x))


def _build(T, share):
    model = SumNet()
    brainstate.nn.init_all_states(model, batch_size=B)
    dtype = jnp.result_type(float)
    xs = jax.random.normal(jax.random.PRNGKey(0), (T, B, N_X + N_Z), dtype)
    ys = jax.random.normal(jax.random.PRNGKey(1), (T, B, N_OUT), dtype)
    algo = etrace_core.ES_D_RTRL(model, decay_or_rank=0.8)
    algo.compile_graph(xs[0])
    if not share:  # the same plan with one output trace per weight: one GEMM each
        plan = algo._plan._replace(f_owner=())
        algo._compiled = _Compiled(plan=plan, example=algo._compiled.example)
    algo.init_etrace_state()
    return algo, xs, ys


@pytest.mark.parametrize("T", [40, 37, 8])  # chunks of 20 (x2), of 1 (prime), one of 8
def test_shared_group_contraction_equals_per_step_and_unshared(x64, T):
    algo, xs, ys = _build(T, share=True)
    assert chunk_length(T, algo._plan, algo.etrace.value) == {40: 20, 37: 1, 8: 8}[T]
    groups = factor_stacks.factor_groups(algo._plan, algo.etrace.value["traces"])
    rels = algo.graph.hidden_param_op_relations
    members = {
        tuple(sorted(rels[algo._plan.connections[c].rel].weight_path for c in g.members)): g
        for g in groups
    }
    shared = members[tuple(sorted((W_X, W_Z, W_H)))]  # one stack for the three weights
    by_path = dict(
        zip(
            (rels[algo._plan.connections[c].rel].weight_path for c in shared.members), shared.widths
        )
    )
    assert by_path == {W_X: N_X + 1, W_Z: N_Z, W_H: N_HID}  # the bias adds an input column

    got = etrace_core.run_online(algo, mse, xs, ys)
    for p in (W_X, B_X, W_Z, W_H):
        assert float(jnp.max(jnp.abs(got.grads[p]))) > 0, p
    mask = algo.model.cell.wz.w_mask
    assert float(jnp.max(jnp.abs(jnp.where(mask == 0, got.grads[W_Z], 0.0)))) == 0.0

    step, _, _ = _build(T, share=True)
    assert_grads_close(got.grads, per_step_grads(step, xs, ys), 1e-12)
    alone, _, _ = _build(T, share=False)
    assert all(
        len(g.members) == 1
        for g in factor_stacks.factor_groups(alone._plan, alone.etrace.value["traces"])
    )
    assert_grads_close(got.grads, etrace_core.run_online(alone, mse, xs, ys).grads, 1e-12)
