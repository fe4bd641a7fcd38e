"""A JAX-native spiking network trained online with `etrace_core.run_online` and a small Adam.

The model is built from `etrace_core.nn` layers (brainstate modules): a layer of adaptive LIF
neurons without recurrent weights and a leaky rate readout. The task, generated here with numpy,
is evidence accumulation: two input populations fire at random rates for T steps; the network
must report which one fired more, at every step of the last quarter of the sequence.

The LIF layer has no recurrent weights, so its traces are exact per neuron; the readout's own
memory (a second hidden group) is the one path D-RTRL leaves out for the LIF input weights
(docs/concepts.md). Each minibatch is one call of `run_online` (T online steps in one jitted
`lax.scan`); its summed gradients go into a hand-written Adam (no optimizer library needed).

    python examples/jax_native.py               # full run
    python examples/jax_native.py --quick       # small run, well under 30 s
"""

from __future__ import annotations

import argparse
import time

import brainstate
import jax
import jax.numpy as jnp
import numpy as np

import etrace_core
from etrace_core import nn

ALGORITHMS = {
    "d_rtrl": lambda model: etrace_core.D_RTRL(model),
    "es_d_rtrl": lambda model: etrace_core.ES_D_RTRL(model, decay_or_rank=0.9),
    "hybrid": lambda model: etrace_core.HybridDimVjpAlgorithm(model, decay_or_rank=0.9),
}


class SpikingClassifier(brainstate.nn.Module):
    """Adaptive LIF layer -> leaky rate readout; returns the readout's rates (the logits)."""

    def __init__(self, n_in: int, n_hidden: int, n_out: int, seed: int = 0):
        super().__init__()
        self.lif = nn.LIF(
            n_in,
            n_hidden,
            tau_mem=10.0,
            tau_adapt=50.0,
            beta=0.2,
            w_init=nn.init.normal(2.0 / np.sqrt(n_in)),
            key=seed,
        )
        self.readout = nn.LeakyRateReadout(n_hidden, n_out, tau=5.0, key=seed + 1)

    def update(self, x):
        return 10.0 * self.readout(self.lif(x))


def make_task(n: int, seq_len: int, n_in: int, rng: np.random.Generator):
    """Spike trains (T, n, n_in) of two populations with rates p and 0.3 - p; labels (T, n) int32,
    -1 where no loss is taken (the first three quarters of the sequence)."""
    half = n_in // 2
    p = rng.uniform(0.05, 0.25, size=n)
    rates = np.concatenate(
        [np.repeat(p[:, None], half, 1), np.repeat(0.3 - p[:, None], n_in - half, 1)], axis=1
    )
    xs = (rng.random((seq_len, n, n_in)) < rates).astype(np.float32)
    labels = (p < 0.15).astype(np.int32)
    ys = np.full((seq_len, n), -1, np.int32)
    ys[-(seq_len // 4) :] = labels
    return xs, ys


def cross_entropy(logits, labels):
    """Mean cross-entropy over the entries whose label is not -1 (0 when there are none)."""
    valid = labels >= 0
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[:, None], axis=-1)[:, 0]
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


class Adam:
    """Adam on a model's ParamStates, fed gradients keyed by state path (as run_online gives)."""

    def __init__(self, params, lr=1e-2, b1=0.9, b2=0.999, eps=1e-8):
        self.params = params  # {path: brainstate.ParamState}
        self.lr, self.b1, self.b2, self.eps = lr, b1, b2, eps
        self.m = {p: jnp.zeros_like(s.value) for p, s in params.items()}
        self.v = {p: jnp.zeros_like(s.value) for p, s in params.items()}
        self.t = 0
        self._update = jax.jit(self._update_fn)

    def _update_fn(self, values, grads, m, v, t):
        new_values, new_m, new_v = {}, {}, {}
        for p, w in values.items():
            g = grads[p]
            new_m[p] = self.b1 * m[p] + (1 - self.b1) * g
            new_v[p] = self.b2 * v[p] + (1 - self.b2) * g * g
            m_hat = new_m[p] / (1 - self.b1**t)
            v_hat = new_v[p] / (1 - self.b2**t)
            new_values[p] = w - self.lr * m_hat / (jnp.sqrt(v_hat) + self.eps)
        return new_values, new_m, new_v

    def step(self, grads):
        self.t += 1
        values = {p: s.value for p, s in self.params.items()}
        values, self.m, self.v = self._update(values, dict(grads), self.m, self.v, self.t)
        for p, s in self.params.items():
            s.value = values[p]


def make_predict(model):
    """A jitted forward pass over a whole sequence (no learning); returns the last step's output."""

    @brainstate.transform.jit
    def predict(xs):
        return brainstate.transform.for_loop(model, xs)[-1]

    return predict


def accuracy(model, predict, xs, ys, train_batch: int) -> float:
    brainstate.nn.reset_all_states(model, xs.shape[1])
    acc = float(jnp.mean(jnp.argmax(predict(xs), -1) == ys[-1]))
    brainstate.nn.reset_all_states(model, train_batch)  # back to the shapes the graph has
    return acc


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small run (well under 30 s)")
    parser.add_argument("--algorithm", default="d_rtrl", choices=sorted(ALGORITHMS))
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    epochs = args.epochs or (3 if args.quick else 20)
    hidden = args.hidden or (32 if args.quick else 64)
    seq_len, n_in, n_out = 40, 20, 2
    rng = np.random.default_rng(args.seed)
    xs_train, ys_train = make_task(256 if args.quick else 2048, seq_len, n_in, rng)
    xs_test, ys_test = make_task(256, seq_len, n_in, rng)

    model = SpikingClassifier(n_in, hidden, n_out, seed=args.seed)
    brainstate.nn.init_all_states(model, batch_size=args.batch)
    algo = ALGORITHMS[args.algorithm](model)
    algo.compile_graph(jnp.zeros((args.batch, n_in)))
    algo.init_etrace_state()
    optimizer = Adam(model.states(brainstate.ParamState), lr=args.lr)
    predict = make_predict(model)
    print(
        f"evidence accumulation: {xs_train.shape[1]} train sequences of {seq_len} steps; "
        f"LIF({hidden}) -> LeakyRateReadout({n_out}), online {type(algo).__name__}"
    )

    history, start = [], time.perf_counter()
    for epoch in range(1, epochs + 1):
        order = np.random.default_rng(args.seed + epoch).permutation(xs_train.shape[1])
        losses = []
        for k in range(0, len(order) - args.batch + 1, args.batch):
            idx = order[k : k + args.batch]
            brainstate.nn.reset_all_states(algo, args.batch)  # model states and traces to zero
            result = etrace_core.run_online(
                algo, cross_entropy, jnp.asarray(xs_train[:, idx]), jnp.asarray(ys_train[:, idx])
            )
            optimizer.step(result.grads)
            losses.append(float(result.loss))
        acc = accuracy(model, predict, jnp.asarray(xs_test), ys_test, args.batch)
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
