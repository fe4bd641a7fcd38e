"""Online training of a PyTorch GRU on the sequential-digits task, with torch's Adam.

The model is an ordinary `nn.GRUCell` + `nn.Linear` (or `nn.GRU` run one step at a time).
`etrace_bridge.OnlineLearner` exports one step, learns with eligibility traces (ES-D-RTRL by
default) and writes the online gradients into the parameters' `.grad`, so the optimizer loop is
the usual one. Each 8x8 digit is read one row per step (T = 8); the class is predicted at the
last step. With `--compare-bptt` the same model is also trained by torch BPTT from the same
initial weights, for reference.

    python examples/torch_gru_online.py                 # full run
    python examples/torch_gru_online.py --quick         # small run, well under 30 s
    python examples/torch_gru_online.py --compare-bptt  # also train with BPTT
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
from torch import nn

from etrace_bridge import OnlineLearner
from etrace_bridge.compare.models import (
    GRUClassifier,  # nn.GRUCell + nn.Linear, forward(x, h) -> (y, h)
)
from etrace_bridge.compare.tasks import get_task, iterate_minibatches
from etrace_bridge.losses import resolve_loss


class GRULayerClassifier(nn.Module):
    """The same with `nn.GRU`, run one step at a time: `forward(x, h) -> (logits, h)`."""

    def __init__(self, n_in: int, n_hidden: int, n_out: int):
        super().__init__()
        self.gru = nn.GRU(n_in, n_hidden, batch_first=True)
        self.readout = nn.Linear(n_hidden, n_out)

    def forward(self, x, h):  # x: (B, n_in), h: (1, B, n_hidden)
        out, h = self.gru(x.unsqueeze(1), h)
        return self.readout(out[:, 0]), h


def zero_state(model: nn.Module, batch: int) -> torch.Tensor:
    hidden = model.readout.in_features
    return (
        torch.zeros(1, batch, hidden)
        if isinstance(model, GRULayerClassifier)
        else torch.zeros(batch, hidden)
    )


def accuracy(model: nn.Module, xs: np.ndarray, ys: np.ndarray) -> float:
    """Eager torch forward pass; the class is read at the last step."""
    h = zero_state(model, xs.shape[1])
    with torch.no_grad():
        for t in range(xs.shape[0]):
            logits, h = model(torch.from_numpy(xs[t]), h)
    return float((logits.argmax(-1).numpy() == ys[-1]).mean())


def train_bptt(model, task, xs_train, ys_train, args, epochs) -> list:
    """Reference: the same loop with torch autograd through the whole sequence."""
    loss_fn = resolve_loss("cross_entropy")
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    accs = []
    for epoch in range(1, epochs + 1):
        for xb, yb in iterate_minibatches(
            xs_train, ys_train, args.batch, shuffle=True, seed=args.seed + epoch, drop_last=True
        ):
            optimizer.zero_grad()
            h = zero_state(model, args.batch)
            loss = 0.0
            for t in range(xb.shape[0]):
                logits, h = model(torch.from_numpy(xb[t]), h)
                loss = loss + loss_fn(logits, torch.from_numpy(yb[t]))
            loss.backward()
            optimizer.step()
        accs.append(accuracy(model, task.xs_test, task.ys_test))
    return accs


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small run (well under 30 s)")
    parser.add_argument(
        "--model",
        default="cell",
        choices=["cell", "layer"],
        help="nn.GRUCell (default) or nn.GRU stepped one step at a time",
    )
    parser.add_argument(
        "--algorithm", default="es_d_rtrl", choices=["es_d_rtrl", "d_rtrl", "hybrid"]
    )
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--compare-bptt", action="store_true", help="also train a copy of the model with torch BPTT"
    )
    args = parser.parse_args(argv)
    epochs = args.epochs or (4 if args.quick else 15)
    hidden = args.hidden or (32 if args.quick else 64)

    task = get_task("digits", seed=args.seed)
    xs_train, ys_train = task.xs_train, task.ys_train

    torch.manual_seed(args.seed)
    cls = GRUClassifier if args.model == "cell" else GRULayerClassifier
    model = cls(task.n_in, hidden, task.n_out)
    initial = copy.deepcopy(model)
    learner = OnlineLearner(
        model,
        algorithm=args.algorithm,
        loss="cross_entropy",
        example_inputs=(torch.zeros(args.batch, task.n_in), zero_state(model, args.batch)),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    print(
        f"digits: {xs_train.shape[1]} train / {task.n_test} test sequences, T={task.seq_len}; "
        f"{cls.__name__}({hidden} units), online {args.algorithm}"
    )

    history, start = [], time.perf_counter()
    for epoch in range(1, epochs + 1):
        losses = []
        for xb, yb in iterate_minibatches(
            xs_train, ys_train, args.batch, shuffle=True, seed=args.seed + epoch, drop_last=True
        ):
            optimizer.zero_grad()
            learner.reset_state()
            losses.append(float(learner.run(torch.from_numpy(xb), torch.from_numpy(yb))))
            optimizer.step()
        acc = accuracy(model, task.xs_test, task.ys_test)
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), "test_accuracy": acc})
        print(
            f"epoch {epoch:3d}  train loss {np.mean(losses):.4f}  test accuracy {acc:.3f}  "
            f"({time.perf_counter() - start:.1f} s)"
        )

    result = {"history": history, "final_test_accuracy": history[-1]["test_accuracy"]}
    print(
        f"learning result: online {args.algorithm} test accuracy "
        f"{result['final_test_accuracy']:.3f} after {epochs} epochs (chance 0.1)"
    )
    if args.compare_bptt:
        bptt = train_bptt(initial, task, xs_train, ys_train, args, epochs)
        result["bptt_test_accuracy"] = bptt
        for epoch, acc in enumerate(bptt, 1):
            print(f"bptt epoch {epoch:3d}  test accuracy {acc:.3f}")
        print(f"learning result: BPTT test accuracy {bptt[-1]:.3f} after {epochs} epochs")
    return result


if __name__ == "__main__":
    main()
