"""Compiling and reading eligibility-trace graphs with etrace_core.

Online learning in etrace_core starts by compiling a one-step model into an ``ETraceGraph``: the
compiler reads the model's jaxpr and finds

* the *hidden groups*: hidden states that evolve together unit by unit (an LSTM's h and c, a
  LIF neuron's V and a);
* the *relations*: each weight used through an ETP op (``etrace_core.ops.matmul``/``conv``/
  ``element_wise``) whose output lands, element by element, in a hidden group: these weights
  get eligibility traces;
* the parameters that reach hidden states outside such relations: element-wise ones (per-unit
  decays, gains, separate biases) get element-wise traces, small ones behind a position-mixing
  op (a conv kernel feeding a dense layer) dense traces dh/dtheta;
* every other parameter (readouts), which is learned with its exact same-step gradient, and
  what is approximate (with the reason).

Run:  python examples/graph_tutorial.py [--plot DIR]
(with --plot, a picture of each graph is written to DIR; matplotlib needed).
"""

import argparse
import os
import warnings

import brainstate
import jax.numpy as jnp

import etrace_core
from etrace_core import nn


def banner(title):
    print("\n" + "#" * 8 + " " + title + " " + "#" * max(0, 80 - len(title)))


# ------------------------------------------------------------------------------------------
# 1. One recurrent layer and a readout


class OneLayerRNN(brainstate.nn.Module):
    """An Elman cell (one hidden state ``h``) followed by a linear readout."""

    def __init__(self, n_in, n_rec, n_out):
        super().__init__()
        self.rnn = nn.ValinaRNNCell(n_in, n_rec, key=0)
        self.out = nn.Linear(n_rec, n_out, key=1)

    def update(self, x):
        return self.out(self.rnn(x))


def one_layer(plot_dir=None):
    banner("1. one-layer RNN")
    model = OneLayerRNN(10, 32, 5)
    brainstate.nn.init_all_states(model)
    algo = etrace_core.D_RTRL(model)
    algo.compile_graph(jnp.zeros(10))  # one step's example input
    algo.show_graph()
    # The cell's input and recurrent weights land in group 0 (the RNN's h) and get traces;
    # the readout's output never reaches a hidden state, so it is listed as not online-traced:
    # it is learned with its ordinary gradient at each step.
    if plot_dir:
        print("picture:", algo.plot_graph(os.path.join(plot_dir, "graph.png")))
    return algo


def inspect(algo):
    banner("2. reading the graph programmatically")
    graph = algo.graph  # an ETraceGraph (a NamedTuple)
    print("hidden groups:")
    for g in graph.hidden_groups:
        print(
            f"  group {g.index}: {g.num_state} state(s) {list(g.hidden_paths)}, "
            f"varshape {g.varshape}"
        )
    print("relations (weight -> hidden groups):")
    for i, r in enumerate(graph.hidden_param_op_relations):
        groups = [g.index for g in r.hidden_groups]
        print(
            f"  relation {i}: weight {r.weight_path} (bias {r.bias_path}), "
            f"primitive {r.primitive.name}, groups {groups}"
        )
        # y_to_hidden[k]: for each element of the op's output (canonical layout), the unit of
        # group k it lands in (-1: none)
        print(f"    output element -> unit: {r.y_to_hidden[0].tolist()[:6]} ...")
    print(
        "perturbation:",
        graph.hidden_perturb is not None,
        [p for p in graph.hidden_perturb.perturb_paths],
    )


# ------------------------------------------------------------------------------------------
# 3. Two stacked GRU layers


class TwoLayerGRU(brainstate.nn.Module):
    def __init__(self, n_in, n_rec, n_out):
        super().__init__()
        self.rnn1 = nn.GRUCell(n_in, n_rec, key=2)
        self.rnn2 = nn.GRUCell(n_rec, n_rec, key=3)
        self.out = nn.Linear(n_rec, n_out, key=4)

    def update(self, x):
        return self.out(self.rnn2(self.rnn1(x)))


