"""export_step: one-step export, signature split, dynamic batch, and refusals."""

import pytest
import torch
from torch import nn

from etrace_bridge.decompose import decomposition_table
from etrace_bridge.errors import ExportError, UnsupportedModelError
from etrace_bridge.export import ExportedStep, export_step, user_frame
from etrace_bridge.lowering import OP_TABLE, lower
from tests.bridge.bridge_cases import LIFNetwork

B = 3


def test_decomposition_table_keeps_linear_and_convolution():
    table = decomposition_table()
    assert torch.ops.aten.linear.default not in table
    assert torch.ops.aten.convolution.default not in table
    assert len(table) > 100


def test_grucell_signature_split():
    cell = nn.GRUCell(4, 5)
    step = export_step(cell, (torch.randn(B, 4), torch.randn(B, 5)))
    assert isinstance(step, ExportedStep)
    assert len(step.user_inputs) == 2
    assert sorted(step.parameters.values()) == sorted(n for n, _ in cell.named_parameters())
    assert step.buffers == {} and step.buffers_to_mutate == {}
    assert step.user_outputs == (0,)
    assert step.dynamic_batch and step.batch_size == B
    targets = step.aten_targets()
    assert "aten.linear.default" in targets
    linear_weights = {
        n.args[1].name for n in step.graph.nodes if n.target is torch.ops.aten.linear.default
    }
    assert {step.parameters[w] for w in linear_weights} == {"weight_ih", "weight_hh"}


def test_buffer_state_is_lifted_and_reported_as_mutation():
    model = LIFNetwork(batch=B)
    before = {k: v.clone() for k, v in model.named_buffers()}
    step = export_step(model, (torch.randn(B, 4),))
    assert step.mutated_buffers == ("lif.v",)
    assert list(step.buffers_to_mutate.values()) == ["lif.v"]
    assert "lif.tau" in step.buffers.values()
    assert sorted(step.parameters.values()) == sorted(n for n, _ in model.named_parameters())
    assert step.dynamic_batch
    for name, buf in model.named_buffers():  # exporting left the user's buffers alone
        assert torch.equal(buf, before[name]) and not buf.requires_grad


def test_rnn_with_batch_axes_is_dynamic():
    lstm = nn.LSTM(4, 5, num_layers=2)
    args = (torch.randn(1, B, 4), (torch.zeros(2, B, 5), torch.zeros(2, B, 5)))
    step = export_step(lstm, args, batch_axes=(1, (1, 1)))
    assert step.dynamic_batch and step.batch_size == B
    assert len(step.user_inputs) == 3 and len(step.user_outputs) == 3


def test_batch_one_example_stays_dynamic():
    step = export_step(nn.GRUCell(4, 5), (torch.randn(1, 4), torch.randn(1, 5)))
    assert step.dynamic_batch and step.batch_size == 1


