"""from_torch: step-by-step parity with torch eager (outputs and states), state conventions,
parameter paths, ETP weights in the jaxpr, batch handling and torch-side sync."""

import brainstate
import jax
import jax.numpy as jnp
import pytest
import torch
from torch import nn

from etrace_bridge.errors import UnsupportedModelError, UnsupportedOpError
from etrace_bridge.module import TorchModule, from_torch
from tests.bridge.bridge_cases import (
    F32_TOL,
    F64_TOL,
    ConvGRU,
    GRUReadout,
    LeakyCell,
    LIFNetwork,
    StackedLSTM,
    assert_close,
    jx,
)

B, T, I, H = 3, 5, 4, 5


# ----------------------------------------------------------------------------- custom op


@torch.library.custom_op("etrace_test::spike", mutates_args=())
def spike(x: torch.Tensor) -> torch.Tensor:
    """Heaviside step; surrogate gradient 1 / (1 + 4|x|)^2."""
    return (x > 0).to(x.dtype)


@spike.register_fake
def _spike_fake(x):
    return torch.empty_like(x)


def _spike_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _spike_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return grad / (1 + 4 * x.abs()) ** 2


spike.register_autograd(_spike_backward, setup_context=_spike_setup)


@jax.custom_vjp
def spike_jax(x):
    return (x > 0).astype(x.dtype)


def _spike_jax_fwd(x):
    return spike_jax(x), x


def _spike_jax_bwd(x, g):
    return (g / (1 + 4 * jnp.abs(x)) ** 2,)


spike_jax.defvjp(_spike_jax_fwd, _spike_jax_bwd)


class SpikingLIF(nn.Module):
    """LIF with soft reset, custom-op spikes and state in buffers assigned in forward."""

    def __init__(self, batch=B):
        super().__init__()
        self.fc = nn.Linear(I, H)
        self.readout = nn.Linear(H, 2)
        self.register_buffer("v", torch.zeros(batch, H))

    def forward(self, x):
        v = 0.8 * self.v + self.fc(x)
        s = spike(v - 0.5)
        self.v = v - 0.5 * s
        return self.readout(s)


# ----------------------------------------------------------------------------- helpers


def hidden(tm):
    return {p: s.value for p, s in tm.states(brainstate.HiddenState).items()}


def check_steps(tm, torch_step, xs, tol):
    """Run tm.update and torch_step side by side; compare outputs and every hidden state."""
    for t, x in enumerate(xs):
        y = tm.update(jx(x))
        with torch.no_grad():
            y_ref, states_ref = torch_step(x)
        assert_close(y, y_ref, tol, f"output at step {t}")
        states = hidden(tm)
        assert set(states) == set(states_ref)
        for path, ref in states_ref.items():
            assert_close(states[path], ref, tol, f"state {path} at step {t}")


def inputs(dtype=torch.float32, batch=B, size=I):
    return [torch.randn(batch, size, dtype=dtype) for _ in range(T)]


def etp_count(tm, x, name="etp_matmul"):
    jaxpr = brainstate.transform.StatefulFunction(tm.update).get_jaxpr(x)
    return sum(e.primitive.name == name for e in jaxpr.eqns)


def param_paths(module):
    return {tuple(n.split(".")) for n, _ in module.named_parameters()}


# ----------------------------------------------------------------------------- (a) cells

CELLS = {
    "rnn_tanh": lambda **kw: nn.RNNCell(I, H, **kw),
    "rnn_relu": lambda **kw: nn.RNNCell(I, H, nonlinearity="relu", **kw),
    "gru": lambda **kw: nn.GRUCell(I, H, **kw),
    "lstm": lambda **kw: nn.LSTMCell(I, H, **kw),
}


def cell_reference(cell, state):
    def step(x):
        nonlocal state
        state = cell(x, state)
        if isinstance(cell, nn.LSTMCell):
            return state[0], {("h",): state[0], ("c",): state[1]}
        return state, {("h",): state}

    return step


