"""Outputs read from values computed from h^{t-1} before the state is stored (e.g. spikes of the
membrane before its reset): D-RTRL stays exact (float64, against jax.grad BPTT)."""

import brainstate
import jax
import jax.numpy as jnp
import pytest

import etrace_core as ec
from etrace_core import ops
from etrace_core.nn.surrogate import spike_fn

T, B, I, H, O = 7, 3, 4, 5, 2


class PreResetReadout(brainstate.nn.Module):
    """v' = 0.8 v + x W; z = spike(v' - 0.5); stored v = v' - 0.5 z; output from (v', z)."""

    def __init__(self):
        super().__init__()
        k = jax.random.split(jax.random.PRNGKey(0), 2)
        self.w = brainstate.ParamState(jax.random.normal(k[0], (I, H)))
        self.wo = brainstate.ParamState(jax.random.normal(k[1], (H, O)) * 0.5)
        self.v = brainstate.HiddenState(jnp.zeros((B, H)))

    def update(self, x):
        v = 0.8 * self.v.value + ops.matmul(x, self.w.value)
        z = spike_fn(v - 0.5)
        self.v.value = v - 0.5 * z
        return ops.matmul(jnp.tanh(v) + z, self.wo.value)


def _loss(o, y):
    return jnp.sum((o - y) ** 2)


def _bptt(params, xs, ys):
    def total(pv):
        v, out = jnp.zeros((B, H)), 0.0
        for t in range(T):
            pre = 0.8 * v + xs[t] @ pv[("w",)]
            z = spike_fn(pre - 0.5)
            v = pre - 0.5 * z
            out = out + _loss((jnp.tanh(pre) + z) @ pv[("wo",)], ys[t])
        return out

    return jax.grad(total)(params)


def _rel(g, ref):
    return max(float(jnp.abs(g[k] - ref[k]).max() / jnp.abs(ref[k]).max()) for k in ref)


@pytest.mark.parametrize("mode", ["driver", "per_step", "chunks"])
def test_d_rtrl_exact_when_output_reads_pre_reset_values(x64, mode):
    xs = jax.random.normal(jax.random.PRNGKey(1), (T, B, I))
    ys = jax.random.normal(jax.random.PRNGKey(2), (T, B, O))
    model = PreResetReadout()
    params = model.states(brainstate.ParamState)
    ref = _bptt({k: v.value for k, v in params.items()}, xs, ys)
    algo = ec.D_RTRL(model)
    algo.compile_graph(xs[0])
    algo.init_etrace_state()
    assert algo.executor.spec.escapes
    if mode == "driver":
        grads = ec.run_online(algo, _loss, xs, ys).grads
    elif mode == "per_step":
        grads = None
        for t in range(T):
            g = brainstate.transform.grad(lambda: _loss(algo(xs[t]), ys[t]), params)()
            grads = g if grads is None else {k: grads[k] + g[k] for k in g}
    else:
        g1 = brainstate.transform.grad(
            lambda: _loss(algo(ec.MultiStepData(xs[:3])), ys[:3]), params
        )()
        g2 = brainstate.transform.grad(
            lambda: _loss(algo(ec.MultiStepData(xs[3:])), ys[3:]), params
        )()
        grads = {k: g1[k] + g2[k] for k in g1}
    assert _rel(grads, ref) <= 1e-10
