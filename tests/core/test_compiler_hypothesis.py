"""Random stacks of layers without recurrent weights: groups, relations, and D against the full
step Jacobian (exact for these: no weight sits on any h^{t-1} -> h^t path within a group)."""

import brainstate
import jax
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import etrace_core as ec
from etrace_core import nn

from ..conftest import x64_enabled
from . import models as M

STATE_NAMES = {"leaky": ("h",), "lif": ("V", "a"), "readout": ("r",)}


class Stack(brainstate.nn.Module):
    """``layers``: (kind, linear_before, size); cell i is attribute ``c{i}``, its Linear ``l{i}``."""

    def __init__(self, n_in, layers, seed):
        super().__init__()
        self.kinds = []
        n = n_in
        for i, (kind, linear, size) in enumerate(layers):
            s = seed * 10 + i
            if linear:
                setattr(
                    self, f"l{i}", nn.Linear(n, n + 1, w_init=M.uinit(s), b_init=M.uinit(s + 5))
                )
                n = n + 1
            if kind == "leaky":
                cell = nn.LeakyRNNCell(
                    n, size, tau=3.0, recurrent=False, w_init=M.uinit(s + 1), b_init=M.uinit(s + 2)
                )
            elif kind == "lif":
                cell = nn.LIF(
                    n, size, beta=0.3, tau_mem=8.0, tau_adapt=30.0, w_init=M.uinit(s + 3, -1.0, 1.5)
                )
            else:
                cell = nn.LeakyRateReadout(n, size, tau=4.0, w_init=M.uinit(s + 4))
            setattr(self, f"c{i}", cell)
            self.kinds.append((kind, linear))
            n = size

    def update(self, x):
        for i, (kind, linear) in enumerate(self.kinds):
            if linear:
                x = getattr(self, f"l{i}")(x)
            x = getattr(self, f"c{i}")(x)
        return x


layer = st.tuples(st.sampled_from(["leaky", "lif", "readout"]), st.booleans(), st.integers(1, 4))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n_in=st.integers(1, 4),
    layers=st.lists(layer, min_size=1, max_size=3),
    batch=st.sampled_from([None, 1, 3]),
    seed=st.integers(0, 50),
)
def test_random_stack_groups_relations_and_D(n_in, layers, batch, seed):
    with x64_enabled():
        model = Stack(n_in, layers, seed)
        brainstate.nn.init_all_states(model, batch)
        M.set_random_hidden(model, key=seed, overrides={"V": (0.6, 1.4), "a": (0.0, 0.5)})
        x = M.rand(seed, *((batch,) if batch else ()), n_in)
        ex = ec.ETraceVjpGraphExecutor(model)
        ex.compile_graph(x)
        graph = ex.graph

        # one group per cell, with the cell's states
        expected = {
            frozenset((f"c{i}", s) for s in STATE_NAMES[kind])
            for i, (kind, _, _) in enumerate(layers)
        }
        assert len(graph.hidden_groups) == len(layers)
        assert {frozenset(g.hidden_paths) for g in graph.hidden_groups} == expected
        for g in graph.hidden_groups:
            assert g.varshape == ((batch,) if batch else ()) + (
                layers[int(g.hidden_paths[0][0][1:])][2],
            )

        # each cell's input weight reaches its own group only; the Linears in between none
        in_weight = {
            "leaky": ("W_in", "weight"),
            "lif": ("W_in", "weight"),
            "readout": ("W", "weight"),
        }
        got = sorted(
            (r.weight_path, tuple(tuple(sorted(g.hidden_paths)) for g in r.hidden_groups))
            for r in graph.hidden_param_op_relations
        )
        want = sorted(
            (
                (f"c{i}",) + in_weight[kind],
                (tuple(sorted((f"c{i}", s) for s in STATE_NAMES[kind])),),
            )
            for i, (kind, _, _) in enumerate(layers)
        )
        assert got == want
        traced = {
            p for r in graph.hidden_param_op_relations for p in (r.weight_path, r.bias_path) if p
        }
        params = set(model.states(brainstate.ParamState).keys())
        assert {p for p in params - traced} == {p for p in params if p[0].startswith("l")}

        # D against the group blocks of the full step Jacobian
        _, _, _, _, Ds = jax.jit(ex.solve_h2w_h2h_jacobian)(x)
        step, values = M.pure_step(model)
        hidden = [p for g in graph.hidden_groups for p in g.hidden_paths]

        @jax.jit
        def full(h):
            new = step({**values, **h}, x)[1]
            return {p: new[p] for p in hidden}

        J = jax.jacobian(full)({p: values[p] for p in hidden})
        for g, D in zip(graph.hidden_groups, Ds):
            assert D.shape == g.varshape + (g.num_state, g.num_state)
            for s, dst in enumerate(g.hidden_paths):
                for s2, src in enumerate(g.hidden_paths):
                    block = np.asarray(J[dst][src]).reshape(g.size, g.size)
                    np.testing.assert_allclose(
                        np.asarray(D[..., s, s2]).reshape(-1),
                        np.diag(block),
                        rtol=1e-10,
                        atol=1e-10,
                    )
                    assert np.abs(block - np.diag(np.diag(block))).max(initial=0) == 0
