"""Issue 8 (bridge side): every parameter of a torch recurrent model learns online.

Models written the way PyTorch users write them (tests/bridge/every_parameter_models.py), all
with element-wise recurrences. Oracle: torch autograd BPTT (`bptt_gradients`) in float64.
- conversion parity: the converted step reproduces torch over T steps, <= 1e-12 (float64);
- every matmul-form weight is an ETP relation of the compiled graph, every other parameter
  that reaches a hidden state has an element-wise or dense trace, and show_graph says nothing
  is approximate;
- D-RTRL equals BPTT, <= 1e-10 relative error for every parameter (float64);
- ES-D-RTRL and hybrid train each model (float32, 50 Adam steps on a teacher's outputs).
"""

import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from etrace_bridge import OnlineLearner, bptt_gradients, compare_gradients, from_torch
from etrace_bridge.errors import UnsupportedModelError

from ..conftest import x64_enabled
from .every_parameter_models import N_HID, N_IN, N_OUT, LearnableH0, families

T, B = 8, 3
NAMES = list(families(B))


def _model(name, dtype, seed=0):
    torch.manual_seed(seed)
    return families(B)[name]().to(dtype)


def _data(dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(T, B, N_IN, generator=g, dtype=dtype),
        torch.randn(T, B, N_OUT, generator=g, dtype=dtype),
    )


def _example(model, x0, dtype):
    state = model.state(B, dtype)
    if state is None:
        return (x0,)
    return (x0, *state) if isinstance(state, tuple) else (x0, state)


def _bptt_state(model, dtype):
    return model.state(B, dtype)


def _jx(t):
    return jnp.asarray(t.detach().numpy().copy())


@pytest.mark.parametrize("name", NAMES)
def test_converts_traces_every_parameter_and_d_rtrl_is_exact(name):
    dtype = torch.float64
    with x64_enabled():
        model = _model(name, dtype)
        xs, ys = _data(dtype)
        ref = bptt_gradients(model, xs, ys, "mse", state=_bptt_state(model, dtype))

        learner = OnlineLearner(
            model, algorithm="d_rtrl", loss="mse", example_inputs=_example(model, xs[0], dtype)
        )
        # conversion parity, step by step from the same initial state
        outs = np.stack([np.asarray(learner.model.update(_jx(xs[t]))) for t in range(T)])
        err = np.max(np.abs(outs - ref.outputs.numpy()))
        assert err <= 1e-12 * max(1.0, float(ref.outputs.abs().max())), err
        learner.reset_state(B)
        graph = learner.algorithm.graph
        relations = {
            ".".join(p)
            for r in graph.hidden_param_op_relations
            for p in (r.weight_path, r.bias_path)
            if p
        }
        assert set(model.matmul_weights) <= relations, (relations, model.matmul_weights)
        assert all(
            r.primitive.name == "etp_matmul"
            for r in graph.hidden_param_op_relations
            if ".".join(r.weight_path) in model.matmul_weights
        )
        traced = relations | {
            ".".join(r.path) for r in learner.algorithm.executor.param_trace_relations
        }
        msg = learner.show_graph(verbose=False, return_msg=True)
        assert "approximate" not in msg, msg
        feeding = {n for n, g in ref.grads.items() if n not in traced}
        for n in feeding:  # whatever is not traced must be a memoryless readout
            assert f"('{n.split('.')[0]}'" in msg and "reaches no hidden state" in msg, (n, msg)
            assert n.startswith(("readout", "C_", "D")), (n, msg)

        learner.run(xs, ys)
        online = {n: p.grad for n, p in model.named_parameters()}
        report = compare_gradients(online, ref.grads)
        assert report.worst_rel_error <= 1e-10, report.table()


