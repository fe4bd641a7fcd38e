"""Stock snntorch, spikingjelly, norse and sinabs models train online, unchanged.

Each model is built as the library's docs/tutorials build it (stock neurons, stock surrogates,
which are `torch.autograd.Function`s). For each: it converts (the conversion checks itself);
20 steps match torch eagerly (float32, 1e-5); D-RTRL equals torch BPTT (`bptt_gradients`) to
1e-10 in float64 for the weights whose recurrence is element-wise; ES-D-RTRL training with a
torch optimizer lowers the loss. A test skips with the reason when its library is absent.
Install: `pip install --no-deps` the extra `snn` of pyproject.toml.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import NamedTuple

import brainstate
import numpy as np
import pytest
import torch
from torch import nn

from etrace_bridge import OnlineLearner, bptt_gradients, compare_gradients, from_torch
from etrace_bridge.arrays import import_tensor

B, I, H, O = 3, 5, 6, 4
T_PARITY, T_GRAD = 20, 12
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
F32_SPIKES = 3e-7  # a few float32 roundings at the spikes, accumulated over T_GRAD steps
# sinabs' SingleSpike returns `.float()` spikes also in a float64 network, and its reset
# subtracts them from v_mem: the gradient is rounded to float32 at the spikes, in torch itself.
# BPTT rounds the sum (this step's loss + later steps via the reset) there, D-RTRL only this
# step's part (the rest travels in the float64 trace), so they agree to float32 rounding there.


def _needs(module: str):
    return pytest.mark.skipif(
        importlib.util.find_spec(module) is None,
        reason=f"{module} is not installed (pip install --no-deps the "
        "`snn` extra of pyproject.toml)",
    )


class Case(NamedTuple):
    """A library model: `build()` -> (module, example inputs); what D-RTRL makes exact."""

    library: str
    build: Callable
    exact: tuple[str, ...]  # parameters whose D-RTRL gradient equals BPTT today
    elementwise: tuple[str, ...]  # learnable decays etc. (exact once core8 lands)
    output: int | None = None  # the output the loss applies to (tuple outputs)
    float64: bool = True  # snntorch's surrogates return float32 spikes (`.float()`):
    # a float64 snntorch network fails in torch itself
    f32_spikes: bool = False  # float32 spikes feed the state (sinabs reset): see F32_SPIKES


# ----------------------------------------------------------------------------- models


def snntorch_leaky():
    """snntorch tutorial 5: Linear -> Leaky -> Linear -> Leaky, membranes passed explicitly."""
    import snntorch as snn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(I, H)
            self.lif1 = snn.Leaky(beta=0.95)
            self.fc2 = nn.Linear(H, O)
            self.lif2 = snn.Leaky(beta=0.95)

        def forward(self, x, mem1, mem2):
            cur1 = self.fc1(x)
            spk1, mem1 = self.lif1(cur1, mem1)
            cur2 = self.fc2(spk1)
            spk2, mem2 = self.lif2(cur2, mem2)
            return spk2, mem1, mem2

    net = Net()
    return net, (torch.randn(B, I), net.lif1.init_leaky(), net.lif2.init_leaky())


def snntorch_sequential():
    """snntorch tutorial 6/7: nn.Sequential with init_hidden=True, output=True on the last."""
    import snntorch as snn

    net = nn.Sequential(
        nn.Linear(I, H),
        snn.Leaky(beta=0.9, init_hidden=True),
        nn.Linear(H, O),
        snn.Leaky(beta=0.9, init_hidden=True, output=True),
    )
    return net, (torch.randn(B, I),)


def snntorch_synaptic():
    import snntorch as snn

    net = nn.Sequential(
        nn.Linear(I, H),
        snn.Synaptic(
            alpha=0.9, beta=0.8, learn_alpha=True, learn_beta=True, init_hidden=True, output=True
        ),
    )
    return net, (torch.randn(B, I),)


def snntorch_rleaky():
    import snntorch as snn

    net = nn.Sequential(
        nn.Linear(I, H), snn.RLeaky(beta=0.9, linear_features=H, init_hidden=True, output=True)
    )
    return net, (torch.randn(B, I),)


def spikingjelly_lif(parametric: bool = False):
    """spikingjelly's single-step tutorial: layer.Linear -> LIFNode(ATan, detach_reset)."""
    from spikingjelly.activation_based import layer, neuron, surrogate

    node = (
        neuron.ParametricLIFNode(surrogate_function=surrogate.ATan(), detach_reset=True)
        if parametric
        else neuron.LIFNode(tau=2.0, surrogate_function=surrogate.ATan(), detach_reset=True)
    )
    return nn.Sequential(layer.Linear(I, H), node), (torch.randn(B, I),)