class _FixedBatch(nn.Module):
    """Adds a (3, H) constant buffer: torch must specialise the batch to 3."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 5)
        self.register_buffer("offset", torch.randn(B, 5))

    def forward(self, x):
        return self.lin(x) + self.offset


def test_static_fallback_is_recorded():
    step = export_step(_FixedBatch(), (torch.randn(B, 4),))
    assert not step.dynamic_batch and step.batch_size == B


def test_dynamic_batch_false_exports_static():
    step = export_step(nn.Linear(4, 5), (torch.randn(B, 4),), dynamic_batch=False)
    assert not step.dynamic_batch


@pytest.mark.parametrize(
    "factory, args",
    [
        (
            lambda: nn.RNNCell(4, 5, nonlinearity="relu", bias=False),
            (torch.randn(B, 4), torch.randn(B, 5)),
        ),
        (lambda: nn.GRUCell(4, 5), (torch.randn(B, 4), torch.randn(B, 5))),
        (lambda: nn.LSTMCell(4, 5), (torch.randn(B, 4), (torch.randn(B, 5), torch.randn(B, 5)))),
        (lambda: nn.RNN(4, 5, 2, batch_first=True), (torch.randn(B, 1, 4), torch.randn(2, B, 5))),
        (lambda: nn.GRU(4, 5, 2, bias=False), (torch.randn(1, B, 4), torch.randn(2, B, 5))),
        (
            lambda: nn.LSTM(4, 5, 2),
            (torch.randn(1, B, 4), (torch.randn(2, B, 5), torch.randn(2, B, 5))),
        ),
    ],
)
def test_recurrent_targets_are_all_lowered(factory, args):
    step = export_step(factory(), args)
    for target in {n.target for n in step.graph.nodes if n.op == "call_function"}:
        assert target in OP_TABLE, f"{target} has no lowering"
    lower(step)


# ----------------------------------------------------------------------------- refusals


class _HardSpike(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _AutogradFunctionModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return _HardSpike.apply(self.lin(x))


def _spike_helper(x):
    return _HardSpike.apply(x)


class _AutogradFunctionViaHelper(_AutogradFunctionModel):
    def forward(self, x):
        return _spike_helper(self.lin(x))


@pytest.mark.parametrize("cls", [_AutogradFunctionModel, _AutogradFunctionViaHelper])
def test_autograd_function_kept_as_one_node_with_its_backward(cls):
    step = export_step(cls(), (torch.randn(B, 4),))
    nodes = [n for n in step.graph.nodes if n.name in step.functions]
    assert len(nodes) == 1 and "_HardSpike" in str(nodes[0].target)
    captured = step.functions[nodes[0].name]
    assert captured.call.cls is _HardSpike and captured.grad_pos == (0,)
    assert step.dynamic_batch and captured.forward.dynamic_batch


class _PlainAttributeState(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.mem = torch.zeros(B, 4)

    def forward(self, x):
        self.mem = 0.9 * self.mem + self.lin(x)
        return self.mem


class _PlainAttributeInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.trace = torch.zeros(B, 4)

    def forward(self, x):
        self.trace.mul_(0.9).add_(self.lin(x))
        return self.trace


@pytest.mark.parametrize(
    "model, name",
    [
        (_PlainAttributeState(), "mem"),
        (nn.Sequential(_PlainAttributeInPlace()), "0.trace"),
    ],
)
def test_plain_tensor_attribute_state_is_lifted(model, name):
    before = {k: v for k, v in vars(model).items()}
    step = export_step(model, (torch.randn(B, 4),))
    assert step.mutated_buffers == (name,) and name in step.state_values
    assert {k: v for k, v in vars(model).items()} == before  # the user's objects are back


def test_read_only_tensor_attribute_is_a_constant():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.mask = torch.tensor([1.0, 0.0, 1.0, 0.0])

        def forward(self, x):
            return self.lin(x) * self.mask

    step = export_step(Masked(), (torch.randn(B, 4),))
    assert len(step.constants) == 1


def test_dropout_module_in_train_mode_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.3))
    with pytest.raises(UnsupportedModelError) as info:
        export_step(model, (torch.randn(B, 4),))
    assert "Dropout" in str(info.value) and ".eval()" in str(info.value)
    export_step(model.eval(), (torch.randn(B, 4),))


def test_rnn_dropout_in_train_mode_refused():
    with pytest.raises(UnsupportedModelError) as info:
        export_step(
            nn.GRU(4, 5, num_layers=2, dropout=0.2), (torch.randn(1, B, 4), torch.zeros(2, B, 5))
        )
    assert "dropout=0.2" in str(info.value) and "GRU" in str(info.value)


def test_functional_dropout_in_train_mode_refused():
    class FunctionalDropout(nn.Module):
        def forward(self, x):
            return nn.functional.dropout(x, 0.2, training=True)

    with pytest.raises(UnsupportedModelError) as info:
        export_step(FunctionalDropout(), (torch.randn(B, 4),))
    assert "dropout" in str(info.value) and "test_export.py" in str(info.value)


@pytest.mark.parametrize("cls", [nn.RNN, nn.GRU, nn.LSTM])
def test_bidirectional_refused(cls):
    with pytest.raises(UnsupportedModelError) as info:
        export_step(cls(4, 5, bidirectional=True), (torch.randn(1, B, 4),))
    assert "bidirectional" in str(info.value) and cls.__name__ in str(info.value)


def test_data_dependent_control_flow_is_export_error():
    class Branchy(nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x
            return -x

    with pytest.raises(ExportError) as info:
        export_step(Branchy(), (torch.randn(B, 4),))
    msg = str(info.value)
    assert "data-dependent" in msg and "torch.where" in msg
    assert "GuardOnDataDependentSymNode" in msg and "test_export.py" in msg


def test_forward_failing_eagerly_is_export_error():
    with pytest.raises(ExportError, match="example inputs"):
        export_step(nn.Linear(4, 5), (torch.randn(B, 7),))


def test_user_frame_skips_torch_frames():
    trace = (
        'File "/home/u/model.py", line 12, in forward\n    h = self.cell(x, h)\n'
        f'  File "{torch.__file__[:-12]}/nn/modules/rnn.py", line 1, in forward\n    x'
    )
    assert user_frame(trace) == "/home/u/model.py:12 in forward: h = self.cell(x, h)"
    assert user_frame(None) is None


def test_fused_cell_biases_fold_into_their_gate_matmuls():
    """CUDA exports GRUCell/LSTMCell as bias-less `linear` + `_thnn_fused_*_cell(..., b_ih,
    b_hh)`; the fold gives them CPU's `linear(x, W, b)` so both devices learn alike (ES-D-RTRL
    traces a bias inside a matmul differently from a separate one). Runs without a GPU."""
    from etrace_bridge.export import _fold_fused_cell_biases

    aten = torch.ops.aten
    for cell in (aten._thnn_fused_gru_cell.default, aten._thnn_fused_lstm_cell.default):
        g = torch.fx.Graph()
        x, h, w_ih, w_hh, b_ih, b_hh = (
            g.placeholder(n) for n in ("x", "h", "w_ih", "w_hh", "b_ih", "b_hh")
        )
        # the graph CUDA export gives (`mm(x, W.T)`), and a bias-less linear
        ig = g.call_function(
            aten.mm.default, (x, g.call_function(aten.permute.default, (w_ih, [1, 0])))
        )
        hg = g.call_function(aten.linear.default, (h, w_hh))
        out = g.call_function(cell, (ig, hg, h, b_ih, b_hh))
        g.output(out)
        _fold_fused_cell_biases(g)
        assert ig.target == hg.target == aten.linear.default
        assert ig.args == (x, w_ih, b_ih) and hg.args == (h, w_hh, b_hh)
        assert out.args == (ig, hg, h, None, None)
