"""OnlineLearner: online gradients of torch models against torch autograd BPTT, and the training API."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from etrace_bridge.bptt import bptt_gradients, compare_gradients
from etrace_bridge.compare.models import (
    GRUClassifier,
    LeakyRNN,
    LSTMClassifier,
    initial_state,
    spike_jax,
    spike_op,
)
from etrace_bridge.learner import OnlineLearner

T, B, I, H, O = 7, 3, 5, 6, 2


class LIFLayer(nn.Module):
    """LIF neurons with buffer state, a custom-op surrogate spike and a memoryless readout."""

    def __init__(self, n_in, n_hidden, n_out, batch):
        super().__init__()
        self.input = nn.Linear(n_in, n_hidden)
        self.readout = nn.Linear(n_hidden, n_out)
        self.decay = math.exp(-1 / 5)
        self.register_buffer("v", torch.zeros(batch, n_hidden), persistent=False)
        self.register_buffer("a", torch.zeros(batch, n_hidden), persistent=False)

    def forward(self, x):
        v = self.decay * self.v + self.input(x) - 0.5 * self.a
        z = spike_op(v - 0.3)
        self.a = 0.8 * self.a + z
        self.v = v
        return self.readout(torch.tanh(v) + z)


def _data(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(T, B, I, generator=g, dtype=dtype),
        torch.randn(T, B, O, generator=g, dtype=dtype),
    )


def _online_grads(model, xs, ys, example, algorithm="d_rtrl", custom_ops=None, **opts):
    learner = OnlineLearner(
        model,
        algorithm=algorithm,
        loss="mse",
        example_inputs=example,
        custom_ops=custom_ops,
        **opts,
    )
    learner.run(xs, ys)
    return learner, {n: p.grad.clone() for n, p in model.named_parameters()}


def _fresh_lif(dtype):
    torch.manual_seed(1)
    return LIFLayer(I, H, O, B).to(dtype)


@pytest.mark.parametrize("kind", ["leaky", "lif"])
def test_d_rtrl_equals_torch_bptt_float64(x64, kind):
    """Element-wise recurrence + readout: D-RTRL through the bridge is BPTT (float64, 1e-10)."""
    xs, ys = _data(torch.float64)
    if kind == "leaky":
        torch.manual_seed(0)
        model = LeakyRNN(I, H, O).double()
        state = initial_state(model, B)
        example, custom = (xs[0], *state), None
    else:
        model, state, custom = _fresh_lif(torch.float64), None, {"etrace::spike": spike_jax}
        example = (xs[0],)
    reference = copy.deepcopy(model)
    _, online = _online_grads(model, xs, ys, example, custom_ops=custom)
    ref = bptt_gradients(reference, xs, ys, "mse", state=state)
    report = compare_gradients(online, ref.grads)
    assert len(report.rows) == len(list(model.parameters()))
    assert report.worst_rel_error <= 1e-10, report.table()
    for row in report.rows:  # never a silent zero
        assert np.linalg.norm(online[row.name].numpy()) > 0


@pytest.mark.parametrize("factory", [GRUClassifier, LSTMClassifier])
def test_recurrent_weights_are_approximate_but_aligned(factory):
    """nn.GRUCell/LSTMCell: every weight traced; online grads point the same way as BPTT's."""
    torch.manual_seed(0)
    model = factory(I, 16, O)
    xs, ys = _data(torch.float32)
    state = initial_state(model, B)
    reference = copy.deepcopy(model)
    learner, online = _online_grads(model, xs, ys, (xs[0], *state))
    traced = {r.weight_path for r in learner.algorithm.graph.hidden_param_op_relations}
    assert ("cell", "weight_ih") in traced and ("cell", "weight_hh") in traced
    ref = bptt_gradients(reference, xs, ys, "mse", state=state)
    report = compare_gradients(online, ref.grads)
    assert report.min_cosine > 0.9, report.table()
    readout = [r for r in report.rows if r.name.startswith("readout")]
    assert all(r.rel_error < 1e-5 for r in readout)


