"""Torch nn.GRU / nn.LSTM (2 layers, one step at a time) through the bridge: every weight traced,
online gradients aligned with torch autograd BPTT. `python -m tests.bridge.test_torch_rnn_fidelity`
prints the per-parameter table recorded in docs/fidelity_torch.md."""

import copy

import pytest
import torch

from etrace_bridge import OnlineLearner, bptt_gradients, compare_gradients

T, B, I, H = 20, 4, 6, 16
FACTORIES = {
    "gru": lambda: torch.nn.GRU(I, H, num_layers=2),
    "lstm": lambda: torch.nn.LSTM(I, H, num_layers=2),
}
# measured minimum cosine over all parameters (2026-11-21, float32, seed 0), minus a margin
MIN_COSINE = {
    ("gru", "d_rtrl"): 0.87,
    ("gru", "es_d_rtrl"): 0.72,
    ("lstm", "d_rtrl"): 0.87,
    ("lstm", "es_d_rtrl"): 0.67,
}


def measure(kind, algorithm):
    torch.manual_seed(0)
    model = FACTORIES[kind]()
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    xs, ys = torch.randn(T, B, I, generator=g), torch.randn(T, B, H, generator=g)
    learner = OnlineLearner(model, algorithm=algorithm, loss="mse", example_inputs=(xs[0],))
    learner.run(xs, ys)
    online = {n: p.grad for n, p in model.named_parameters()}
    report = compare_gradients(online, bptt_gradients(reference, xs, ys, "mse").grads)
    return learner, report


@pytest.mark.parametrize("kind,algorithm", sorted(MIN_COSINE))
def test_torch_rnn_layers_are_traced_and_aligned(kind, algorithm):
    learner, report = measure(kind, algorithm)
    groups = learner.algorithm.graph.hidden_groups
    assert len(groups) == 2  # one hidden group per layer
    traced = {r.weight_path[0] for r in learner.algorithm.graph.hidden_param_op_relations}
    assert traced == {f"weight_{k}_l{i}" for k in ("ih", "hh") for i in (0, 1)}
    assert report.min_cosine >= MIN_COSINE[(kind, algorithm)], report.table()


if __name__ == "__main__":
    for kind, algorithm in sorted(MIN_COSINE):
        print(f"\n### torch.nn.{kind.upper()}(num_layers=2), {algorithm}\n")
        print(measure(kind, algorithm)[1].to_markdown())