def two_layers(plot_dir=None):
    banner("3. two-layer GRU")
    model = TwoLayerGRU(10, 32, 5)
    brainstate.nn.init_all_states(model)
    algo = etrace_core.D_RTRL(model)
    algo.compile_graph(jnp.zeros(10))
    algo.show_graph()
    graph = algo.graph
    print(f"number of hidden groups: {len(graph.hidden_groups)}")
    print(f"number of relations: {len(graph.hidden_param_op_relations)}")
    for i, r in enumerate(graph.hidden_param_op_relations):
        print(f"  weight {i}: {r.weight_path} -> groups {[g.index for g in r.hidden_groups]}")
    # Each layer has its own group; both of a layer's fused-gate weights (torch's layout: the
    # gates are slices of one product, and the reset gate multiplies the recurrent product)
    # land in that layer's group only. Layer 2's input weight reads layer 1's *new* state.
    if plot_dir:
        print("picture:", algo.plot_graph(os.path.join(plot_dir, "graph_gru.png")))


# ------------------------------------------------------------------------------------------
# 4. A convolution feeding a recurrent layer


class ConvRNN(brainstate.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, kernel_size=3, padding="SAME", key=5)
        self.rnn = nn.ValinaRNNCell(8 * 28 * 28, 64, key=6)
        self.out = nn.Linear(64, 10, key=7)

    def update(self, x):  # x: (1, 28, 28), one grey image
        features = self.conv(x).reshape(-1)
        return self.out(self.rnn(features))


def conv_rnn(plot_dir=None):
    banner("4. conv -> RNN")
    model = ConvRNN()
    brainstate.nn.init_all_states(model)
    algo = etrace_core.D_RTRL(model)
    algo.compile_graph(jnp.zeros((1, 28, 28)))
    algo.show_graph()
    # The kernel goes through the etp_conv primitive, but its output reaches h only through
    # the RNN's dense input product, which mixes positions. An element-wise trace cannot
    # follow that, so the kernel (and its bias) get a dense trace dh/dtheta in the RNN's
    # group (its size and memory are shown; `dense_trace_budget` caps it). The RNN's
    # recurrent weight makes every trace of the group approximate, and show_graph says so.
    if plot_dir:
        print("picture:", algo.plot_graph(os.path.join(plot_dir, "graph_conv.png")))


# ------------------------------------------------------------------------------------------
# 5. The compiler without an algorithm


def direct():
    banner("5. compile_etrace_graph directly")
    model = OneLayerRNN(10, 32, 5)
    brainstate.nn.init_all_states(model)
    graph = etrace_core.compile_etrace_graph(model, jnp.zeros(10))
    print(f"number of hidden groups: {len(graph.hidden_groups)}")
    print(f"number of relations: {len(graph.hidden_param_op_relations)}")
    print(f"has perturbation: {graph.hidden_perturb is not None}")
    print("graph fields:", ", ".join(graph.dict().keys()))

    # The executor under the algorithms gives the per-step quantities directly.
    ex = etrace_core.ETraceVjpGraphExecutor(model)
    ex.compile_graph(jnp.zeros(10))
    out, hidden, others, (xs, dfs), Ds = ex.solve_h2w_h2h_jacobian(jnp.ones(10))
    print(
        "D shapes:",
        [tuple(D.shape) for D in Ds],
        "df shapes:",
        {k: tuple(v.shape) for k, v in dfs.items()},
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plot", metavar="DIR", help="write graph pictures into DIR")
    args = parser.parse_args(argv)
    if args.plot:
        os.makedirs(args.plot, exist_ok=True)
    warnings.simplefilter("default")
    algo = one_layer(args.plot)
    inspect(algo)
    two_layers(args.plot)
    conv_rnn(args.plot)
    direct()


if __name__ == "__main__":
    main()