def test_step_by_step_equals_run_and_grads_accumulate():
    torch.manual_seed(0)
    model = LeakyRNN(I, H, O)
    twin = copy.deepcopy(model)
    xs, ys = _data(torch.float32)
    state = initial_state(model, B)
    a = OnlineLearner(
        model, algorithm="es_d_rtrl", loss="mse", example_inputs=(xs[0], *state), decay_or_rank=0.7
    )
    b = OnlineLearner(
        twin, algorithm="es_d_rtrl", loss="mse", example_inputs=(xs[0], *state), decay_or_rank=0.7
    )
    total = a.run(xs, ys)
    steps = sum(float(b.step(xs[t], ys[t])) for t in range(T))
    assert abs(float(total) - steps) < 1e-4
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
    first = {n: p.grad.clone() for n, p in model.named_parameters()}
    a.reset_state()
    a.run(xs, ys)  # same sequence again: .grad accumulates like loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2 * first[n], rtol=1e-5, atol=1e-6)
        assert p.grad.dtype == p.dtype and p.grad.device == p.device
    model.zero_grad()
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in model.parameters())


@pytest.mark.parametrize("opt", [torch.optim.SGD, torch.optim.Adam])
def test_torch_optimizer_trains_online(opt):
    """In-place optimizer updates are seen at the next step (parameters re-imported)."""
    torch.manual_seed(0)
    model, teacher = LeakyRNN(I, H, O), LeakyRNN(I, H, O)
    xs, _ = _data(torch.float32)
    state = initial_state(model, B)
    with torch.no_grad():  # a learnable target: the outputs of another network of the same kind
        ys = bptt_gradients(teacher, xs, torch.zeros(T, B, O), "mse", state=state).outputs
    learner = OnlineLearner(model, algorithm="d_rtrl", loss="mse", example_inputs=(xs[0], *state))
    optimizer = opt(model.parameters(), lr=0.05)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        learner.reset_state()
        losses.append(float(learner.run(xs, ys)))
        optimizer.step()
    assert losses[-1] < 0.5 * losses[0], losses


def test_state_dict_resumes_bit_for_bit():
    torch.manual_seed(0)
    model = GRUClassifier(I, H, O)
    xs, ys = _data(torch.float32)
    state = initial_state(model, B)
    learner = OnlineLearner(
        model, algorithm="es_d_rtrl", loss="mse", example_inputs=(xs[0], *state)
    )
    learner.run(xs[:3], ys[:3])
    saved = copy.deepcopy(learner.state_dict())
    model.zero_grad()
    learner.run(xs[3:], ys[3:])
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    learner.run(xs[:2], ys[:2])  # move away, then restore
    learner.load_state_dict(saved)
    model.zero_grad()
    learner.run(xs[3:], ys[3:])
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, expected[n]), n
    assert "etrace" in saved and saved["model_states"]


def test_torch_loss_module_and_batch_change():
    torch.manual_seed(0)
    model = LeakyRNN(I, H, O)
    xs, ys = _data(torch.float32)
    state = initial_state(model, B)
    by_name = OnlineLearner(
        copy.deepcopy(model), algorithm="d_rtrl", loss="mse", example_inputs=(xs[0], *state)
    )
    by_module = OnlineLearner(
        model, algorithm="d_rtrl", loss=nn.MSELoss(), example_inputs=(xs[0], *state)
    )
    assert abs(float(by_name.run(xs, ys)) - float(by_module.run(xs, ys))) < 1e-5
    with pytest.raises(ValueError, match="reset_state"):
        by_module.run(torch.randn(T, 5, I), torch.randn(T, 5, O))
    by_module.reset_state(5)
    assert np.isfinite(float(by_module.run(torch.randn(T, 5, I), torch.randn(T, 5, O))))


def test_unknown_algorithm_is_refused():
    model = LeakyRNN(I, H, O)
    with pytest.raises(ValueError, match="unknown algorithm"):
        OnlineLearner(
            model,
            algorithm="rtrl++",
            loss="mse",
            example_inputs=(torch.zeros(B, I), *initial_state(model, B)),
        )