def norse_lif():
    """norse: Linear -> LIFCell, state passed explicitly (`z, s = cell(x, s)`)."""
    from norse.torch import LIFCell

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(I, H)
            self.lif = LIFCell()

        def forward(self, x, state):
            return self.lif(self.fc(x), state)

    net = Net()
    x = torch.randn(B, I)
    return net, (x, net.lif.initial_state(torch.zeros(B, H)))


def norse_recurrent():
    from norse.torch import LIFRecurrentCell

    net = LIFRecurrentCell(I, H)
    x = torch.randn(B, I)
    return net, (x, net.initial_state(x))


def sinabs_layer(kind: str):
    """sinabs: Linear -> LIF / IAF / LIF with synaptic current; input (batch, time=1, ...)."""
    import sinabs.layers as sl

    neuron = {
        "lif": lambda: sl.LIF(tau_mem=10.0),
        "iaf": lambda: sl.IAF(),
        "syn": lambda: sl.LIF(tau_mem=10.0, tau_syn=5.0, train_alphas=True),
    }[kind]()
    return nn.Sequential(nn.Linear(I, H), neuron), (torch.randn(B, 1, I),)


CASES = {
    "snntorch-Leaky": Case(
        "snntorch", snntorch_leaky, ("fc2.weight", "fc2.bias"), (), float64=False
    ),
    "snntorch-Sequential": Case(
        "snntorch", snntorch_sequential, ("2.weight", "2.bias"), (), output=0, float64=False
    ),
    "snntorch-Synaptic": Case(
        "snntorch", snntorch_synaptic, ("0.weight", "0.bias"), ("1.alpha", "1.beta"), output=0
    ),
    "snntorch-RLeaky": Case("snntorch", snntorch_rleaky, (), (), output=0, float64=False),
    "spikingjelly-LIFNode": Case("spikingjelly", spikingjelly_lif, ("0.weight", "0.bias"), ()),
    "spikingjelly-ParametricLIFNode": Case(
        "spikingjelly", lambda: spikingjelly_lif(True), ("0.weight", "0.bias"), ("1.w",)
    ),
    "norse-LIFCell": Case("norse", norse_lif, ("fc.weight", "fc.bias"), ()),
    "norse-LIFRecurrentCell": Case("norse", norse_recurrent, (), ()),
    "sinabs-LIF": Case(
        "sinabs",
        lambda: sinabs_layer("lif"),
        ("0.weight", "0.bias"),
        ("1.tau_mem",),
        f32_spikes=True,
    ),
    "sinabs-IAF": Case(
        "sinabs", lambda: sinabs_layer("iaf"), ("0.weight", "0.bias"), (), f32_spikes=True
    ),  # spike_threshold is frozen (requires_grad=False)
    "sinabs-LIF-train_alphas": Case(
        "sinabs",
        lambda: sinabs_layer("syn"),
        ("0.weight", "0.bias"),
        ("1.alpha_mem", "1.alpha_syn"),
        f32_spikes=True,
    ),
}


def _params(names):
    return [pytest.param(n, marks=_needs(CASES[n].library), id=n) for n in names]


ALL = _params(CASES)


# ----------------------------------------------------------------------------- helpers


