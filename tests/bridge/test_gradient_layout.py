"""The streaming step's gradient-layout fast paths on torch's own recurrent cells.

- The unit maps of ``nn.GRUCell`` (3 fused gates) and ``nn.LSTMCell`` (4) are detected as tiles
  at plan time, and the concatenation that replaces their gather equals the gather exactly.
- io-dim gradients of torch ``(O, I)`` weights contracted straight into torch layout
  (``online.direct_relations``) equal the canonical path (``(I + 1, O)`` matrix, transposed and
  split): ``OnlineLearner.run`` with and without the direct path, float64, relative 1e-12; the
  direct path is taken for one step (a streaming step) only, not for a chunk of steps."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

from etrace_bridge.learner import OnlineLearner
from etrace_core.algorithms import online
from etrace_core.algorithms.traces import gather_units

B, I, H, O = 3, 5, 6, 2


class GRUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = nn.GRUCell(I, H)
        self.readout = nn.Linear(H, O)

    def forward(self, x, h):
        h = self.cell(x, h)
        return self.readout(h), h


class LSTMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = nn.LSTMCell(I, H)
        self.readout = nn.Linear(H, O)

    def forward(self, x, h, c):
        h, c = self.cell(x, (h, c))
        return self.readout(h), h, c


def _learner(kind, dtype=torch.float32, algorithm="es_d_rtrl"):
    torch.manual_seed(0)
    model = (GRUNet() if kind == "gru" else LSTMNet()).to(dtype)
    state = [torch.zeros(B, H, dtype=dtype)] * (1 if kind == "gru" else 2)
    x0 = torch.zeros(B, I, dtype=dtype)
    opts = {"decay_or_rank": 0.8} if algorithm != "d_rtrl" else {}
    learner = OnlineLearner(
        model, algorithm=algorithm, loss="mse", example_inputs=(x0, *state), **opts
    )
    return model, learner


@pytest.mark.parametrize("kind, gates", [("gru", 3), ("lstm", 4)])
def test_fused_gate_maps_are_tiles(kind, gates):
    _, learner = _learner(kind)
    plan = learner.algorithm._plan
    tiled = [c for c in plan.connections if c.tile]
    assert tiled and all(c.tile == gates for c in tiled)
    assert all(c.identity or c.tile for c in plan.connections)  # no gather left
    rng = np.random.default_rng(0)
    groups = plan.spec.graph.hidden_groups
    for conn in tiled:
        S = groups[conn.group].num_state
        for shape in [(conn.group_size, S), (conn.group_size, S, S)]:
            per_unit = jnp.asarray(rng.standard_normal(shape), jnp.float32)
            fast = gather_units(conn, per_unit)
            general = gather_units(conn._replace(tile=0), per_unit)
            assert np.array_equal(np.asarray(fast), np.asarray(general))


def _run_grads(kind, T, monkeypatch, direct: bool):
    """(loss, grads, relations contracted in torch layout) of one `run` over T steps."""
    used = []

    def counted(plan, params, k, A, B):
        used.append(k)
        return factor_grads(plan, params, k, A, B)

    factor_grads = online.factor_grads
    with monkeypatch.context() as m:
        m.setattr(online, "factor_grads", counted)
        if not direct:
            m.setattr(online, "direct_relations", lambda plan: frozenset())
        model, learner = _learner(kind, torch.float64)
        assert bool(online.direct_relations(learner.algorithm._plan)) == direct
        g = torch.Generator().manual_seed(1)
        xs = torch.randn(T, B, I, generator=g, dtype=torch.float64)
        ys = torch.randn(T, B, O, generator=g, dtype=torch.float64)
        loss = learner.run(xs, ys)
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters()}, used


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("T", [1, 7])  # a streaming step (torch layout), a chunk (canonical)
def test_torch_layout_gradients_equal_canonical(x64, monkeypatch, kind, T):
    loss, grads, used = _run_grads(kind, T, monkeypatch, direct=True)
    ref_loss, ref, ref_used = _run_grads(kind, T, monkeypatch, direct=False)
    assert sorted(used) == ([0, 1] if T == 1 else []) and not ref_used  # W_ih, W_hh at T = 1
    assert abs(loss - ref_loss) <= 1e-12 * abs(ref_loss)
    for name, r in ref.items():
        assert grads[name].shape == r.shape and grads[name].dtype == torch.float64
        # (T = 1 from h = 0: weight_hh's gradient is exactly zero, on both paths)
        err = float((grads[name] - r).abs().max() / max(float(r.abs().max()), 1e-300))
        assert err <= 1e-12, (name, err)
