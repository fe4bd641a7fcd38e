"""Bring an exported step down to core ATen, re-tracing it only when that changes something.

`torch.export.export` returns the training IR: core ATen ops mixed with composite ones
(`aten.gru_cell`, `aten.t`, `aten.dropout`, ...) and in-place ops. `run_decompositions`
re-traces the whole program to reach core ATen; that re-trace is a seventh of a learner's cold
start (0.2-0.3 s for a `GRUCell`, symbolic batch included) and changes nothing when the graph
is already made of ops it keeps. So:

- the recurrent-cell ops export keeps whole (`gru_cell`, `lstm_cell`, `rnn_tanh_cell`,
  `rnn_relu_cell`) are written out in place as the core-ATen graph their CPU kernels compute
  (two `aten.linear` gate matmuls with their biases, then the gate math in torch's order), and
- the program is re-traced only if some other node is not kept by `decomposition_table()`:
  an op outside core ATen, an in-place op, a higher-order op or a submodule.

Either way the lowering sees only ops the decomposition would have left.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
from torch._guards import detect_fake_mode

__all__ = ["decomposition_table", "decompose", "needs_retrace"]

aten = torch.ops.aten

# kept whole by the decomposition: the lowering routes a parameter in them to an ETP op, and a
# decomposed `detach` becomes `aten.alias` (the gradient stop is lost)
KEPT = (aten.linear.default, aten.convolution.default, aten.detach.default)


def decomposition_table() -> dict:
    """Default core-ATen decompositions, keeping `aten.linear`, `aten.convolution` whole, and
    `aten.detach` (decomposed it becomes `aten.alias`, and the gradient stop is lost)."""
    table = torch.export.default_decompositions()
    for op in KEPT:
        table.pop(op, None)
    table.update(_torch_fixes())
    return table


def _torch_fixes() -> dict:
    """Decompositions a supported torch gets wrong, replaced by corrected ones.

    torch 2.11-2.12 decompose `nn.LSTM(proj_size > 0)` (the only LSTM their decomposition
    writes out layer by layer, oneDNN has no projections) with final states of shape
    (L, 1, B, H): `one_layer_lstm` squeezes axis 1 instead of 0 (fixed in torch 2.13). The
    conversion check would refuse such a model; here the states get their initial shapes back
    (the values are right, only the axis is extra).
    """
    if torch.__version__ >= (2, 13):
        return {}
    from torch._decomp import decompositions as torch_decompositions

    lstm_impl = torch_decompositions.lstm_impl

    def lstm(input, hx, params, *flags):
        out, h, c = lstm_impl(input, hx, params, *flags)
        return out, h.reshape(hx[0].shape), c.reshape(hx[1].shape)

    return {aten.lstm.input: lstm}


def decompose(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """`program` in core ATen (plus the KEPT ops): cells written out, re-traced only if needed."""
    table = decomposition_table()
    if needs_retrace(program.graph, table):
        return program.run_decompositions(table)
    graph = program.graph_module.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _CELLS:
            _write_out_cell(graph, node)
    graph.lint()
    program.graph_module.recompile()
    return program


def needs_retrace(graph: torch.fx.Graph, table: dict) -> bool:
    """Whether `run_decompositions(table)` would change `graph` beyond writing out its cells."""
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op != "call_function":
            return True  # a submodule or constant attribute (higher-order ops carry them)
        target = node.target
        if target is operator.getitem:
            continue
        if target in _CELLS:
            if node.kwargs or any(u.target is not operator.getitem for u in _tuple_users(node)):
                return True  # written out only in the positional, unpacked form export gives
            continue
        if not isinstance(target, torch._ops.OpOverload) or target in table:
            return True
        if target._schema.is_mutable or not (torch.Tag.core in target.tags or target in KEPT):
            return True
    return False


class _Emitter:
    """Adds core-ATen nodes before `at`, each with the fake value torch would record."""

    def __init__(self, graph: torch.fx.Graph, at: torch.fx.Node):
        self.graph, self.at = graph, at
        vals = [_val(a) for a in at.args]
        flat = [v for v in torch.utils._pytree.tree_leaves(vals) if isinstance(v, torch.Tensor)]
        self.fake_mode = detect_fake_mode(flat)

    def __call__(self, op, *args) -> torch.fx.Node:
        with self.graph.inserting_before(self.at):
            node = self.graph.call_function(op, args)
        vals = [_val(a) for a in args]
        if op is operator.getitem:
            node.meta["val"] = vals[0][vals[1]]
        else:
            with self.fake_mode:
                node.meta["val"] = op(*vals)
        for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
            if key in self.at.meta:
                node.meta[key] = self.at.meta[key]
        return node

    def chunks(self, x: torch.fx.Node, n: int) -> list[torch.fx.Node]:
        size = _val(x).shape[1] // n
        parts = self(aten.split_with_sizes.default, x, [size] * n, 1)
        return [self(operator.getitem, parts, i) for i in range(n)]


def _tuple_users(node: torch.fx.Node) -> list[torch.fx.Node]:
    return list(node.users) if isinstance(node.meta.get("val"), (tuple, list)) else []


def _val(arg):
    if isinstance(arg, torch.fx.Node):
        return arg.meta["val"]
    if isinstance(arg, (list, tuple)):
        return type(arg)(_val(a) for a in arg)
    return arg


def _gru(emit: _Emitter, x, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    # at::gru_cell on CPU (aten/src/ATen/native/RNN.cpp, GRUCell)
    i_r, i_z, i_n = emit.chunks(emit(aten.linear.default, x, w_ih, b_ih), 3)
    h_r, h_z, h_n = emit.chunks(emit(aten.linear.default, hx, w_hh, b_hh), 3)
    r = emit(aten.sigmoid.default, emit(aten.add.Tensor, h_r, i_r))
    z = emit(aten.sigmoid.default, emit(aten.add.Tensor, h_z, i_z))
    n = emit(aten.tanh.default, emit(aten.add.Tensor, i_n, emit(aten.mul.Tensor, h_n, r)))
    diff = emit(aten.sub.Tensor, hx, n)
    return emit(aten.add.Tensor, emit(aten.mul.Tensor, diff, z), n)


def _lstm(emit: _Emitter, x, hidden, w_ih, w_hh, b_ih=None, b_hh=None):
    # at::lstm_cell on CPU (LSTMCell): returns (hy, cy)
    hx, cx = hidden
    gates = emit(
        aten.add.Tensor,
        emit(aten.linear.default, hx, w_hh, b_hh),
        emit(aten.linear.default, x, w_ih, b_ih),
    )
    i, f, g, o = emit.chunks(gates, 4)
    i, f, o = (emit(aten.sigmoid.default, v) for v in (i, f, o))
    g = emit(aten.tanh.default, g)
    cy = emit(aten.add.Tensor, emit(aten.mul.Tensor, f, cx), emit(aten.mul.Tensor, i, g))
    hy = emit(aten.mul.Tensor, o, emit(aten.tanh.default, cy))
    return hy, cy


def _simple(activation):
    def cell(emit: _Emitter, x, hx, w_ih, w_hh, b_ih=None, b_hh=None):
        # at::rnn_tanh_cell / rnn_relu_cell (SimpleCell): act(linear_hh(hx) + linear_ih(x))
        pre = emit(
            aten.add.Tensor,
            emit(aten.linear.default, hx, w_hh, b_hh),
            emit(aten.linear.default, x, w_ih, b_ih),
        )
        return emit(activation, pre)

    return cell


_CELLS: dict[object, Callable] = {
    aten.gru_cell.default: _gru,
    aten.lstm_cell.default: _lstm,
    aten.rnn_tanh_cell.default: _simple(aten.tanh.default),
    aten.rnn_relu_cell.default: _simple(aten.relu.default),
}


def _write_out_cell(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
    """Replace one cell node by its core-ATen graph (a tuple result replaces its getitems)."""
    out = _CELLS[node.target](_Emitter(graph, node), *node.args)
    if isinstance(out, tuple):
        for user in list(node.users):  # getitems only (`needs_retrace`)
            user.replace_all_uses_with(out[user.args[1]])
            graph.erase_node(user)
    else:
        node.replace_all_uses_with(out)
    graph.erase_node(node)
