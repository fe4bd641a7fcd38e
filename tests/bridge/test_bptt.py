"""BPTT reference gradients and the gradient comparison report."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

from etrace_bridge.bptt import GradientReport, GradientRow, bptt_gradients, compare_gradients
from etrace_bridge.losses import resolve_loss

T, B = 4, 2


def _grads_snapshot(module):
    return {n: None if p.grad is None else p.grad.clone() for n, p in module.named_parameters()}


def _assert_grads_untouched(module, before):
    for n, p in module.named_parameters():
        if before[n] is None:
            assert p.grad is None, n
        else:
            assert torch.equal(p.grad, before[n]), n


def _manual_rnncell_loss(cell, xs, ys):
    h = torch.zeros(xs.shape[1], cell.hidden_size, dtype=xs.dtype)
    total = 0.0
    for t in range(xs.shape[0]):
        h = cell(xs[t], h)
        total = total + ((h - ys[t]) ** 2).mean()
    return total


def test_matches_manual_unroll_and_finite_differences():
    torch.manual_seed(0)
    cell = nn.RNNCell(3, 5).double()
    xs = torch.randn(T, B, 3, dtype=torch.float64)
    ys = torch.randn(T, B, 5, dtype=torch.float64)
    res = bptt_gradients(cell, xs, ys, "mse")
    assert res.outputs.shape == (T, B, 5)
    with torch.no_grad():
        assert res.loss == pytest.approx(float(_manual_rnncell_loss(cell, xs, ys)), rel=1e-12)

    rng = np.random.default_rng(0)
    names = [n for n, _ in cell.named_parameters()]
    params = dict(cell.named_parameters())
    eps = 1e-6
    for _ in range(3):
        name = names[rng.integers(len(names))]
        p = params[name]
        idx = tuple(int(rng.integers(s)) for s in p.shape)
        with torch.no_grad():
            orig = p[idx].item()
            p[idx] = orig + eps
            up = float(_manual_rnncell_loss(cell, xs, ys))
            p[idx] = orig - eps
            down = float(_manual_rnncell_loss(cell, xs, ys))
            p[idx] = orig
        fd = (up - down) / (2 * eps)
        assert res.grads[name][idx].item() == pytest.approx(fd, rel=1e-6, abs=1e-9)


def test_p_grad_untouched():
    torch.manual_seed(1)
    cell = nn.GRUCell(3, 4)
    cell.weight_ih.grad = torch.full_like(cell.weight_ih, 3.0)
    before = _grads_snapshot(cell)
    res = bptt_gradients(cell, torch.randn(T, B, 3), torch.randn(T, B, 4), "mse")
    _assert_grads_untouched(cell, before)
    assert set(res.grads) == {n for n, _ in cell.named_parameters()}
    assert all(g.abs().sum() > 0 for g in res.grads.values())


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.RNNCell(3, 4),
        lambda: nn.GRUCell(3, 4),
        lambda: nn.LSTMCell(3, 4),
    ],
)
def test_convention_a_cells(make):
    torch.manual_seed(0)
    cell = make()
    xs, ys = torch.randn(T, B, 3), torch.randn(T, B, 4)
    before = _grads_snapshot(cell)
    res = bptt_gradients(cell, xs, ys, "mse")
    _assert_grads_untouched(cell, before)
    assert res.outputs.shape == (T, B, 4)
    # an explicit initial state changes the result
    if isinstance(cell, nn.LSTMCell):
        state = (torch.ones(B, 4), torch.ones(B, 4))
    else:
        state = torch.ones(B, 4)
    other = bptt_gradients(cell, xs, ys, "mse", state=state)
    assert other.loss != pytest.approx(res.loss)


@pytest.mark.parametrize("cls", [nn.RNN, nn.GRU, nn.LSTM])
@pytest.mark.parametrize("batch_first", [False, True])
def test_convention_b_full_rnns_match_sequence_call(cls, batch_first):
    torch.manual_seed(0)
    rnn = cls(3, 4, num_layers=2, batch_first=batch_first).double()
    xs, ys = torch.randn(T, B, 3, dtype=torch.float64), torch.randn(T, B, 4, dtype=torch.float64)
    before = _grads_snapshot(rnn)
    res = bptt_gradients(rnn, xs, ys, "mse")
    _assert_grads_untouched(rnn, before)
    seq = xs.transpose(0, 1) if batch_first else xs
    out, _ = rnn(seq)
    out = out.transpose(0, 1) if batch_first else out
    total = sum(((out[t] - ys[t]) ** 2).mean() for t in range(T))
    grads = torch.autograd.grad(total, list(rnn.parameters()))
    for (name, _), g in zip(rnn.named_parameters(), grads):
        torch.testing.assert_close(res.grads[name], g, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(res.outputs, out.detach(), rtol=1e-12, atol=1e-12)


def test_bidirectional_rejected():
    with pytest.raises(ValueError, match="bidirectional"):
        bptt_gradients(
            nn.GRU(3, 4, bidirectional=True), torch.randn(T, B, 3), torch.randn(T, B, 8), "mse"
        )


class ExplicitState(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.rec = nn.Linear(4, 4, bias=False)
        self.out = nn.Linear(4, 2)

    def forward(self, x, h, c):
        h = torch.tanh(self.inp(x) + self.rec(h)) + 0.5 * c
        return self.out(h), h, 0.9 * c


class BufferState(nn.Module):
    def __init__(self, batch):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.rec = nn.Linear(4, 4, bias=False)
        self.out = nn.Linear(4, 2)
        self.register_buffer("h", torch.zeros(batch, 4))

    def forward(self, x):
        self.h = torch.tanh(self.inp(x) + self.rec(self.h))
        return self.out(self.h)


class InPlaceBufferState(BufferState):
    def forward(self, x):
        h = torch.tanh(self.inp(x) + self.rec(self.h.clone()))
        self.h.copy_(h)
        return self.out(h)


def test_convention_c_forward_state():
    torch.manual_seed(0)
    m = ExplicitState()
    xs, ys = torch.randn(T, B, 3), torch.randint(0, 2, (T, B))
    before = _grads_snapshot(m)
    state = (torch.zeros(B, 4), torch.ones(B, 4))
    res = bptt_gradients(m, xs, ys, "cross_entropy", state=state)
    _assert_grads_untouched(m, before)
    assert res.outputs.shape == (T, B, 2)
    h, c, total = state[0], state[1], 0.0
    for t in range(T):
        y, h, c = m(xs[t], h, c)
        total = total + nn.functional.cross_entropy(y, ys[t])
    assert res.loss == pytest.approx(total.item(), rel=1e-6)
    with pytest.raises(TypeError, match="state="):
        bptt_gradients(m, xs, ys, "cross_entropy")


@pytest.mark.parametrize("cls", [BufferState, InPlaceBufferState])
def test_convention_d_buffers_restored(cls):
    torch.manual_seed(0)
    m = cls(B)
    m.h.fill_(0.25)
    h_obj = m.h
    xs, ys = torch.randn(T, B, 3), torch.randn(T, B, 2)
    before = _grads_snapshot(m)
    res = bptt_gradients(m, xs, ys, nn.MSELoss())
    _assert_grads_untouched(m, before)
    assert m.h is h_obj and torch.all(m.h == 0.25) and not m.h.requires_grad
    # reference: unroll by hand from the same initial buffer
    h, total = torch.full((B, 4), 0.25), 0.0
    for t in range(T):
        h = torch.tanh(m.inp(xs[t]) + m.rec(h))
        total = total + ((m.out(h) - ys[t]) ** 2).mean()
    grads = torch.autograd.grad(total, list(m.parameters()))
    for (name, _), g in zip(m.named_parameters(), grads):
        torch.testing.assert_close(res.grads[name], g)
    assert bptt_gradients(m, xs, ys, "mse", state=()).loss == pytest.approx(res.loss)


def test_custom_step_and_none_targets():
    torch.manual_seed(0)
    cell = nn.GRUCell(3, 4)
    head = nn.Linear(4, 2)
    model = nn.ModuleDict({"cell": cell, "head": head})

    def step(module, x, h):
        h = module["cell"](x, h)
        return module["head"](h), h

    xs = torch.randn(T, B, 3)
    targets = [None] * (T - 1) + [torch.tensor([0, 1])]
    res = bptt_gradients(model, xs, targets, "cross_entropy", state=torch.zeros(B, 4), step=step)
    assert res.outputs.shape == (T, B, 2)
    expected = nn.functional.cross_entropy(res.outputs[-1], targets[-1])
    assert res.loss == pytest.approx(float(expected), rel=1e-6)
    assert set(res.grads) == {
        "cell.weight_ih",
        "cell.weight_hh",
        "cell.bias_ih",
        "cell.bias_hh",
        "head.weight",
        "head.bias",
    }


def test_unused_parameter_gets_zero_gradient():
    m = nn.ModuleDict({"cell": nn.GRUCell(3, 4), "unused": nn.Linear(2, 2)})
    res = bptt_gradients(
        m,
        torch.randn(T, B, 3),
        torch.randn(T, B, 4),
        "mse",
        state=torch.zeros(B, 4),
        step=lambda mod, x, h: (mod["cell"](x, h),) * 2,
    )
    assert torch.all(res.grads["unused.weight"] == 0)


def test_named_losses_torch_and_jax_agree():
    torch.manual_seed(0)
    logits = torch.randn(5, 3, dtype=torch.float64)
    labels = torch.tensor([0, -100, 2, 1, -100])
    ce = resolve_loss("cross_entropy")
    expected = nn.functional.cross_entropy(logits, labels, ignore_index=-100)
    assert float(ce(logits, labels)) == pytest.approx(float(expected), rel=1e-12)
    assert float(ce(logits, torch.full((5,), -100))) == 0.0
    jce = resolve_loss("cross_entropy", backend="jax")
    assert float(
        jce(jnp.asarray(logits.numpy(), dtype=jnp.float32), jnp.asarray(labels.numpy()))
    ) == pytest.approx(float(expected), rel=1e-5)
    assert float(jce(jnp.zeros((5, 3)), jnp.full((5,), -100))) == 0.0
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    assert float(resolve_loss("mse")(a, b)) == pytest.approx(float(((a - b) ** 2).mean()), rel=1e-6)
    assert float(
        resolve_loss("mse", backend="jax")(jnp.asarray(a.numpy()), jnp.asarray(b.numpy()))
    ) == pytest.approx(float(((a - b) ** 2).mean()), rel=1e-5)
    fn = lambda y, t: y.sum()
    assert resolve_loss(fn) is fn
    with pytest.raises(ValueError, match="mse, cross_entropy"):
        resolve_loss("hinge")


def test_compare_gradients_hand_values():
    ref = {"w": torch.tensor([3.0, 4.0]), "b": torch.tensor([1.0, 0.0]), "z": torch.zeros(2)}
    online = {"w": jnp.array([3.0, 4.0]), ("b",): np.array([0.0, 1.0]), "z": torch.zeros(2)}
    report = compare_gradients(online, ref)
    assert isinstance(report, GradientReport)
    assert [r.name for r in report.rows] == ["w", "b", "z"]
    w, b, z = report.rows
    assert w == GradientRow("w", (2,), 0.0, pytest.approx(1.0))
    assert b.rel_error == pytest.approx(np.sqrt(2.0)) and b.cosine == pytest.approx(0.0)
    assert z.rel_error == 0.0 and z.cosine == 1.0
    assert report.worst_rel_error == pytest.approx(np.sqrt(2.0))
    assert report.min_cosine == pytest.approx(0.0)

    half = compare_gradients({"w": torch.tensor([1.5, 2.0])}, {"w": torch.tensor([3.0, 4.0])})
    assert half.rows[0].rel_error == pytest.approx(0.5) and half.rows[0].cosine == pytest.approx(
        1.0
    )
    anti = compare_gradients({"w": -torch.ones(3)}, {"w": torch.ones(3)})
    assert anti.rows[0].rel_error == pytest.approx(2.0) and anti.rows[0].cosine == pytest.approx(
        -1.0
    )
    zero_online = compare_gradients({"w": torch.zeros(3)}, {"w": torch.ones(3)})
    assert zero_online.rows[0].rel_error == pytest.approx(1.0) and zero_online.rows[0].cosine == 0.0


def test_compare_gradients_errors_and_formatting():
    ref = {"cell.weight": torch.ones(2, 3), "cell.bias": torch.ones(3)}
    with pytest.raises(ValueError, match="missing"):
        compare_gradients({"cell.weight": torch.ones(2, 3)}, ref)
    with pytest.raises(ValueError, match="shape"):
        compare_gradients({"cell.weight": torch.ones(3, 2), "cell.bias": torch.ones(3)}, ref)
    report = compare_gradients(
        {("cell", "weight"): torch.ones(2, 3), "cell.bias": 2 * torch.ones(3)}, ref
    )
    table = report.table().splitlines()
    assert len(table) == 4 and len({len(line) for line in table}) == 1
    assert "cell.weight" in table[2] and "2x3" in table[2] and "1.000e+00" in table[3]
    md = report.to_markdown().splitlines()
    assert md[0].startswith("| parameter") and len(md) == 4 and "`cell.bias`" in md[3]
    assert str(report) == report.table()
    empty = GradientReport([])
    assert empty.worst_rel_error == 0.0 and empty.min_cosine == 1.0