def run_cell(kind, bias, dtype, tol, given_state):
    cell = CELLS[kind](bias=bias).to(dtype)
    xs = inputs(dtype)
    lstm = kind == "lstm"
    h0 = 0.1 * torch.ones(B, H, dtype=dtype)
    state = (h0, -h0) if lstm else h0
    example = (xs[0], state) if given_state else (xs[0],)
    tm = from_torch(cell, example)
    if not given_state:
        state = (torch.zeros_like(h0), torch.zeros_like(h0)) if lstm else torch.zeros_like(h0)
    check_steps(tm, cell_reference(cell, state), xs, tol)
    assert set(tm.states(brainstate.ParamState)) == param_paths(cell)
    assert etp_count(tm, jx(xs[0])) == 2


@pytest.mark.parametrize("kind", sorted(CELLS))
@pytest.mark.parametrize("bias", [True, False])
def test_cells_float32(kind, bias):
    run_cell(kind, bias, torch.float32, F32_TOL, given_state=bias)


@pytest.mark.parametrize("kind", sorted(CELLS))
def test_cells_float64(x64, kind):
    run_cell(kind, True, torch.float64, F64_TOL, given_state=True)


def test_lstm_cell_example_with_aliased_h_and_c():
    cell = nn.LSTMCell(I, H)
    h0 = torch.zeros(B, H)
    tm = from_torch(cell, (torch.randn(B, I), (h0, h0)))
    check_steps(tm, cell_reference(cell, (h0, h0.clone())), inputs(), F32_TOL)


@pytest.mark.parametrize(
    "model, shape",
    [
        (nn.Linear(I, 3), (B, I)),
        (nn.Sequential(nn.Conv1d(2, 4, 3, stride=2, padding=1), nn.GELU()), (B, 2, 9)),
        (nn.Sequential(nn.Conv2d(4, 6, 3, groups=2, padding=1), nn.SiLU()), (B, 4, 5, 5)),
        (nn.Sequential(nn.Linear(I, 6), nn.LayerNorm(6), nn.Dropout(0.2), nn.ELU()).eval(), (B, I)),
    ],
    ids=["linear", "conv1d", "conv2d", "layernorm_dropout"],
)
def test_stateless_layers_through_from_torch(model, shape):
    xs = [torch.randn(*shape) for _ in range(T)]
    tm = from_torch(model, (xs[0],))
    assert tm.states(brainstate.HiddenState) == {}
    check_steps(tm, lambda x: (model(x), {}), xs, F32_TOL)
    assert set(tm.states(brainstate.ParamState)) == param_paths(model)


# ----------------------------------------------------------------------------- (b) RNN modules


def rnn_reference(rnn, state):
    time_axis = 1 if rnn.batch_first else 0
    lstm = isinstance(rnn, nn.LSTM)

    def step(x):
        nonlocal state
        out, state = rnn(x.unsqueeze(time_axis), state)
        kinds = ("h", "c") if lstm else ("h",)
        tensors = state if lstm else (state,)
        ref = {(k, f"l{i}"): t[i] for k, t in zip(kinds, tensors) for i in range(rnn.num_layers)}
        return out.squeeze(time_axis), ref

    return step


def run_rnn(cls, layers, batch_first, bias, dtype, tol):
    rnn = cls(I, H, num_layers=layers, batch_first=batch_first, bias=bias).to(dtype)
    xs = inputs(dtype)
    tm = from_torch(rnn, (xs[0],))
    zero = torch.zeros(layers, B, H, dtype=dtype)
    state = (zero, zero.clone()) if cls is nn.LSTM else zero
    check_steps(tm, rnn_reference(rnn, state), xs, tol)
    assert set(tm.states(brainstate.ParamState)) == param_paths(rnn)
    expected = {("h", f"l{i}") for i in range(layers)}
    if cls is nn.LSTM:
        expected |= {("c", f"l{i}") for i in range(layers)}
    assert set(tm.states(brainstate.HiddenState)) == expected
    assert etp_count(tm, jx(xs[0])) == 2 * layers
    return tm


@pytest.mark.parametrize("cls", [nn.RNN, nn.GRU, nn.LSTM], ids=lambda c: c.__name__)
@pytest.mark.parametrize(
    "layers, batch_first, bias",
    [  # every pair of options appears
        (1, False, True),
        (1, True, False),
        (2, False, False),
        (2, True, True),
    ],
)
def test_rnn_modules_float32(cls, layers, batch_first, bias):
    run_rnn(cls, layers, batch_first, bias, torch.float32, F32_TOL)


@pytest.mark.parametrize("cls", [nn.RNN, nn.GRU, nn.LSTM], ids=lambda c: c.__name__)
def test_rnn_modules_float64(x64, cls):
    run_rnn(cls, 2, True, True, torch.float64, F64_TOL)


