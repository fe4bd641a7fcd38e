"""OnlineLearner(window=K): exact BPTT inside windows of K steps, traces across windows.

Oracle: torch autograd BPTT (`bptt_gradients`), float64, worst relative error <= 1e-10:
- a torch `nn.GRUCell` + `nn.Linear` (recurrent weights, where single-step online gradients are
  approximate) with window = T, for D-RTRL, ES-D-RTRL and hybrid; two stacked `nn.GRUCell`s
  with window = T (ES-D-RTRL);
- D-RTRL on a leaky cell without recurrent weights (element-wise: exact for every window) with
  window 3 on T = 7 (the last window shorter) and window 1.
"""

import copy

import pytest
import torch

from etrace_bridge.bptt import bptt_gradients, compare_gradients
from etrace_bridge.compare.models import (
    GRUClassifier,
    LeakyRNN,
    StackedGRUClassifier,
    initial_state,
)
from etrace_bridge.learner import OnlineLearner

T, B, I, H, O = 7, 3, 5, 6, 2


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(T, B, I, generator=g, dtype=torch.float64)
    return xs, torch.randn(T, B, O, generator=g, dtype=torch.float64)


def _check(model, algorithm, window, **opts):
    xs, ys = _data()
    state = initial_state(model, B)
    reference = copy.deepcopy(model)
    learner = OnlineLearner(
        model,
        algorithm=algorithm,
        loss="mse",
        example_inputs=(xs[0], *state),
        window=window,
        **opts,
    )
    assert learner.algorithm.vjp_method == "multi-step"
    loss = learner.run(xs, ys)
    online = {n: p.grad.clone() for n, p in model.named_parameters()}
    ref = bptt_gradients(reference, xs, ys, "mse", state=state)
    assert abs(float(loss) - float(ref.loss)) <= 1e-12 * abs(float(ref.loss))
    report = compare_gradients(online, ref.grads)
    assert len(report.rows) == len(list(model.parameters()))
    assert report.worst_rel_error <= 1e-10, report.table()
    return learner, xs, ys


@pytest.mark.parametrize(
    "algorithm, opts",
    [("d_rtrl", {}), ("es_d_rtrl", {"decay_or_rank": 0.9}), ("hybrid", {"decay_or_rank": 0.9})],
)
def test_gru_window_of_the_sequence_is_torch_bptt(x64, algorithm, opts):
    torch.manual_seed(0)
    _check(GRUClassifier(I, H, O).double(), algorithm, T, **opts)


def test_stacked_gru_window_of_the_sequence_is_torch_bptt(x64):
    """Two stacked nn.GRUCell layers (layer 1 feeding layer 2's memory)."""
    torch.manual_seed(0)
    learner, _, _ = _check(StackedGRUClassifier(I, H, O).double(), "es_d_rtrl", T)
    traced = {r.weight_path for r in learner.algorithm.graph.hidden_param_op_relations}
    assert {("cell1", "weight_hh"), ("cell2", "weight_ih")} <= traced, traced


def test_d_rtrl_windows_on_element_wise_model_are_bptt(x64):
    for window in (3, 1):
        torch.manual_seed(0)
        learner, xs, ys = _check(LeakyRNN(I, H, O).double(), "d_rtrl", window)
    assert learner.step(xs[0], ys[0]).shape == ()  # window 1: step() is one window


def test_window_refusals(x64):
    torch.manual_seed(0)
    model = GRUClassifier(I, H, O).double()
    xs, ys = _data()
    example = (xs[0], *initial_state(model, B))
    with pytest.raises(ValueError, match="vjp_method='multi-step'"):
        OnlineLearner(model, example_inputs=example, window=4, vjp_method="single-step")
    with pytest.raises(ValueError, match="at least 1 time step"):
        OnlineLearner(model, example_inputs=example, window=0)
    learner = OnlineLearner(model, algorithm="d_rtrl", example_inputs=example, window=4)
    with pytest.raises(ValueError, match="run\\(xs, targets\\)"):
        learner.step(xs[0], ys[0])