@pytest.mark.parametrize("algorithm", ["es_d_rtrl", "hybrid"])
@pytest.mark.parametrize("name", NAMES)
def test_online_algorithms_train(name, algorithm):
    dtype = torch.float32
    model, teacher = _model(name, dtype), _model(name, dtype, seed=7)
    xs, _ = _data(dtype, seed=2)
    targets = bptt_gradients(
        teacher, xs, torch.zeros(T, B, N_OUT), "mse", state=_bptt_state(teacher, dtype)
    ).outputs
    learner = OnlineLearner(
        model, algorithm=algorithm, loss="mse", example_inputs=_example(model, xs[0], dtype)
    )
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    losses = []
    for _ in range(50):
        learner.reset_state(B)
        opt.zero_grad()
        losses.append(float(learner.run(xs, targets)))
        opt.step()
    assert np.isfinite(losses).all()
    assert min(losses[-5:]) < 0.5 * losses[0], losses


# ----------------------------------------------------------------------------- matmul forms


class _Forms(nn.Module):
    def __init__(self, form):
        super().__init__()
        self.form = form
        self.W = nn.Parameter(torch.randn(N_HID, N_IN))
        self.U = nn.Parameter(torch.randn(N_IN, N_HID))
        self.b = nn.Parameter(torch.randn(N_HID))
        self.Wbig = nn.Parameter(torch.randn(2 * N_HID, N_IN + 1))

    def forward(self, x, h):
        h = 0.5 * h + torch.tanh(FORMS[self.form](self, x))
        return h, h


FORMS = {
    "x @ W.T + b": lambda s, x: x @ s.W.T + s.b,
    "x @ U": lambda s, x: x @ s.U,
    "torch.matmul(x, W.t())": lambda s, x: torch.matmul(x, s.W.t()),
    "F.linear": lambda s, x: F.linear(x, s.W, s.b),
    "einsum bi,hi->bh": lambda s, x: torch.einsum("bi,hi->bh", x, s.W),
    "einsum hi,bi->bh": lambda s, x: torch.einsum("hi,bi->bh", s.W, x),
    "addmm": lambda s, x: torch.addmm(s.b, x, s.U),
    "W @ x.T": lambda s, x: (s.W @ x.T).T,
    "bmm": lambda s, x: torch.bmm(
        x.unsqueeze(1), s.U.unsqueeze(0).expand(x.shape[0], -1, -1)
    ).squeeze(1),
    "slice of W": lambda s, x: x @ s.Wbig[N_HID:, 1:].T,
    "chunk of W": lambda s, x: x @ s.Wbig.chunk(2)[0][:, :N_IN].T,
}
WEIGHT = {"x @ U": "U", "addmm": "U", "bmm": "U", "slice of W": "Wbig", "chunk of W": "Wbig"}