def test_rnn_example_with_time_axis_and_state():
    gru = nn.GRU(I, H, num_layers=2)
    x = torch.randn(1, B, I)
    h0 = torch.randn(1, 1, H).expand(2, B, H).contiguous()
    tm = from_torch(gru, (x, h0))
    assert_close(hidden(tm)[("h", "l1")], h0[1], F32_TOL)
    check_steps(tm, rnn_reference(gru, h0), inputs(), F32_TOL)


def test_rnn_relu_nonlinearity():
    run_rnn(
        lambda *a, **k: nn.RNN(*a, nonlinearity="relu", **k), 2, False, True, torch.float32, F32_TOL
    )


def test_lstm_proj_size_converts():
    lstm = nn.LSTM(I, H, num_layers=2, proj_size=2)
    tm = from_torch(lstm, (torch.randn(B, I),))
    assert hidden(tm)[("h", "l0")].shape == (B, 2) and hidden(tm)[("c", "l0")].shape == (B, H)
    state = (torch.zeros(2, B, 2), torch.zeros(2, B, H))
    check_steps(tm, rnn_reference(lstm, state), inputs(), F32_TOL)


# ----------------------------------------------------------------------------- (c) explicit state


def explicit_reference(model, state, names):
    def step(x):
        nonlocal state
        y, *state = model(x, *state)
        return y, {(n,): s for n, s in zip(names, state)}

    return step


@pytest.mark.parametrize("dtype, tol", [(torch.float32, F32_TOL), (torch.float64, F64_TOL)])
def test_leaky_integrator(request, dtype, tol):
    if dtype == torch.float64:
        request.getfixturevalue("x64")
    model = LeakyCell().to(dtype)
    h0 = torch.zeros(B, 6, dtype=dtype)
    tm = from_torch(model, (torch.randn(B, I, dtype=dtype), h0))
    assert set(tm.states(brainstate.HiddenState)) == {("h",)}
    check_steps(tm, explicit_reference(model, (h0,), ["h"]), inputs(dtype), tol)
    assert etp_count(tm, jnp.zeros((B, I), jx(h0).dtype)) == 3


def test_gru_cell_with_readout():
    model = GRUReadout()
    h0 = torch.zeros(B, H)
    tm = from_torch(model, (torch.randn(B, I), h0))
    check_steps(tm, explicit_reference(model, (h0,), ["h"]), inputs(), F32_TOL)
    assert set(tm.states(brainstate.ParamState)) == param_paths(model)
    assert ("gru", "weight_ih") in tm.states(brainstate.ParamState)
    assert etp_count(tm, jnp.zeros((B, I))) == 3


def test_stacked_lstm_cells():
    model = StackedLSTM()
    zeros = [torch.zeros(B, H) for _ in range(4)]
    tm = from_torch(model, (torch.randn(B, I), *zeros))
    names = ["h1", "c1", "h2", "c2"]
    assert set(tm.states(brainstate.HiddenState)) == {(n,) for n in names}
    check_steps(tm, explicit_reference(model, zeros, names), inputs(), F32_TOL)
    assert ("cells", "1", "weight_hh") in tm.states(brainstate.ParamState)
    assert etp_count(tm, jnp.zeros((B, I))) == 5


def test_conv1d_into_gru_cell():
    model = ConvGRU(channels=2, length=8)
    h0 = torch.zeros(B, H)
    xs = [torch.randn(B, 2, 8) for _ in range(T)]
    tm = from_torch(model, (xs[0], h0))
    check_steps(tm, explicit_reference(model, (h0,), ["h"]), xs, F32_TOL)
    x = jnp.zeros((B, 2, 8))
    assert etp_count(tm, x) == 2 and etp_count(tm, x, "etp_conv") == 1


