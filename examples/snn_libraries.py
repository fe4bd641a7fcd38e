"""Train a stock snntorch network and a stock spikingjelly network online, with torch.optim.

Nothing in the models is rewritten for etrace: the snntorch network is the tutorials'
`nn.Sequential` of `Linear` + `snn.Leaky(init_hidden=True)` (the last with `output=True`), the
spikingjelly one `layer.Linear` + `neuron.LIFNode(surrogate.ATan(), detach_reset=True)`. Their
surrogate spikes (`torch.autograd.Function`s) are converted with their own backward, their
state (snntorch buffers sized lazily, spikingjelly memories) is found by the bridge, and the
conversion checks itself against torch.

Task: two classes of Poisson spike trains (one half of the input channels fires faster); the
output neuron of the class should fire at every step. Loss: MSE of the output spikes against
that target, online with ES-D-RTRL (pp-prop); accuracy: the output neuron that fired most.

Needs snntorch and spikingjelly (`pip install --no-deps` the `snn` extra of pyproject.toml).
Run: python examples/snn_libraries.py [--quick]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch import nn

from etrace_bridge import OnlineLearner

N_IN, N_HIDDEN, N_OUT = 20, 32, 2


def snntorch_net() -> nn.Module:
    import snntorch as snn

    return nn.Sequential(
        nn.Linear(N_IN, N_HIDDEN),
        snn.Leaky(beta=0.9, init_hidden=True),
        nn.Linear(N_HIDDEN, N_OUT),
        snn.Leaky(beta=0.9, init_hidden=True, output=True),
    )


def spikingjelly_net() -> nn.Module:
    from spikingjelly.activation_based import layer, neuron, surrogate

    return nn.Sequential(
        layer.Linear(N_IN, N_HIDDEN),
        neuron.LIFNode(tau=2.0, surrogate_function=surrogate.ATan(), detach_reset=True),
        layer.Linear(N_HIDDEN, N_OUT),
        neuron.LIFNode(tau=2.0, surrogate_function=surrogate.ATan(), detach_reset=True),
    )


def make_data(n: int, steps: int, gen: torch.Generator):
    """(T, n, N_IN) spike trains, (T, n, N_OUT) target spikes, (n,) labels."""
    labels = torch.randint(0, 2, (n,), generator=gen)
    rates = torch.full((n, N_IN), 0.05)
    half = N_IN // 2
    for i, c in enumerate(labels.tolist()):
        rates[i, c * half : (c + 1) * half] = 0.5
    xs = 3.0 * (torch.rand((steps, n, N_IN), generator=gen) < rates).float()  # input current
    targets = nn.functional.one_hot(labels, N_OUT).float().expand(steps, n, N_OUT)
    return xs, targets.contiguous(), labels


def accuracy(learner: OnlineLearner, xs, labels, output) -> float:
    """Run the converted model (no learning) and count the output spikes per neuron."""
    learner.reset_state()
    model = learner.model
    counts = 0
    for x in xs:
        y = model.update(x.numpy())
        y = y[output] if output is not None else y
        counts = counts + torch.from_numpy(np.asarray(y))
    return float((counts.argmax(-1) == labels).float().mean())


def train(name: str, net: nn.Module, output, epochs: int, batches: int, gen) -> dict:
    batch, steps = 16, 15
    xs, targets, _ = make_data(batch, steps, gen)
    learner = OnlineLearner(
        net,
        algorithm="es_d_rtrl",
        loss="mse",
        example_inputs=(xs[0],),
        output=output,
        decay_or_rank=0.9,
    )
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    test_x, _, test_labels = make_data(batch, steps, gen)
    history = []
    for epoch in range(epochs):
        total = 0.0
        for _ in range(batches):
            xs, targets, _ = make_data(batch, steps, gen)
            opt.zero_grad()
            learner.reset_state()
            total += float(learner.run(xs, targets))
            opt.step()
        acc = accuracy(learner, test_x, test_labels, output)
        history.append({"loss": total / batches, "accuracy": acc})
        print(f"{name} epoch {epoch}: loss {total / batches:.4f}  test accuracy {acc:.2f}")
    return {
        "history": history,
        "first_loss": history[0]["loss"],
        "last_loss": history[-1]["loss"],
        "final_test_accuracy": history[-1]["accuracy"],
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (tests)")
    args = parser.parse_args(argv)
    epochs, batches = (3, 4) if args.quick else (8, 10)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    results = {
        "snntorch": train("snntorch", snntorch_net(), 0, epochs, batches, gen),
        "spikingjelly": train("spikingjelly", spikingjelly_net(), None, epochs, batches, gen),
    }
    for name, r in results.items():
        print(
            f"learning result: {name} loss {r['first_loss']:.4f} -> {r['last_loss']:.4f}, "
            f"test accuracy {r['final_test_accuracy']:.2f} (chance 0.5)"
        )
    return results


if __name__ == "__main__":
    main()