@pytest.mark.parametrize("form", list(FORMS))
def test_every_matmul_form_is_an_etp_op(form):
    torch.manual_seed(0)
    model = _Forms(form)
    x, h = torch.randn(B, N_IN), torch.zeros(B, N_HID)
    learner = OnlineLearner(model, algorithm="d_rtrl", loss="mse", example_inputs=(x, h))
    with torch.no_grad():
        want = model(x, h)[0].numpy()
    got = np.asarray(learner.model.update(_jx(x)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    relations = {
        r.weight_path: r.primitive.name for r in learner.algorithm.graph.hidden_param_op_relations
    }
    assert relations.get((WEIGHT.get(form, "W"),)) == "etp_matmul", relations


# ----------------------------------------------------------------------------- initial states


def test_learnable_h0_reset_reads_current_value_and_forward_default_is_recurrent():
    torch.manual_seed(0)
    model = LearnableH0()
    x = torch.randn(B, N_IN)
    learner = OnlineLearner(model, algorithm="d_rtrl", loss="mse", example_inputs=(x,))
    np.testing.assert_allclose(
        np.asarray(learner.model.h.value), model.h0.detach().expand(B, -1).numpy(), rtol=0, atol=0
    )
    with torch.no_grad():
        model.h0.add_(1.5)  # what optimizer.step() does
    learner.reset_state(B)
    np.testing.assert_allclose(
        np.asarray(learner.model.h.value), model.h0.detach().expand(B, -1).numpy(), rtol=0, atol=0
    )


def test_learnable_h0_from_an_example_state_built_from_the_parameter():
    dtype = torch.float64
    with x64_enabled():
        torch.manual_seed(0)
        model = LearnableH0().to(dtype)
        xs, ys = _data(dtype)
        h0 = model.h0.expand(B, -1)
        learner = OnlineLearner(model, algorithm="d_rtrl", loss="mse", example_inputs=(xs[0], h0))
        learner.run(xs, ys)
        ref = bptt_gradients(model, xs, ys, "mse", state=h0)
        report = compare_gradients({n: p.grad for n, p in model.named_parameters()}, ref.grads)
        assert report.worst_rel_error <= 1e-10, report.table()
        assert float(ref.grads["h0"].abs().sum()) > 0


def test_learnable_h0_through_a_recurrent_weight_is_labelled_approximate():
    class RNNWithH0(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = nn.RNNCell(N_IN, N_HID)
            self.h0 = nn.Parameter(torch.randn(N_HID))

        def forward(self, x, h=None):
            if h is None:
                h = self.h0.expand(x.shape[0], -1)
            h = self.cell(x, h)
            return h, h

    learner = OnlineLearner(
        RNNWithH0(), algorithm="d_rtrl", loss="mse", example_inputs=(torch.randn(B, N_IN),)
    )
    msg = learner.show_graph(verbose=False, return_msg=True)
    h0_lines = msg.split("('h0',)", 1)[1].split("\n\n", 1)[0]
    assert "approximate" in h0_lines, msg


def test_forward_default_state_that_cannot_be_reproduced_is_refused():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(N_IN, N_HID)

        def forward(self, x, h=None):
            if h is None:
                h = torch.full((x.shape[0], N_HID), 0.3) + x.sum(-1, keepdim=True)
            h = 0.5 * h + self.lin(x)
            return h, h

    with pytest.raises(ValueError, match="Pass it explicitly"):
        from_torch(Odd(), (torch.randn(B, N_IN),))


def test_optional_argument_that_is_not_a_state_keeps_a_stateless_model():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(N_IN, N_OUT)

        def forward(self, x, mask=None):
            y = self.lin(x)
            return y if mask is None else y * mask

    converted = from_torch(Masked(), (torch.randn(B, N_IN),))
    assert converted._bridge.state_init == {}


# ----------------------------------------------------------------------------- torch RNN layers


def test_lstm_proj_size_alone_matches_wrapped():
    class Wrapped(nn.Module):
        def __init__(self, lstm):
            super().__init__()
            self.lstm = lstm

        def forward(self, x, h, c):
            y, (h, c) = self.lstm(x.unsqueeze(0), (h, c))
            return y.squeeze(0), h, c

    with x64_enabled():
        torch.manual_seed(0)
        alone = nn.LSTM(N_IN, N_HID, proj_size=2).double()
        wrapped = Wrapped(nn.LSTM(N_IN, N_HID, proj_size=2).double())
        wrapped.lstm.load_state_dict(alone.state_dict())
        xs, _ = _data(torch.float64)
        ys = torch.randn(T, B, 2, dtype=torch.float64)
        h, c = (
            torch.zeros(1, B, 2, dtype=torch.float64),
            torch.zeros(1, B, N_HID, dtype=torch.float64),
        )
        grads = []
        for model, example in ((alone, (xs[0],)), (wrapped, (xs[0], h, c))):
            learner = OnlineLearner(model, algorithm="d_rtrl", loss="mse", example_inputs=example)
            learner.run(xs, ys)
            grads.append({n.removeprefix("lstm."): p.grad for n, p in model.named_parameters()})
        report = compare_gradients(grads[0], grads[1])
        assert report.worst_rel_error <= 1e-10, report.table()


def test_lower_layers_of_stacked_torch_rnns_are_labelled_approximate():
    learner = OnlineLearner(
        nn.GRU(N_IN, N_HID, num_layers=2),
        algorithm="d_rtrl",
        loss="mse",
        example_inputs=(torch.randn(B, N_IN),),
    )
    msg = learner.show_graph(verbose=False, return_msg=True)
    notes = learner.model.approximations
    assert set(notes) == {f"{k}_l0" for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
    assert all("cross-layer memory" in n for n in notes.values())
    assert "weight_ih_l0: approximate: cross-layer memory" in msg


def test_complex_parameters_are_refused_by_name_and_compared_in_full():
    class ComplexDecay(nn.Module):
        def __init__(self):
            super().__init__()
            self.lam = nn.Parameter(torch.full((N_HID,), 0.5 + 0.2j))
            self.inp = nn.Linear(N_IN, N_HID)

        def forward(self, x, h):
            h = self.lam * h + self.inp(x).to(h.dtype)
            return h.real, h

    example = (torch.randn(B, N_IN), torch.zeros(B, N_HID, dtype=torch.complex64))
    with pytest.raises(UnsupportedModelError, match="`lam`.*torch.complex"):
        OnlineLearner(ComplexDecay(), algorithm="d_rtrl", example_inputs=example)
    ref = {"lam": torch.tensor([1.0 + 1.0j])}
    report = compare_gradients({"lam": torch.tensor([1.0 - 1.0j])}, ref)
    assert report.rows[0].rel_error == pytest.approx(2**0.5)  # the imaginary part counts


def test_conversion_check_compares_complex_states_in_full():
    """A complex state differing only in its imaginary part is a mismatch (it was cast to
    float64 before, dropping the imaginary part, with a ComplexWarning)."""
    from etrace_bridge.check import _compare

    ref = np.array([[1.0 + 1.0j, 0.5 - 2.0j]], np.complex64)
    assert _compare(0, "h", ref, ref.copy()) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bad = _compare(0, "h", ref, np.array([[1.0 - 1.0j, 0.5 - 2.0j]], np.complex64))
    assert bad is not None and bad.max_abs == pytest.approx(2.0)


def test_frozen_initial_state_parameter_is_found_by_value():
    model = LearnableH0()
    model.h0.requires_grad_(False)
    converted = from_torch(model, (torch.randn(B, N_IN),))
    assert converted._bridge.state_params == {("h",): "h0"}
    np.testing.assert_array_equal(
        np.asarray(converted.h.value), model.h0.detach().expand(B, -1).numpy()
    )


# ----------------------------------------------------------------------------- fidelity table


def measure(name, algorithm, dtype):
    """(worst relative error, minimum cosine) of `algorithm` vs BPTT over all parameters."""
    with x64_enabled() if dtype == torch.float64 else _nothing():
        model = _model(name, dtype)
        xs, ys = _data(dtype)
        ref = bptt_gradients(model, xs, ys, "mse", state=_bptt_state(model, dtype))
        learner = OnlineLearner(
            model, algorithm=algorithm, loss="mse", example_inputs=_example(model, xs[0], dtype)
        )
        learner.run(xs, ys)
        report = compare_gradients({n: p.grad for n, p in model.named_parameters()}, ref.grads)
        return report.worst_rel_error, report.min_cosine


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    algorithms = ("d_rtrl", "es_d_rtrl", "hybrid")
    print(
        "| model | "
        + " | ".join(f"{a} f64 rel. error" for a in algorithms)
        + " | "
        + " | ".join(f"{a} f32 min cosine" for a in algorithms)
        + " |"
    )
    print("|---|" + "---:|" * (2 * len(algorithms)))
    for family in NAMES:
        f64 = [measure(family, a, torch.float64)[0] for a in algorithms]
        f32 = [measure(family, a, torch.float32)[1] for a in algorithms]
        print(
            f"| {family} | "
            + " | ".join(f"{e:.1e}" for e in f64)
            + " | "
            + " | ".join(f"{c:.6f}" for c in f32)
            + " |",
            flush=True,
        )
