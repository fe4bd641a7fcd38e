"""decompose: recurrent cells written out in place, the re-trace skipped only when it would
change nothing, and the result identical to torch's own decomposition and to the cell."""

import operator

import pytest
import torch
from torch import nn

from etrace_bridge.decompose import KEPT, decompose, decomposition_table, needs_retrace
from etrace_bridge.export import export_step

B = 3
aten = torch.ops.aten


def _cells():
    return {
        "GRUCell": (nn.GRUCell(4, 5), False),
        "GRUCell(bias=False)": (nn.GRUCell(4, 5, bias=False), False),
        "LSTMCell": (nn.LSTMCell(4, 5), True),
        "LSTMCell(bias=False)": (nn.LSTMCell(4, 5, bias=False), True),
        "RNNCell(tanh)": (nn.RNNCell(4, 5), False),
        "RNNCell(relu)": (nn.RNNCell(4, 5, nonlinearity="relu"), False),
    }


class Stack(nn.Module):
    """Two cells and a readout, the state of each passed separately (a common user model)."""

    def __init__(self):
        super().__init__()
        self.gru = nn.GRUCell(4, 6)
        self.lstm = nn.LSTMCell(6, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x, h, hc):
        h = self.gru(x, h)
        hy, cy = self.lstm(h, hc)
        return self.out(hy), h, (hy, cy)


def _args(name, dtype):
    torch.manual_seed(0)
    x = torch.randn(B, 4, dtype=dtype)
    h = torch.randn(B, 5, dtype=dtype)
    if name == "Stack":
        return x, torch.randn(B, 6, dtype=dtype), (h, torch.randn(B, 5, dtype=dtype))
    return (x, (h, torch.randn(B, 5, dtype=dtype))) if name.startswith("LSTM") else (x, h)


def _export(model, args):
    batch = torch.export.Dim("batch")
    dyn = torch.utils._pytree.tree_map(lambda _: {0: batch}, args)
    return torch.export.export(model, args, dynamic_shapes=dyn)


MODELS = [*_cells(), "Stack"]


def _model(name):
    return Stack() if name == "Stack" else _cells()[name][0]


@pytest.mark.parametrize("name", MODELS)
def test_cells_written_out_match_the_cell_and_torchs_decomposition(name):
    model = _model(name).double()
    args = _args(name, torch.float64)
    program = _export(model, args)
    assert not needs_retrace(program.graph, decomposition_table())
    fast = decompose(_export(model, args))
    slow = _export(model, args).run_decompositions(decomposition_table())
    ops = {n.target for n in fast.graph.nodes if n.op == "call_function"}
    assert all(op is operator.getitem or torch.Tag.core in op.tags or op in KEPT for op in ops)
    for other in (B, 7):  # the batch stays symbolic
        more = _args(name, torch.float64) if other == B else _grow(args, other)
        want = model(*more)
        got_fast, got_slow = fast.module()(*more), slow.module()(*more)
        for w, f, s in zip(_leaves(want), _leaves(got_fast), _leaves(got_slow)):
            assert w.shape[0] == other
            torch.testing.assert_close(f, w, rtol=0, atol=1e-15)
            torch.testing.assert_close(f, s, rtol=0, atol=1e-15)


def _grow(args, batch):
    g = torch.Generator().manual_seed(batch)
    return torch.utils._pytree.tree_map(
        lambda t: torch.randn((batch, *t.shape[1:]), dtype=t.dtype, generator=g), args
    )


def _leaves(x):
    return torch.utils._pytree.tree_leaves(x)


@pytest.mark.parametrize("name", MODELS)
def test_export_step_skips_the_retrace_for_cells(name, monkeypatch):
    def refuse(*_, **__):
        raise AssertionError("run_decompositions called for a graph of cells and core ops")

    monkeypatch.setattr(torch.export.ExportedProgram, "run_decompositions", refuse)
    step = export_step(_model(name), _args(name, torch.float32))
    assert step.dynamic_batch
    assert not any("cell" in t for t in step.aten_targets())


class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 5)

    def forward(self, x, h):
        h = h * 0.9
        h.add_(self.fc(x))
        return h


class Transposed(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, 4))

    def forward(self, x, h):
        return torch.tanh(x @ self.w.T + h)


class Dropped(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = nn.GRUCell(4, 5)
        self.drop = nn.Dropout(0.2)

    def forward(self, x, h):
        return self.cell(self.drop(x), h)


@pytest.mark.parametrize(
    "model, why",
    [
        (InPlace(), "in-place add_"),
        (Transposed(), "aten.t / aten.matmul are composite"),
        (Dropped().eval(), "aten.dropout is composite"),
    ],
)
def test_graphs_torch_would_change_are_retraced_and_still_convert(model, why):
    args = (torch.randn(B, 4), torch.randn(B, 5))
    program = _export(model, args)
    assert needs_retrace(program.graph, decomposition_table()), why
    calls = []
    original = torch.export.ExportedProgram.run_decompositions

    def counted(self, *a, **k):
        calls.append(1)
        return original(self, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.export.ExportedProgram, "run_decompositions", counted)
        step = export_step(model, args)
    assert calls == [1]
    got = step.program.module()(*(a.clone() for a in args))
    torch.testing.assert_close(got, model(*(a.clone() for a in args)))


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("batch", [1, B])
def test_lstm_with_projections_keeps_its_state_shapes(num_layers, batch):
    # torch 2.11-2.12 decompose it with final states of shape (L, 1, B, H); see _torch_fixes
    torch.manual_seed(1)
    lstm = nn.LSTM(4, 5, num_layers=num_layers, proj_size=2).double()
    x = torch.randn(2, batch, 4, dtype=torch.float64)
    hc = (
        torch.randn(num_layers, batch, 2, dtype=torch.float64),
        torch.randn(num_layers, batch, 5, dtype=torch.float64),
    )
    program = torch.export.export(lstm, (x, hc)).run_decompositions(decomposition_table())
    want = lstm(x, hc)
    got = program.module()(x, hc)
    for w, g in zip(_leaves(want), _leaves(got)):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=0, atol=1e-14)