def test_single_output_cell_is_its_own_state():
    class MinimalCell(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Linear(I + H, H)

        def forward(self, x, mem):
            return torch.tanh(self.w(torch.cat([x, mem], -1)))

    model = MinimalCell()
    mem = torch.zeros(B, H)
    tm = from_torch(model, (torch.randn(B, I), mem))

    def step(x):
        nonlocal mem
        mem = model(x, mem)
        return mem, {("mem",): mem}

    check_steps(tm, step, inputs(), F32_TOL)


def test_explicit_state_declaration():
    class StateFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = nn.GRUCell(I, H)

        def forward(self, h, x):
            h = self.cell(x, h)
            return h, 2 * h.sum(-1)

    model = StateFirst()
    h0 = torch.zeros(B, H)
    tm = from_torch(
        model, (h0, torch.randn(B, I)), state={"inputs": [0], "outputs": [0], "names": ["memory"]}
    )
    assert set(tm.states(brainstate.HiddenState)) == {("memory",)}
    h = h0

    def step(x):
        nonlocal h
        h, y = model(h, x)
        return y, {("memory",): h}

    check_steps(tm, step, inputs(), F32_TOL)


def test_multi_input_model_without_state():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(I, 3), nn.Linear(2, 3)

        def forward(self, x, u):
            return self.a(x) * self.b(u)

    model = TwoInputs()
    x, u = torch.randn(B, I), torch.randn(B, 2)
    tm = from_torch(model, (x, u))
    assert tm.states(brainstate.HiddenState) == {}
    assert_close(tm.update(jx(x), jx(u)), model(x, u), F32_TOL)


# ----------------------------------------------------------------------------- (d) buffer state


def buffer_reference(model, names):
    def step(x):
        y = model(x)
        return y, {tuple(n.split(".")): model.get_buffer(n).clone() for n in names}

    return step


@pytest.mark.parametrize("dtype, tol", [(torch.float32, F32_TOL), (torch.float64, F64_TOL)])
def test_lif_with_buffer_state(request, dtype, tol):
    if dtype == torch.float64:
        request.getfixturevalue("x64")
    model = LIFNetwork(batch=B).to(dtype)
    tm = from_torch(model, (torch.randn(B, I, dtype=dtype),))
    assert set(tm.states(brainstate.HiddenState)) == {("lif", "v")}
    assert set(tm.states(brainstate.ParamState)) == param_paths(model)
    xs = [2 * x for x in inputs(dtype)]
    check_steps(tm, buffer_reference(model, ["lif.v"]), xs, tol)


def test_custom_op_spike_lowered_with_custom_ops():
    model = SpikingLIF()
    with pytest.raises(UnsupportedOpError, match="etrace_test::spike"):
        from_torch(model, (torch.randn(B, I),))
    tm = from_torch(model, (torch.randn(B, I),), custom_ops={"etrace_test::spike": spike_jax})
    xs = [2 * x for x in inputs()]
    check_steps(tm, buffer_reference(model, ["v"]), xs, F32_TOL)


def test_custom_op_surrogate_gradient_matches_torch():
    model = SpikingLIF()
    x = 2 * torch.randn(B, I)
    tm = from_torch(model, (x,), custom_ops={spike: spike_jax})
    lowered = tm.exported, tm._bridge.lowered
    params = {n: jx(p) for n, p in model.named_parameters()}

    def loss(p):
        out, _ = lowered[1](p, {"v": jnp.zeros((B, H))}, jx(x))
        return jnp.sum(out**2)

    grads = jax.grad(loss)(params)
    (model(x) ** 2).sum().backward()
    for name, p in model.named_parameters():
        assert_close(grads[name], p.grad, F32_TOL, name)
    assert float(jnp.abs(grads["fc.weight"]).sum()) > 0


# ----------------------------------------------------------------------------- batch handling


def test_dynamic_batch_runs_other_batch_sizes():
    cell = nn.GRUCell(I, H)
    tm = from_torch(cell, (torch.randn(B, I),))
    assert tm.exported.dynamic_batch
    tm.reset_state(7)
    assert hidden(tm)[("h",)].shape == (7, H)
    check_steps(tm, cell_reference(cell, torch.zeros(7, H)), inputs(batch=7), F32_TOL)


def test_dynamic_batch_for_rnn_and_buffer_state():
    tm = run_rnn(nn.LSTM, 2, False, True, torch.float32, F32_TOL)
    rnn = tm.torch_module
    tm.init_state(2)
    zero = torch.zeros(2, 2, H)
    check_steps(tm, rnn_reference(rnn, (zero, zero.clone())), inputs(batch=2), F32_TOL)

    model = LIFNetwork(batch=B)
    tm = from_torch(model, (torch.randn(B, I),))
    tm.reset_state(6)
    model.lif.v = torch.zeros(6, 6)
    check_steps(tm, buffer_reference(model, ["lif.v"]), [2 * x for x in inputs(batch=6)], F32_TOL)


def test_batch_one_example_is_dynamic():
    tm = from_torch(nn.LSTMCell(I, H), (torch.randn(1, I),))
    assert tm.exported.dynamic_batch
    tm.reset_state(4)
    assert tm.update(jnp.ones((4, I))).shape == (4, H)


class _StaticBatchCell(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = nn.GRUCell(I, H)
        self.register_buffer("bias_state", torch.randn(B, H))

    def forward(self, x, h):
        h = self.cell(x, h) + self.bias_state
        return h.sum(-1), h


def test_static_batch_gives_clear_errors():
    tm = from_torch(_StaticBatchCell(), (torch.randn(B, I), torch.zeros(B, H)))
    assert not tm.exported.dynamic_batch
    with pytest.raises(ValueError, match=rf"static batch size of {B}.*batch size 5"):
        tm.update(jnp.ones((5, I)))
    with pytest.raises(ValueError, match=rf"static batch size of {B}.*batch size 5"):
        tm.reset_state(5)
    tm.update(jnp.ones((B, I)))


def test_batch_mismatch_with_hidden_state_asks_for_reset():
    tm = from_torch(nn.GRUCell(I, H), (torch.randn(B, I),))
    with pytest.raises(ValueError, match=r"reset_state\(5\)"):
        tm.update(jnp.ones((5, I)))


def test_init_state_restores_example_values():
    h0 = 0.3 * torch.ones(B, H)
    tm = from_torch(nn.GRUCell(I, H), (torch.randn(B, I), h0))
    tm.update(jnp.ones((B, I)))
    tm.init_state()
    assert_close(hidden(tm)[("h",)], h0, 0)
    tm.reset_state(2)
    assert_close(hidden(tm)[("h",)], 0.3 * torch.ones(2, H), 0)


def test_per_row_example_state_cannot_be_resized():
    tm = from_torch(nn.GRUCell(I, H), (torch.randn(B, I), torch.randn(B, H)))
    with pytest.raises(ValueError, match="per batch row"):
        tm.reset_state(4)


# ----------------------------------------------------------------------------- torch side


def test_module_type_paths_and_torch_parameters():
    model = GRUReadout()
    tm = from_torch(model, (torch.randn(B, I), torch.zeros(B, H)))
    assert isinstance(tm, TorchModule) and isinstance(tm, brainstate.nn.Module)
    params = tm.torch_parameters()
    assert set(params) == param_paths(model)
    assert params[("gru", "weight_ih")] is model.gru.weight_ih
    for path, state in tm.states(brainstate.ParamState).items():
        assert_close(state.value, params[path], 0)


def test_sync_from_torch_after_optimizer_step():
    model = GRUReadout()
    tm = from_torch(model, (torch.randn(B, I), torch.zeros(B, H)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    model.readout.weight.data = torch.zeros(3, H)  # replaced, not in place
    tm.sync_from_torch()
    for path, state in tm.states(brainstate.ParamState).items():
        assert_close(state.value, tm.torch_parameters()[path], 0)


def test_float64_model_with_x64_off_refused():
    assert not jax.config.read("jax_enable_x64")
    with pytest.raises(TypeError, match="jax_enable_x64.*float32"):
        from_torch(nn.GRUCell(I, H).double(), (torch.randn(B, I, dtype=torch.float64),))


@pytest.mark.parametrize(
    "model", [nn.GRU(I, H, bidirectional=True), nn.Sequential(nn.Linear(I, H), nn.Dropout(0.1))]
)
def test_refusals_surface_through_from_torch(model):
    with pytest.raises(UnsupportedModelError):
        from_torch(model, (torch.randn(B, I),))


def test_example_step_inputs_follow_update_signature():
    tm = from_torch(nn.LSTM(I, H, batch_first=True), (torch.randn(B, 1, I),))
    (x,) = tm.example_step_inputs()
    assert x.shape == (B, I)
    (x,) = tm.example_step_inputs(6)
    assert x.shape == (6, I) and x.dtype == jnp.float32
    tm = from_torch(StackedLSTM(), (torch.randn(B, I), *[torch.zeros(B, H)] * 4))
    assert [a.shape for a in tm.example_step_inputs(2)] == [(2, I)]
