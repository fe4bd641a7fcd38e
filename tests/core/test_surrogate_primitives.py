"""Spiking neurons whose spike is braintools' surrogate primitive (``heaviside_surrogate_gradient``,
the spike of every brainpy.state / braintools neuron) are grouped and traced element-wise.

The spike couples a unit's states within one step (an ALIF's soft reset reads its adaptation,
its adaptation counts its spikes): the compiler must see the primitive as element-wise, put V, a
and the synaptic current of one unit in one hidden group, and keep that coupling in the trace.
Oracle: ``jax.grad`` through the unrolled sequence (BPTT), float64, relative error <= 1e-10.
Also ``HiddenGroup.concat_hidden`` on that three-state group.
"""

from __future__ import annotations

import math

import brainstate
import jax.numpy as jnp
import pytest

import etrace_core
from etrace_core import nn

from .test_algorithms_exact import assert_grads_close, bptt_grads, mse, sequence, state_values

surrogate = pytest.importorskip("braintools.surrogate")

I, H, O, T, B = 3, 4, 2, 8, 2


class ALIFNet(brainstate.nn.Module):
    """Input -> exponential current synapse ``g`` -> ALIF (``V``, ``a``, soft reset) -> rate
    readout. No recurrent weight: the recurrence is element-wise, so D-RTRL is exact."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(I, H, key=1)
        self.out = nn.Linear(H, O, key=2)
        self.spk = surrogate.ReluGrad(alpha=0.5, width=1.5)
        self.ds, self.dm, self.da = math.exp(-1 / 3), math.exp(-1 / 4), math.exp(-1 / 20)
        self.th, self.beta = 1.0, 0.2

    def init_state(self, batch_size=None, **kwargs):
        shape = (H,) if batch_size is None else (batch_size, H)
        self.g = brainstate.HiddenState(jnp.zeros(shape))
        self.V = brainstate.HiddenState(jnp.zeros(shape))
        self.a = brainstate.HiddenState(jnp.zeros(shape))

    def spike(self, V, a):
        return self.spk((V - self.th - self.beta * a) / self.th)

    def update(self, x):
        last = self.spike(self.V.value, self.a.value)
        self.g.value = self.ds * self.g.value + self.inp(x)
        V = self.V.value - self.th * last
        self.V.value = self.dm * V + (1 - self.dm) * 4.0 * self.g.value
        self.a.value = self.da * (self.a.value + last)
        return self.out(self.spike(self.V.value, self.a.value))


def build():
    model = ALIFNet()
    brainstate.nn.init_all_states(model, batch_size=B)
    for st, v in ((model.V, 0.9), (model.a, 0.3), (model.g, 0.2)):
        st.value = jnp.full(st.value.shape, v)
    return model


def test_spike_primitive_couples_the_states_of_a_unit(x64):
    model = build()
    xs, _ = sequence(B, T, n_in=I, n_out=O, seed=3)
    groups = etrace_core.find_hidden_groups_from_module(model, xs[0])[0]
    assert [sorted(p[-1] for p in g.hidden_paths) for g in groups] == [["V", "a", "g"]]


def test_d_rtrl_through_the_spike_primitive_equals_bptt(x64):
    model = build()
    xs, ys = sequence(B, T, n_in=I, n_out=O, seed=3, scale=1.5)
    _, ref = bptt_grads(model, xs, ys)
    assert float(jnp.max(jnp.abs(ref[("inp", "weight")]))) > 1e-3  # the neurons are live
    init = state_values(model)
    algo = etrace_core.D_RTRL(model)
    algo.compile_graph(xs[0])
    algo.init_etrace_state()
    assert "approximate" not in algo.show_graph(return_msg=True)
    res = etrace_core.run_online(algo, mse, xs, ys)
    assert_grads_close(res.grads, ref)
    assert state_values(model).keys() == init.keys()


def test_concat_hidden_stacks_a_groups_states(x64):
    model = build()
    xs, _ = sequence(B, T, n_in=I, n_out=O, seed=3)
    (group,) = etrace_core.find_hidden_groups_from_module(model, xs[0])[0]
    states = model.states(brainstate.HiddenState)
    values = [states[p].value for p in group.hidden_paths]
    got = group.concat_hidden(values)
    assert got.shape == group.varshape + (3,)
    for k, v in enumerate(values):
        assert jnp.array_equal(got[..., k], v)
    with pytest.raises(ValueError, match="one value per hidden state"):
        group.concat_hidden(values[:2])
