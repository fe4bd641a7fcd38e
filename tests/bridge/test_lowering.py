"""lower(): ATen -> JAX parity per op family, ETP routing of parameter weights, and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.utils._pytree as pytree
from torch import nn

from etrace_bridge.errors import UnsupportedOpError
from etrace_bridge.export import export_step
from etrace_bridge.lowering import OP_TABLE, lower
from tests.bridge.bridge_cases import F32_TOL, F64_TOL, assert_close, jx

B = 3


def run_lowered(model, args, custom_ops=None, dynamic_batch=True, call_args=None):
    """Export + lower `model`, run on `call_args` (default `args`); return (jax, torch) outputs."""
    step = export_step(model, args, dynamic_batch=dynamic_batch)
    fn = lower(step, custom_ops)
    params = {k: jx(v) for k, v in model.named_parameters()}
    buffers = {k: jx(v) for k, v in model.named_buffers()}
    call_args = args if call_args is None else call_args
    out, _ = fn(params, buffers, *jx(call_args))
    with torch.no_grad():
        return out, model(*call_args)


def primitives(model, args):
    step = export_step(model, args)
    fn = lower(step)
    params = {k: jx(v) for k, v in model.named_parameters()}
    buffers = {k: jx(v) for k, v in model.named_buffers()}
    jaxpr = jax.make_jaxpr(lambda p, *a: fn(p, buffers, *a))(params, *jx(args))
    return [e.primitive.name for e in jaxpr.jaxpr.eqns]


ACTIVATIONS = [
    nn.ReLU(),
    nn.GELU(),
    nn.GELU("tanh"),
    nn.SiLU(),
    nn.Softplus(),
    nn.Softplus(beta=2.0, threshold=5.0),
    nn.ELU(),
    nn.ELU(alpha=0.5),
    nn.SELU(),
    nn.LeakyReLU(0.1),
    nn.Hardtanh(),
    nn.Hardtanh(-0.5, 2.0),
    nn.Sigmoid(),
    nn.Tanh(),
    nn.Softmax(-1),
    nn.LogSoftmax(-1),
    nn.Hardswish(),
    nn.Hardsigmoid(),
    nn.Mish(),
    nn.Softsign(),
]


@pytest.mark.parametrize("act", ACTIVATIONS, ids=repr)
def test_activations_match_torch(act):
    x = 4 * torch.randn(B, 7)
    out, ref = run_lowered(act, (x,))
    assert_close(out, ref, F32_TOL, repr(act))


@pytest.mark.parametrize("act", [nn.GELU(), nn.ELU(), nn.Softplus(), nn.LeakyReLU(0.2)], ids=repr)
def test_activations_match_torch_float64(x64, act):
    x = 4 * torch.randn(B, 7, dtype=torch.float64)
    out, ref = run_lowered(act, (x,))
    assert_close(out, ref, F64_TOL, repr(act))


@pytest.mark.parametrize(
    "model, shape",
    [
        (nn.Linear(6, 4), (B, 6)),
        (nn.Linear(6, 4, bias=False), (B, 2, 6)),
        (nn.LayerNorm(6), (B, 6)),
        (nn.LayerNorm((2, 6), elementwise_affine=False), (B, 2, 6)),
        (nn.Sequential(nn.Linear(6, 6), nn.Dropout(0.5)).eval(), (B, 6)),
        (nn.BatchNorm1d(6).eval(), (B, 6)),
        (nn.Conv1d(4, 6, 3), (B, 4, 9)),
        (nn.Conv1d(4, 6, 3, stride=2, padding=1, bias=False), (B, 4, 9)),
        (nn.Conv1d(4, 6, 4, padding="same", dilation=2, groups=2), (B, 4, 9)),
        (nn.Conv1d(4, 6, 3), (4, 9)),
        (nn.Conv2d(4, 6, 3), (B, 4, 7, 7)),
        (nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 2), groups=2), (B, 4, 7, 7)),
        (nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4), (B, 4, 7, 7)),
        (nn.Conv3d(2, 3, 2), (B, 2, 4, 4, 4)),
        (nn.MaxPool2d(2), (B, 2, 6, 6)),
        (nn.AvgPool2d(2, stride=1, padding=1), (B, 2, 6, 6)),
        (nn.AdaptiveAvgPool1d(1), (B, 2, 6)),
        (nn.Flatten(), (B, 2, 6)),
    ],
    ids=lambda v: repr(v).replace("\n", "") if isinstance(v, nn.Module) else str(v),
)
def test_layers_match_torch(model, shape):
    x = torch.randn(*shape)
    out, ref = run_lowered(model, (x,))
    assert_close(out, ref, F32_TOL)


@pytest.mark.parametrize(
    "model, shape",
    [
        (nn.Linear(6, 4), (B, 6)),
        (nn.LayerNorm(6), (B, 6)),
        (nn.Conv1d(4, 6, 3, stride=2, padding=1), (B, 4, 9)),
        (nn.Conv2d(4, 6, 3, groups=2, padding=1), (B, 4, 6, 6)),
    ],
)
def test_layers_match_torch_float64(x64, model, shape):
    model = model.double()
    out, ref = run_lowered(model, (torch.randn(*shape, dtype=torch.float64),))
    assert_close(out, ref, F64_TOL)


def test_embedding_is_plain_gather():
    emb = nn.Embedding(10, 4)
    idx = torch.tensor([[1, 2], [3, 9]])
    out, ref = run_lowered(emb, (idx,))
    assert_close(out, ref, F32_TOL)
    assert "etp_matmul" not in primitives(emb, (idx,))


class TensorOps(nn.Module):
    """Exercises the shape, reduction, comparison and creation ops of the table."""

    def forward(self, x):
        a = x.mean(1, keepdim=True) + x.var(1, keepdim=True) + x.std(1, keepdim=True)
        a = a + x.amax(1, keepdim=True) + x.amin(-1, keepdim=True) + x.sum() + x.max()
        b = torch.clamp(x, -1, 1) + torch.where(x > 0, x, 0.0) + x.abs().sqrt()
        b = b + torch.rsqrt(x.abs() + 1) + 1 / (x.abs() + 0.5) + x**2 + x.pow(3)
        b = b + torch.exp(x) + torch.log(x.abs() + 1) - x.neg() + 2 - x + torch.reciprocal(x + 9)
        c = torch.cat([x, x], 1)[:, :4] + torch.stack([x, x]).sum(0) + x.chunk(2, 1)[0].repeat(1, 2)
        c = c + x.unbind(0)[0] + x[1] + x[:, 1:2] + x.split([1, 3], 1)[1].sum(1, keepdim=True)
        d = x.t().t() + x.transpose(0, 1).transpose(0, 1) + x.reshape(-1).view(B, 4)
        d = d + x.unsqueeze(0).squeeze(0) + x.expand(2, B, 4)[0] + x.permute(1, 0).T
        e = torch.zeros_like(x) + torch.ones(B, 4) + torch.full((B, 4), 2.0) + x.new_zeros(B, 4)
        e = e + x.clone().detach() + x.index_select(1, torch.tensor([0, 2])).sum(1, keepdim=True)
        f = (x > 0).float() * (x < 1).to(x.dtype) + (x >= 0) * 1.0 + (x != 0).float()
        f = f + (x == 0).float() + (x <= 0).float() + x.flip(1) + x.argmax(1, keepdim=True)
        g = torch.maximum(x, x * 2) + torch.minimum(x, -x) + x.softmax(-1) + x.sigmoid() * x.tanh()
        g = g + nn.functional.pad(x, (1, 1))[:, 1:-1] + x.masked_fill(x > 1, 0.5)
        g = g + torch.arange(4, dtype=x.dtype) + x.prod(-1, keepdim=True) + torch.erf(x)
        h = (x // 0.7) + torch.remainder(x, 0.7) + x.div(0.3, rounding_mode="trunc")
        h = h + x.gather(1, torch.tensor([[0, 1, 2, 3]] * B)) + x[:, torch.tensor([3, 0, 1, 2])]
        return a + b + c + d + e + f + g + h


def test_tensor_ops_match_torch():
    x = torch.randn(B, 4)
    out, ref = run_lowered(TensorOps(), (x,), dynamic_batch=False)
    assert_close(out, ref, F32_TOL)


def test_tensor_ops_match_torch_float64(x64):
    x = torch.randn(B, 4, dtype=torch.float64)
    out, ref = run_lowered(TensorOps(), (x,), dynamic_batch=False)
    assert_close(out, ref, F64_TOL)


class InPlaceWrites(nn.Module):
    def forward(self, x):
        y = x.clone()
        y[:, 0] = 0.0
        y[1] = 2.0
        y[:, 1:3] = x[:, :2] * 3
        y[torch.tensor([0, 2])] += 1.0
        return y, torch.chunk(x, 3, dim=1)[1]


def test_in_place_writes_are_functionalised_and_lowered():
    x = torch.randn(B, 4)
    out, ref = run_lowered(InPlaceWrites(), (x,), dynamic_batch=False)
    assert_close(out, ref, F32_TOL)


class SymbolicShapes(nn.Module):
    def forward(self, x):
        y = x.view(x.shape[0], 2, 2).sum(-1) + torch.zeros(x.shape[0], 2)
        return y.reshape(-1, 1).view(x.size(0), -1)


def test_symbolic_batch_resolved_from_input_shapes():
    model = SymbolicShapes()
    step = export_step(model, (torch.randn(B, 4),))
    assert step.dynamic_batch
    assert "aten.sym_size.int" in step.aten_targets()
    fn = lower(step)
    for batch in (1, 5):
        x = torch.randn(batch, 4)
        out, _ = fn({}, {}, jx(x))
        assert_close(out, model(x), F32_TOL)


def test_dtypes_follow_torch_promotion():
    class Mixed(nn.Module):
        def forward(self, x, n):
            return (x > 0), n * 2, n / 2, (x > 0).sum(-1), x.to(torch.float16)

    x, n = torch.randn(B, 4), torch.arange(B, dtype=torch.int32)
    out, ref = run_lowered(Mixed(), (x, n))
    for o, r in zip(out, ref):  # int64 is int32 while JAX x64 is off
        assert np.asarray(o).dtype == jax.dtypes.canonicalize_dtype(r.numpy().dtype)
        np.testing.assert_allclose(np.asarray(o).astype(float), r.numpy().astype(float), atol=1e-3)


# ----------------------------------------------------------------------------- ETP routing


def test_parameter_linear_and_conv_use_etp_primitives():
    assert primitives(nn.Linear(4, 3), (torch.randn(B, 4),)).count("etp_matmul") == 1
    assert (
        primitives(nn.GRUCell(4, 3), (torch.randn(B, 4), torch.randn(B, 3))).count("etp_matmul")
        == 2
    )
    assert primitives(nn.Conv1d(2, 3, 3), (torch.randn(B, 2, 8),)).count("etp_conv") == 1
    assert primitives(nn.Conv2d(2, 3, 3), (torch.randn(B, 2, 5, 5),)).count("etp_conv") == 1


def test_mm_with_parameter_right_operand_uses_etp_matmul():
    class RawWeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3))

        def forward(self, x):
            return x @ self.w

    model = RawWeight()
    assert primitives(model, (torch.randn(B, 4),)).count("etp_matmul") == 1
    out, ref = run_lowered(model, (torch.randn(B, 4),))
    assert_close(out, ref, F32_TOL)


def test_computed_weight_uses_plain_matmul():
    class ScaledWeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return nn.functional.linear(x, 2.0 * self.lin.weight, self.lin.bias)

    model = ScaledWeight()
    assert "etp_matmul" not in primitives(model, (torch.randn(B, 4),))
    out, ref = run_lowered(model, (torch.randn(B, 4),))
    assert_close(out, ref, F32_TOL)


# ----------------------------------------------------------------------------- errors and options


class _CumSum(nn.Module):
    def forward(self, x):
        return torch.cumsum(x, 1)


class _FFT(nn.Module):
    def forward(self, x):
        return torch.fft.fft(x).real


@pytest.mark.parametrize(
    "model, op, code",
    [
        (_CumSum(), "aten.cumsum.default", "torch.cumsum(x, 1)"),
        (_FFT(), "aten._fft_r2c.default", "torch.fft.fft(x)"),
    ],
)
def test_unsupported_op_names_op_and_source_line(model, op, code):
    step = export_step(model, (torch.randn(B, 4),))
    with pytest.raises(UnsupportedOpError) as info:
        lower(step)
    msg = str(info.value)
    assert op in msg and code in msg
    assert "test_lowering.py:" in msg and "in forward" in msg
    assert "custom_ops=" in msg and "open an issue" in msg


def test_custom_ops_can_supply_a_missing_aten_op():
    model = _CumSum()
    x = torch.randn(B, 4)
    out, ref = run_lowered(
        model, (x,), custom_ops={"aten::cumsum": lambda x, dim, dtype=None: jnp.cumsum(x, axis=dim)}
    )
    assert_close(out, ref, F32_TOL)


def test_transposed_convolution_refused():
    step = export_step(nn.ConvTranspose1d(2, 3, 3), (torch.randn(B, 2, 6),))
    with pytest.raises(UnsupportedOpError, match="transposed convolution"):
        lower(step)


def test_float64_graph_with_x64_off_raises_type_error():
    model = nn.Linear(4, 3).double()
    step = export_step(model, (torch.randn(B, 4, dtype=torch.float64),))
    fn = lower(step)
    assert not jax.config.read("jax_enable_x64")
    with pytest.raises(TypeError, match="jax_enable_x64"):
        fn({"weight": jnp.zeros((3, 4)), "bias": jnp.zeros(3)}, {}, jnp.zeros((B, 4)))


def test_op_table_is_read_only():
    with pytest.raises(TypeError):
        OP_TABLE[torch.ops.aten.cumsum.default] = jnp.cumsum


def test_outputs_keep_forward_structure():
    lstm = nn.LSTMCell(4, 5)
    args = (torch.randn(B, 4), (torch.randn(B, 5), torch.randn(B, 5)))
    out, ref = run_lowered(lstm, args)
    assert isinstance(out, tuple) and len(out) == 2
    assert_close(out, ref, F32_TOL)
    assert pytree.tree_structure(out) == pytree.tree_structure(ref)
