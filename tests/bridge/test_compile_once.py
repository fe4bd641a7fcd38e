"""Costs that grow as the work grows: one XLA compilation per learner and input shape."""

import torch
from torch import nn

from etrace_bridge import OnlineLearner
from tests.bridge.jax_compiles import compilations


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = nn.GRUCell(3, 6)
        self.readout = nn.Linear(6, 2)

    def forward(self, x, h):
        h = self.cell(x, h)
        return self.readout(h), h


def _learner(algorithm):
    torch.manual_seed(0)
    model = _Net()
    xs, ys = torch.randn(5, 4, 3), torch.randn(5, 4, 2)
    learner = OnlineLearner(
        model, algorithm=algorithm, loss="mse", example_inputs=(xs[0], torch.zeros(4, 6))
    )
    return learner, xs, ys


def test_run_compiles_once_with_or_without_reset():
    learner, xs, ys = _learner("es_d_rtrl")
    learner.run(xs, ys)  # first call compiles
    with compilations() as names:
        learner.run(xs, ys)  # traces carried over from a compiled call
        learner.reset_state()
        learner.run(xs, ys)  # traces zeroed
        learner.run(xs, ys)
    assert [n for n in names if "_drive" in n] == []


def test_a_new_sequence_length_is_a_new_shape_but_only_once():
    learner, xs, ys = _learner("d_rtrl")
    learner.run(xs, ys)
    with compilations() as names:
        learner.run(xs[:3], ys[:3])
        learner.run(xs[:3], ys[:3])
    assert len([n for n in names if "_drive" in n]) == 1


def test_step_compiles_once():
    learner, xs, ys = _learner("es_d_rtrl")
    learner.step(xs[0], ys[0])
    with compilations() as names:
        for t in range(1, 5):
            learner.step(xs[t], ys[t])
    assert [n for n in names if "_drive" in n] == []


def test_construction_compiles_one_program_not_one_per_op():
    """Building a learner compiles the conversion self-check as one program, and nothing else
    (no eager op-by-op JAX work: each eager op and shape is an XLA compile of its own); the first
    run compiles the sequence program. A fresh model size, so no earlier test cached an op."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = nn.GRUCell(5, 7)
            self.readout = nn.Linear(7, 3)

        def forward(self, x, h):
            h = self.cell(x, h)
            return self.readout(h), h

    torch.manual_seed(0)
    xs, ys = torch.randn(4, 2, 5), torch.randn(4, 2, 3)
    with compilations() as names:
        learner = OnlineLearner(
            Net(), algorithm="es_d_rtrl", loss="mse", example_inputs=(xs[0], torch.zeros(2, 7))
        )
        built = list(names)
        learner.run(xs, ys)
    assert len(built) <= 1, built  # 0 when a conversion of this structure ran before
    assert [n for n in names[len(built) :] if "_drive" not in n] == []
