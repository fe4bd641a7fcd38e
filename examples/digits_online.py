"""Online learning on real data: scikit-learn's 8x8 digits, read one row per time step.

Each image (8x8, values 0..16, scaled to [0, 1]) is a sequence of T=8 rows of I=8 pixels. A
recurrent cell (``etrace_core.nn.GRUCell`` or ``LeakyRNNCell``, 64 units) with a ``Linear``
readout is trained to name the digit; the cross-entropy loss is applied at the last step only
(a per-step mask), so the online algorithms must carry credit from the last row back to the
weights' effect on earlier rows through their eligibility traces.

Methods, all with the same model, initialisation, data order and Adam optimiser:

- ``d_rtrl``: D-RTRL (param-dim traces), gradients from ``etrace_core.run_online``;
- ``es_d_rtrl``: ES-D-RTRL (io-dim traces, decay 0.9);
- ``hybrid``: D-RTRL for the input weight (1,536 elements <= max_param_dim_size=2048),
  ES-D-RTRL for the recurrent weight;
- ``bptt``: exact gradients, ``jax.grad`` through the unrolled sequence.

Usage::

    python examples/digits_online.py                 # 30 epochs, all methods
    python examples/digits_online.py --quick         # a smoke run (< 60 s)
    python examples/digits_online.py --epochs 10 --methods d_rtrl bptt --cell leaky
    python examples/digits_online.py --json out.json --plot curves.png
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Optional

import brainstate
import jax
import jax.numpy as jnp
import numpy as np

import etrace_core
from etrace_core import nn

METHODS = ("d_rtrl", "es_d_rtrl", "hybrid", "bptt")
NUM_CLASSES = 10
T_STEPS = 8


# ----------------------------------------------------------------------------- data


def load_data(seed: int = 0, test_fraction: float = 0.2):
    """(x_train, y_train, x_test, y_test); x: (N, T=8, I=8) float32 in [0, 1], y: (N,) int."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)  # (1797, 8, 8): rows are time steps
    y = digits.target.astype(np.int32)
    order = np.random.RandomState(seed).permutation(len(x))
    n_test = int(round(test_fraction * len(x)))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


# ----------------------------------------------------------------------------- model


class DigitNet(brainstate.nn.Module):
    """A recurrent cell over the rows and a linear readout of its state at every step."""

    def __init__(self, cell: str = "gru", hidden: int = 64, seed: int = 0):
        super().__init__()
        if cell == "gru":
            self.rnn = nn.GRUCell(8, hidden, key=seed)
        elif cell == "leaky":
            self.rnn = nn.LeakyRNNCell(8, hidden, tau=2.0, recurrent=True, key=seed)
        else:
            raise ValueError(f"unknown cell {cell!r}; use 'gru' or 'leaky'")
        self.out = nn.Linear(hidden, NUM_CLASSES, key=seed + 1)

    def update(self, x):
        return self.out(self.rnn(x))


def last_step_loss(logits, target):
    """Cross-entropy of one step, weighted by the step's mask (1 at the last row, else 0)."""
    onehot, mask = target
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -mask * jnp.sum(onehot * logp) / onehot.shape[0]


def make_pure(model):
    """(forward, params): forward(params, xs) -> logits at the last step, a pure function."""
    graphdef, tree = brainstate.graph.treefy_split(model)
    flat = tree.to_flat()
    param_paths = [p for p, s in flat.items() if issubclass(s.type, brainstate.ParamState)]
    hidden_paths = [p for p in flat if p not in param_paths]

    def forward(params, xs):  # xs: (T, B, I)
        batch = xs.shape[1]
        h0 = {
            p: jnp.zeros((batch,) + flat[p].value.shape[1:], flat[p].value.dtype)
            for p in hidden_paths
        }

        def body(h, x):
            vals = {**h, **params}
            clone = brainstate.graph.treefy_merge(
                graphdef, type(tree).from_flat({p: flat[p].replace(value=vals[p]) for p in flat})
            )
            out = clone(x)
            return {p: s.value for p, s in clone.states().items() if p in h}, out

        _, outs = jax.lax.scan(body, h0, xs)
        return outs[-1]

    return forward, {p: flat[p].value for p in param_paths}


# ----------------------------------------------------------------------------- optimiser


def adam_init(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    return {"m": zeros, "v": zeros, "t": jnp.zeros((), jnp.int32)}


@jax.jit
def adam_update(params, grads, state, lr=1e-2, b1=0.9, b2=0.999, eps=1e-8):
    t = state["t"] + 1
    m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state["m"], grads)
    v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state["v"], grads)
    scale = lr * jnp.sqrt(1 - b2**t) / (1 - b1**t)
    params = jax.tree.map(lambda p, m, v: p - scale * m / (jnp.sqrt(v) + eps), params, m, v)
    return params, {"m": m, "v": v, "t": t}


# ----------------------------------------------------------------------------- training


def make_algorithm(method: str, model, decay: float):
    if method == "d_rtrl":
        return etrace_core.D_RTRL(model)
    if method == "es_d_rtrl":
        return etrace_core.ES_D_RTRL(model, decay_or_rank=decay)
    if method == "hybrid":
        return etrace_core.HybridDimVjpAlgorithm(
            model, decay_or_rank=decay, max_param_dim_size=2048
        )
    raise ValueError(f"unknown method {method!r}; use one of {METHODS}")