def _build(name: str, dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    net, args = CASES[name].build()
    net = net.to(dtype)
    args = tuple(_cast(a, dtype) for a in args)
    return net, args


def _cast(a, dtype):
    if isinstance(a, torch.Tensor):
        return a.to(dtype) if a.is_floating_point() else a
    if isinstance(a, tuple) and hasattr(a, "_fields"):
        return type(a)(*(_cast(t, dtype) for t in a))
    return a


def _sequence(args, steps: int, seed: int = 1, scale: float = 2.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = args[0]
    return (scale * torch.randn((steps, *x.shape), generator=gen, dtype=torch.float64)).to(x.dtype)


def _output(y, index):
    return y[index] if index is not None else y


def _torch_reference(net, args, xs, index):
    """Eager torch outputs over `xs` (forward(x, *state) or buffer/memory state), on copies."""
    from etrace_bridge.state_slots import swapped_slots

    outs = []
    state = tuple(args[1:])
    with torch.no_grad(), swapped_slots(net):
        for x in xs:
            out = net(x, *state)
            if state:
                out, state = out[0], tuple(out[1:])
            outs.append(_output(out, index))
    return outs


def _bptt_step(case: Case):
    """`step(module, x, state) -> (y, state)` for bptt_gradients."""

    def step(module, x, state):
        state = state or ()
        out = module(x, *state)
        if state:
            return out[0], tuple(out[1:])
        return _output(out, case.output), state

    return step


def _sized_state(tm, args):
    """The start state the converted module uses for forward(x, *state) models, as torch."""
    if len(args) < 2:
        return ()
    layout = tm._bridge.layout
    sized = []
    for i, a in enumerate(args[1:]):
        leaves = [
            layout.init[p][0].detach().clone()
            for p in layout.init
            if p[0] == _state_name(tm, i + 1)
        ]
        sized.append(type(a)(*leaves) if hasattr(a, "_fields") else leaves[0])
    return tuple(sized)


def _state_name(tm, position):
    import inspect

    params = list(inspect.signature(tm.torch_module.forward).parameters)
    return params[position]


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", ALL)
def test_converts_with_state_and_matches_torch_for_20_steps(name):
    net, args = _build(name)
    tm = from_torch(net, args)  # checks itself for 3 steps
    hidden = tm.states(brainstate.HiddenState)
    assert hidden, f"{name} converted without hidden state"
    case = CASES[name]
    xs = _sequence(args, T_PARITY)
    expected = _torch_reference(net, args, xs, case.output)
    tm.init_state()
    for t, x in enumerate(xs):
        y = _output(tm.update(import_tensor(x)), case.output)
        e = expected[t].numpy()
        err = float(np.max(np.abs(np.asarray(y) - e)))
        assert err <= 1e-5 * max(1.0, float(np.max(np.abs(e)))), f"step {t}: error {err}"


def _mse_in_target_dtype(y, target):
    """MSE computed in the target's dtype: snntorch and sinabs spikes are float32 (`.float()`)
    even in a float64 network, and a float32 loss would cap the comparison at float32."""
    return ((y.to(target.dtype) - target) ** 2).mean()


def _online_vs_bptt(name):
    case = CASES[name]
    dtype = torch.float64 if case.float64 else torch.float32
    net, args = _build(name, dtype)
    learner = OnlineLearner(
        net, algorithm="d_rtrl", loss=_mse_in_target_dtype, example_inputs=args, output=case.output
    )
    xs = _sequence(args, T_GRAD)
    y0 = _output(_torch_reference(net, args, xs[:1], case.output)[0], None)
    gen = torch.Generator().manual_seed(2)
    targets = torch.rand((T_GRAD, *y0.shape), generator=gen, dtype=torch.float64).to(dtype)
    start = _sized_state(learner.model, args)
    ref = bptt_gradients(
        net,
        xs,
        targets,
        _mse_in_target_dtype,
        state=start if start else None,
        step=_bptt_step(case),
    )
    net.zero_grad(set_to_none=True)
    loss = learner.run(xs, targets)
    online = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
    tol = F32_SPIKES if case.f32_spikes else TOL[dtype]
    assert abs(float(loss) - ref.loss) <= tol * max(1.0, abs(ref.loss))
    return online, ref, tol


EXACT = _params([n for n, c in CASES.items() if c.exact])
ELEMENTWISE = _params([n for n, c in CASES.items() if c.elementwise])


@pytest.mark.parametrize("name", EXACT)
def test_d_rtrl_equals_bptt_float64(name, x64):
    online, ref, tol = _online_vs_bptt(name)
    case = CASES[name]
    for n in case.exact:
        assert float(ref.grads[n].abs().max()) > 0, f"{n}: zero BPTT gradient, test is vacuous"
    report = compare_gradients(
        {n: online[n] for n in case.exact}, {n: ref.grads[n] for n in case.exact}
    )
    assert report.worst_rel_error <= tol, report.table()
    for n, g in online.items():
        assert torch.isfinite(g).all(), f"{n}: non-finite online gradient"


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_d_rtrl_learnable_decays_equal_bptt_float64(name, x64):
    online, ref, tol = _online_vs_bptt(name)
    names = CASES[name].elementwise
    report = compare_gradients({n: online[n] for n in names}, {n: ref.grads[n] for n in names})
    assert report.worst_rel_error <= tol, report.table()


@pytest.mark.parametrize("name", ALL)
def test_es_d_rtrl_training_lowers_the_loss(name):
    case = CASES[name]
    net, args = _build(name)
    xs = _sequence(args, 10)
    shape = _torch_reference(net, args, xs[:1], case.output)[0].shape
    gen = torch.Generator().manual_seed(3)
    targets = (torch.rand((10, *shape), generator=gen) < 0.3).float()
    learner = OnlineLearner(
        net,
        algorithm="es_d_rtrl",
        loss="mse",
        example_inputs=args,
        output=case.output,
        decay_or_rank=0.9,
    )
    opt = torch.optim.Adam(net.parameters(), lr=0.05 if case.library == "norse" else 0.02)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        learner.reset_state()
        losses.append(float(learner.run(xs, targets)))
        opt.step()
    assert all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < np.mean(losses[:3]), losses


# ----------------------------------------------------------------------------- Functions, checks


class _Scaled(torch.autograd.Function):
    """Three tensor inputs (one without gradient), two outputs, a non-tensor and a tensor ctx
    attribute, a None in save_for_backward, needs_input_grad."""

    @staticmethod
    def forward(ctx, x, w, offset, slope):
        ctx.save_for_backward(x, None)
        ctx.slope = slope
        ctx.w = w
        return (x > offset).to(x.dtype) * w, x * w

    @staticmethod
    def backward(ctx, g_spike, g_lin):
        x, _ = ctx.saved_tensors
        sg = ctx.slope / (1 + (ctx.slope * x) ** 2)
        gx = g_spike * sg * ctx.w + g_lin * ctx.w if ctx.needs_input_grad[0] else None
        gw = (g_spike * (x > 0).to(x.dtype) + g_lin * x).sum(0)
        return gx, gw, None, None


class _NewStyle(torch.autograd.Function):
    """forward without ctx + setup_context (spikingjelly's style)."""

    @staticmethod
    def forward(x, alpha):
        return (x >= 0).to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.alpha = inputs[1]

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * ctx.alpha * torch.sigmoid(ctx.alpha * x) * torch.sigmoid(-ctx.alpha * x), None


class _FunctionNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(I, H)
        self.gain = nn.Parameter(torch.rand(H) + 0.5)
        self.register_buffer("v", torch.zeros(B, H))

    def forward(self, x):
        v = 0.8 * self.v + self.fc(x)
        spk, lin = _Scaled.apply(v - 0.5, self.gain, torch.zeros(()), 4.0)
        spk2 = _NewStyle.apply(lin - 1.0, 3.0)
        self.v = v - spk
        return spk + 0.5 * spk2 + 0.1 * lin


def test_function_with_its_backward_matches_torch_autograd(x64):
    import jax
    import jax.numpy as jnp

    torch.manual_seed(0)
    net = _FunctionNet().double()
    x = 2 * torch.randn(B, I, dtype=torch.float64)
    assert len(from_torch(net, (x,)).exported.functions) == 2
    tm = from_torch(net, (x,))
    lowered = tm._bridge.lowered
    params = {n: import_tensor(p) for n, p in net.named_parameters()}
    v0 = torch.randn(B, H, dtype=torch.float64)

    def loss(p):
        out, new = lowered(p, {"v": import_tensor(v0)}, import_tensor(x))
        return jnp.sum(out * jnp.arange(H)) + jnp.sum(new["v"] ** 2)

    grads = jax.grad(loss)(params)
    net.v = v0.clone()
    out = net(x)
    ((out * torch.arange(H)).sum() + (net.v**2).sum()).backward()
    for n, p in net.named_parameters():
        assert float(p.grad.abs().max()) > 0
        np.testing.assert_allclose(np.asarray(grads[n]), p.grad.numpy(), rtol=1e-12, atol=1e-12)


def test_detach_stops_the_gradient(x64):
    import jax
    import jax.numpy as jnp

    class Detached(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(I, H)

        def forward(self, x):
            y = torch.sigmoid(self.fc(x))
            return y.detach() * y

    net = Detached().double()
    x = torch.randn(B, I, dtype=torch.float64)
    tm = from_torch(net, (x,))
    params = {n: import_tensor(p) for n, p in net.named_parameters()}
    g = jax.grad(lambda p: jnp.sum(tm._bridge.lowered(p, {}, import_tensor(x))[0]))(params)
    net(x).sum().backward()
    np.testing.assert_allclose(np.asarray(g["fc.weight"]), net.fc.weight.grad.numpy(), rtol=1e-12)


class _ItemFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * float(x.abs().max())  # a value taken out of the graph: cannot be captured

    @staticmethod
    def backward(ctx, g):
        return g


def test_function_that_cannot_be_captured_is_refused_by_name():
    from etrace_bridge.errors import BridgeError

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(I, H)

        def forward(self, x):
            return _ItemFunction.apply(self.fc(x))

    with pytest.raises(BridgeError) as info:
        from_torch(Net(), (torch.randn(B, I),))
    assert "_ItemFunction" in str(info.value)


def test_state_the_bridge_cannot_see_fails_the_self_check():
    from etrace_bridge.errors import ConversionCheckError

    class Hidden(nn.Module):
        """State in a Python list: torch.export bakes it in as a constant."""

        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(I, H)
            self.store = [torch.zeros(B, H)]

        def forward(self, x):
            v = 0.9 * self.store[0] + self.fc(x)
            self.store[0] = v.detach()
            return v

    with pytest.raises(ConversionCheckError) as info:
        from_torch(Hidden(), (torch.randn(B, I),))
    msg = str(info.value)
    assert "step 1" in msg and "output" in msg and "check=False" in msg
    from_torch(Hidden(), (torch.randn(B, I),), check=False)  # the switch-off


def test_wrong_lowering_fails_the_self_check():
    from etrace_bridge.errors import ConversionCheckError

    net = nn.Sequential(nn.Linear(I, H), nn.Tanh())
    with pytest.raises(ConversionCheckError, match="step 0"):
        from_torch(net, (torch.randn(B, I),), custom_ops={"aten::tanh": lambda x: x})


def test_check_leaves_the_torch_module_and_rng_alone():
    pytest.importorskip("snntorch")
    net, args = _build("snntorch-Sequential")
    before = {k: (v, v.shape) for k, v in net.named_buffers()}
    attrs = {n: set(vars(m)) for n, m in net.named_modules()}
    state = torch.random.get_rng_state()
    from_torch(net, args)
    assert torch.equal(state, torch.random.get_rng_state())
    assert {k: (v, v.shape) for k, v in net.named_buffers()} == before
    assert {n: set(vars(m)) for n, m in net.named_modules()} == attrs


@_needs("snntorch")
def test_tuple_output_needs_output_index():
    net, args = _build("snntorch-Sequential")
    with pytest.raises(ValueError, match="output=i"):
        OnlineLearner(net, algorithm="es_d_rtrl", loss="mse", example_inputs=args)
    with pytest.raises(ValueError, match="out of range"):
        OnlineLearner(net, algorithm="es_d_rtrl", loss="mse", example_inputs=args, output=2)


@_needs("snntorch")
def test_torch_loss_may_take_the_tuple():
    net, args = _build("snntorch-Sequential")

    def spike_loss(outputs, target):
        spk, mem = outputs
        return ((spk - target) ** 2).mean() + 0.01 * (mem**2).mean()

    learner = OnlineLearner(net, algorithm="es_d_rtrl", loss=spike_loss, example_inputs=args)
    xs = _sequence(args, 4)
    loss = learner.run(xs, torch.zeros(4, B, O))
    assert np.isfinite(float(loss))
    assert net[0].weight.grad is not None and torch.isfinite(net[0].weight.grad).all()


@_needs("snntorch")
def test_snntorch_after_a_users_warm_up_has_finite_exact_gradients():
    """issue 9's NaN report: after an eager warm-up (state sized, `reset` attribute present),
    snntorch's online gradients are finite and the traced weights equal BPTT."""
    net, args = _build("snntorch-Leaky")
    with torch.no_grad():
        net(*args)
    assert hasattr(net.lif1, "reset") and net.lif1.mem.numel() > 0
    case = CASES["snntorch-Leaky"]
    learner = OnlineLearner(net, algorithm="d_rtrl", loss="mse", example_inputs=args)
    xs = _sequence(args, 8)
    targets = torch.rand((8, B, O), generator=torch.Generator().manual_seed(5))
    start = _sized_state(learner.model, args)
    ref = bptt_gradients(net, xs, targets, "mse", state=start, step=_bptt_step(case))
    learner.run(xs, targets)
    for n, p in net.named_parameters():
        assert torch.isfinite(p.grad).all(), n
    report = compare_gradients(
        {n: net.get_parameter(n).grad for n in case.exact}, {n: ref.grads[n] for n in case.exact}
    )
    assert report.worst_rel_error <= TOL[torch.float32], report.table()
