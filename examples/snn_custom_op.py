"""Online training of a spiking network written in PyTorch, with a custom surrogate-spike op.

The spike is a `torch.library.custom_op` (Heaviside forward, sigmoid surrogate backward,
registered with `register_fake` and `register_autograd`). Its JAX twin, a `jax.custom_jvp`
function with the same surrogate, is handed to the bridge as `custom_ops={"snn_example::spike":
spike_jax}`. The network keeps its state in registered buffers that `forward` reassigns (the
SNN-style state convention), and learns online with D-RTRL (or ES-D-RTRL) and torch's Adam on
the spiking delayed match-to-sample task (`etrace_bridge.compare.tasks.get_task('dms')`).

    python examples/snn_custom_op.py            # full run
    python examples/snn_custom_op.py --quick    # small run, well under 30 s
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import numpy as np
import torch
from torch import nn

from etrace_bridge import OnlineLearner
from etrace_bridge.compare.tasks import get_task, iterate_minibatches

SURROGATE_SCALE = 4.0


# ----------------------------------------------------------------------------- the spike op


@torch.library.custom_op("snn_example::spike", mutates_args=())
def spike(x: torch.Tensor) -> torch.Tensor:
    """Heaviside step: 1 where x > 0 (x = distance to threshold), else 0."""
    return (x > 0).to(x.dtype)


@spike.register_fake
def _spike_fake(x):
    return torch.empty_like(x)


def _spike_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _spike_backward(ctx, grad):
    """Sigmoid surrogate: the derivative of sigmoid(scale * x) stands in for the step's."""
    (x,) = ctx.saved_tensors
    s = torch.sigmoid(SURROGATE_SCALE * x)
    return grad * SURROGATE_SCALE * s * (1 - s)


spike.register_autograd(_spike_backward, setup_context=_spike_setup)


@jax.custom_jvp
def spike_jax(x):
    """The same spike in JAX: Heaviside forward, sigmoid surrogate derivative."""
    return (x > 0).astype(x.dtype)


@spike_jax.defjvp
def _spike_jax_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    s = jax.nn.sigmoid(SURROGATE_SCALE * x)
    return spike_jax(x), dx * SURROGATE_SCALE * s * (1 - s)


CUSTOM_OPS = {"snn_example::spike": spike_jax}


# ----------------------------------------------------------------------------- the network


class AdaptiveLIF(nn.Module):
    """Adaptive LIF neurons (no recurrent weights) and a leaky readout, state in buffers.

    One step (dt = 1), with `s` the spikes of the previous state::

        v   = alpha * v + (1 - alpha) * W_in x - s          (soft reset)
        a   = rho * a + s                                   (threshold adaptation)
        z   = spike(v - 1 - beta * a)
        out = kappa * out + W_out z

    Each neuron's `(v, a)` depends only on its own previous `(v, a)` (no recurrent weights), and
    the spikes that reach the readout are those of the *new* state. The one approximation D-RTRL
    makes for `W_in` here is the path through the readout's own memory `out`, a second hidden
    group (see docs/concepts.md, "When is the online gradient exact").
    """

    def __init__(
        self,
        n_in: int,
        n_hidden: int,
        n_out: int,
        batch: int,
        *,
        tau_mem: float = 10.0,
        tau_adapt: float = 200.0,
        beta: float = 2.0,
        tau_out: float = 5.0,
    ):
        super().__init__()
        self.alpha = math.exp(-1 / tau_mem)
        self.rho = math.exp(-1 / tau_adapt)
        self.kappa = math.exp(-1 / tau_out)
        self.beta = beta
        self.input = nn.Linear(n_in, n_hidden)
        self.readout = nn.Linear(n_hidden, n_out)
        with torch.no_grad():
            self.input.weight.mul_(10.0)
        self.n_hidden, self.n_out = n_hidden, n_out
        self.reset_state(batch)

    def reset_state(self, batch: int) -> None:
        zeros = lambda n: torch.zeros(batch, n)
        self.register_buffer("v", zeros(self.n_hidden), persistent=False)
        self.register_buffer("a", zeros(self.n_hidden), persistent=False)
        self.register_buffer("out", zeros(self.n_out), persistent=False)

    def forward(self, x):
        s = spike(self.v - 1.0 - self.beta * self.a)
        v = self.alpha * self.v + (1 - self.alpha) * self.input(x) - s
        a = self.rho * self.a + s
        z = spike(v - 1.0 - self.beta * a)
        out = self.kappa * self.out + self.readout(z)
        self.v, self.a, self.out = v, a, out  # reassigned buffers are the recurrent state
        return out


# ----------------------------------------------------------------------------- training


def accuracy(model: AdaptiveLIF, xs: np.ndarray, ys: np.ndarray) -> float:
    """Eager torch forward over the sequence; the class is read at the last step."""
    model.reset_state(xs.shape[1])
    with torch.no_grad():
        for t in range(xs.shape[0]):
            out = model(torch.from_numpy(xs[t]))
    return float((out.argmax(-1).numpy() == ys[-1]).mean())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small run (well under 30 s)")
    parser.add_argument("--algorithm", default="d_rtrl", choices=["d_rtrl", "es_d_rtrl", "hybrid"])
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    quick = args.quick
    epochs = args.epochs or (4 if quick else 12)
    hidden = args.hidden or 64
    task = get_task(
        "dms",
        n_train=512 if quick else 1024,
        n_test=128 if quick else 256,
        seq_len=40 if quick else 50,
        seed=args.seed,
    )
    # train on the whole test period (the last 30 % of the steps), evaluate at the last step
    ys_train = task.ys_train.copy()
    ys_train[-max(1, round(0.3 * task.seq_len)) :] = task.ys_train[-1]

    torch.manual_seed(args.seed)
    model = AdaptiveLIF(task.n_in, hidden, task.n_out, args.batch)
    learner = OnlineLearner(
        model,
        algorithm=args.algorithm,
        loss="cross_entropy",
        example_inputs=(torch.zeros(args.batch, task.n_in),),
        custom_ops=CUSTOM_OPS,
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    print(
        f"spiking DMS: {task.n_train} train / {task.n_test} test sequences of {task.seq_len} "
        f"steps, {task.n_in} input neurons; {hidden} adaptive LIF neurons, {args.algorithm}"
    )
    history = []
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        losses = []
        for xb, yb in iterate_minibatches(
            task.xs_train,
            ys_train,
            args.batch,
            shuffle=True,
            seed=args.seed + epoch,
            drop_last=True,
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
    result = {
        "history": history,
        "final_test_accuracy": history[-1]["test_accuracy"],
        "first_loss": history[0]["loss"],
        "last_loss": history[-1]["loss"],
    }
    print(
        f"learning result: train loss {result['first_loss']:.4f} -> {result['last_loss']:.4f}, "
        f"test accuracy {result['final_test_accuracy']:.3f} (chance 0.5)"
    )
    return result


if __name__ == "__main__":
    main()