def train(
    method: str = "d_rtrl",
    *,
    epochs: int = 30,
    cell: str = "gru",
    hidden: int = 64,
    batch_size: int = 32,
    lr: float = 1e-2,
    schedule: str = "cosine",
    decay: float = 0.9,
    seed: int = 0,
    max_train: Optional[int] = None,
    data=None,
    verbose: bool = True,
) -> dict:
    """Train one method; returns {'method', 'test_acc' (per epoch), 'train_loss', 'seconds'}.

    Every method sees the same initial weights, minibatch order and optimiser; only the
    gradient differs. ``test_acc[0]`` is the accuracy before training. ``schedule='cosine'``
    anneals the learning rate from ``lr`` to 0 over the epochs; ``'constant'`` keeps it.
    """
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"unknown schedule {schedule!r}; use 'cosine' or 'constant'")
    x_tr, y_tr, x_te, y_te = load_data(seed) if data is None else data
    if max_train is not None:
        x_tr, y_tr = x_tr[:max_train], y_tr[:max_train]
    model = DigitNet(cell, hidden, seed)
    brainstate.nn.init_all_states(model, batch_size=batch_size)
    forward, params = make_pure(model)
    param_states = dict(model.states(brainstate.ParamState).items())
    opt = adam_init(params)

    accuracy = jax.jit(lambda p, xs, ys: jnp.mean(jnp.argmax(forward(p, xs), -1) == ys))
    xs_test = jnp.asarray(np.swapaxes(x_te, 0, 1))  # (T, N, I)

    mask = jnp.zeros((T_STEPS,), jnp.float32).at[-1].set(1.0)
    if method == "bptt":

        def batch_loss(p, xs, onehot):
            logp = jax.nn.log_softmax(forward(p, xs), axis=-1)
            return -jnp.sum(onehot * logp) / onehot.shape[0]

        bptt_step = jax.jit(jax.value_and_grad(batch_loss))
    else:
        algo = make_algorithm(method, model, decay)
        algo.compile_graph(jnp.zeros((batch_size, 8), jnp.float32))
        algo.init_etrace_state()

    history = {
        "method": method,
        "test_acc": [float(accuracy(params, xs_test, y_te))],
        "train_loss": [],
        "seconds": [],
    }
    rng = np.random.RandomState(seed + 1)
    n_batches = len(x_tr) // batch_size
    for epoch in range(epochs):
        start = time.perf_counter()
        order = rng.permutation(len(x_tr))
        total = 0.0
        lr_epoch = (
            lr if schedule == "constant" else lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
        )
        for b in range(n_batches):
            idx = order[b * batch_size : (b + 1) * batch_size]
            xs = jnp.asarray(np.swapaxes(x_tr[idx], 0, 1))  # (T, B, I)
            onehot = jax.nn.one_hot(y_tr[idx], NUM_CLASSES, dtype=jnp.float32)
            if method == "bptt":
                loss, grads = bptt_step(params, xs, onehot)
            else:
                brainstate.nn.reset_all_states(model, batch_size=batch_size)
                algo.init_etrace_state()
                targets = (jnp.broadcast_to(onehot, (T_STEPS,) + onehot.shape), mask)
                res = etrace_core.run_online(algo, last_step_loss, xs, targets)
                loss, grads = res.loss, res.grads
            params, opt = adam_update(params, grads, opt, lr_epoch)
            for p, st in param_states.items():
                st.value = params[p]
            total += float(loss)
        history["train_loss"].append(total / n_batches)
        history["test_acc"].append(float(accuracy(params, xs_test, y_te)))
        history["seconds"].append(time.perf_counter() - start)
        if verbose:
            print(
                f"{method:10s} epoch {epoch + 1:3d}  loss {total / n_batches:.4f}  "
                f"test acc {history['test_acc'][-1]:.4f}  ({history['seconds'][-1]:.1f} s)",
                flush=True,
            )
    return history


def plot(results: list[dict], filename: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        ax.plot(range(len(r["test_acc"])), r["test_acc"], marker="o", ms=3, label=r["method"])
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(filename, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument(
        "--quick", action="store_true", help="a smoke run: 2 epochs on 480 training images (< 60 s)"
    )
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--cell", default="gru", choices=("gru", "leaky"))
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument(
        "--schedule",
        default="cosine",
        choices=("cosine", "constant"),
        help="learning rate over the epochs",
    )
    ap.add_argument("--decay", type=float, default=0.9, help="ES-D-RTRL / hybrid trace decay")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the per-epoch results here")
    ap.add_argument("--plot", help="write a PNG of the accuracy curves here")
    args = ap.parse_args(argv)

    epochs, max_train = (2, 480) if args.quick else (args.epochs, None)
    data = load_data(args.seed)
    results = []
    for method in args.methods:
        results.append(
            train(
                method,
                epochs=epochs,
                cell=args.cell,
                hidden=args.hidden,
                batch_size=args.batch_size,
                lr=args.lr,
                schedule=args.schedule,
                decay=args.decay,
                seed=args.seed,
                max_train=max_train,
                data=data,
            )
        )
    print("\nfinal test accuracy:")
    for r in results:
        print(
            f"  {r['method']:10s} {r['test_acc'][-1]:.4f}  (best {max(r['test_acc']):.4f}, "
            f"{sum(r['seconds']):.0f} s)"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    if args.plot:
        plot(results, args.plot, f"digits, {args.cell} {args.hidden}, online vs BPTT")
    return results


if __name__ == "__main__":
    main()
