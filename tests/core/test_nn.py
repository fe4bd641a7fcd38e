"""Layers of etrace_core.nn: forward formulas, torch equivalence, states, gradients, jaxpr shape."""

import math

import brainstate
import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from etrace_core import nn

TIGHT = dict(rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- helpers


def rand(key, *shape, scale=1.0):
    return scale * jax.random.normal(jax.random.PRNGKey(key), shape, dtype=jnp.result_type(float))


def params_of(model):
    """``{path: ParamState}`` of a model."""
    return dict(model.states(brainstate.ParamState).items())


def param_values(model):
    return {path: s.value for path, s in params_of(model).items()}


def set_values(model, values):
    states = dict(model.states().items())
    for path, value in values.items():
        states[path].value = jnp.asarray(value)


def pure_step(model):
    """``(step, values)``: ``step(values, x) -> (y, new_values)``, a pure function of ``{path: array}``."""
    graphdef, tree = brainstate.graph.treefy_split(model)
    flat = tree.to_flat()

    def step(values, x):
        new_tree = type(tree).from_flat({p: flat[p].replace(value=values[p]) for p in flat})
        clone = brainstate.graph.treefy_merge(graphdef, new_tree)
        y = clone(x)
        return y, {path: state.value for path, state in clone.states().items()}

    return step, {path: state.value for path, state in flat.items()}


def t2j(tensor):
    return jnp.asarray(tensor.detach().numpy())


def flat_eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jcore.jaxprs_in_params(eqn.params):
            yield from flat_eqns(sub)


# ---------------------------------------------------------------- names and init


def test_valina_alias_is_same_class():
    assert nn.ValinaRNNCell is nn.VanillaRNNCell


def test_state_paths_one_param_state_per_tensor():
    cell = nn.GRUCell(3, 4)
    brainstate.nn.init_all_states(cell)
    assert set(cell.states().keys()) == {
        ("W_ih", "weight"),
        ("W_ih", "bias"),
        ("W_hh", "weight"),
        ("W_hh", "bias"),
        ("h",),
    }
    assert isinstance(cell.h, brainstate.HiddenState)
    assert all(isinstance(s, brainstate.ParamState) for s in params_of(cell).values())
    assert cell.W_ih.weight.value.shape == (3, 12)
    assert cell.W_hh.weight.value.shape == (4, 12)
    assert set(params_of(nn.VanillaRNNCell(3, 4))) == {
        ("W_ih", "weight"),
        ("W_ih", "bias"),
        ("W_hh", "weight"),
    }
    assert set(params_of(nn.LIF(3, 4))) == {("W_in", "weight")}
    assert set(params_of(nn.LIF(3, 4, recurrent=True))) == {("W_in", "weight"), ("W_rec", "weight")}
    assert set(params_of(nn.LeakyRateReadout(3, 4))) == {("W", "weight")}


def test_key_makes_init_deterministic():
    a, b, c = nn.LSTMCell(5, 6, key=1), nn.LSTMCell(5, 6, key=1), nn.LSTMCell(5, 6, key=2)
    for path, value in param_values(a).items():
        np.testing.assert_array_equal(value, param_values(b)[path])
        assert not np.allclose(value, param_values(c)[path])
    w_ih, w_hh = a.W_ih.weight.value, a.W_hh.weight.value
    assert not np.allclose(w_ih[:5], w_hh[:5])


def test_default_init_follows_torch_bounds():
    lin = nn.Linear(16, 8, key=0)
    assert float(jnp.max(jnp.abs(lin.weight.value))) <= 1 / 4
    assert float(jnp.max(jnp.abs(lin.bias.value))) <= 1 / 4
    gru = nn.GRUCell(100, 4, key=0)
    assert float(jnp.max(jnp.abs(gru.W_ih.weight.value))) <= 1 / 2
    assert float(jnp.max(jnp.abs(gru.W_ih.weight.value))) > 1 / 10
    conv = nn.Conv2d(2, 3, 3, groups=1, key=0)
    assert float(jnp.max(jnp.abs(conv.weight.value))) <= 1 / math.sqrt(18)


def test_custom_initialisers_and_arrays():
    lin = nn.Linear(3, 2, w_init=nn.init.constant(0.5), b_init=nn.init.zeros)
    np.testing.assert_array_equal(lin.weight.value, np.full((3, 2), 0.5))
    np.testing.assert_array_equal(lin.bias.value, np.zeros(2))
    lin = nn.Linear(2, 2, w_init=jnp.eye(2), bias=False)
    assert lin.bias is None
    np.testing.assert_array_equal(lin(jnp.array([1.0, 2.0])), [1.0, 2.0])
    with pytest.raises(ValueError):
        nn.Linear(2, 3, w_init=jnp.eye(2))


def test_dtype_follows_x64():
    assert nn.Linear(2, 3).weight.value.dtype == jnp.float32
    cell = nn.GRUCell(2, 3)
    brainstate.nn.init_all_states(cell)
    assert cell.h.value.dtype == jnp.float32


def test_dtype_float64_under_x64(x64):
    assert nn.Linear(2, 3).weight.value.dtype == jnp.float64
    lif = nn.LIF(2, 3)
    brainstate.nn.init_all_states(lif)
    assert lif.V.value.dtype == jnp.float64


# ---------------------------------------------------------------- states

STATEFUL = [
    (lambda: nn.VanillaRNNCell(3, 5), ("h",)),
    (lambda: nn.GRUCell(3, 5), ("h",)),
    (lambda: nn.LSTMCell(3, 5), ("h", "c")),
    (lambda: nn.LeakyRNNCell(3, 5), ("h",)),
    (lambda: nn.LIF(3, 5, recurrent=True), ("V", "a")),
    (lambda: nn.LeakyRateReadout(3, 5), ("r",)),
]


@pytest.mark.parametrize("make, names", STATEFUL)
def test_init_reset_state_shapes_and_batched_inputs(make, names):
    model = make()
    brainstate.nn.init_all_states(model)
    for name in names:
        assert getattr(model, name).value.shape == (5,)
        assert isinstance(getattr(model, name), brainstate.HiddenState)
    assert model(jnp.ones(3)).shape == (5,)

    brainstate.nn.init_all_states(model, 4)
    for name in names:
        assert getattr(model, name).value.shape == (4, 5)
    assert model(jnp.ones((4, 3))).shape == (4, 5)

    held = [getattr(model, name) for name in names]
    brainstate.nn.reset_all_states(model, 4)
    for name, state in zip(names, held):
        assert getattr(model, name) is state
        np.testing.assert_array_equal(state.value, np.zeros((4, 5)))
    brainstate.nn.reset_all_states(model)
    assert all(getattr(model, name).value.shape == (5,) for name in names)


def test_batched_equals_per_sample():
    cell = nn.LSTMCell(3, 4, key=0)
    xs = rand(1, 2, 2, 3)
    brainstate.nn.init_all_states(cell, 2)
    batched = [cell(xs[0]), cell(xs[1])]
    for b in range(2):
        brainstate.nn.init_all_states(cell)
        single = [cell(xs[0, b]), cell(xs[1, b])]
        for t in range(2):
            np.testing.assert_allclose(batched[t][b], single[t], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- forward vs formula


@settings(max_examples=10, deadline=None)
@given(
    n_in=st.integers(1, 6),
    n_out=st.integers(1, 6),
    batch=st.sampled_from([(), (2,), (2, 3)]),
    bias=st.booleans(),
)
def test_linear_matches_formula(n_in, n_out, batch, bias):
    lin = nn.Linear(n_in, n_out, bias=bias, key=n_in * 7 + n_out)
    x = rand(0, *batch, n_in)
    expected = x @ lin.weight.value + (lin.bias.value if bias else 0.0)
    np.testing.assert_allclose(lin(x), expected, rtol=1e-5, atol=1e-6)


def _leaky_ref(p, h, x, decay, recurrent):
    drive = x @ p[("W_in", "weight")] + p[("W_in", "bias")]
    if recurrent:
        drive = drive + h @ p[("W_hh", "weight")]
    return decay * h + (1 - decay) * jnp.tanh(drive)


@pytest.mark.parametrize("recurrent", [False, True])
def test_leaky_rnn_matches_formula(x64, recurrent):
    cell = nn.LeakyRNNCell(3, 4, tau=4.0, recurrent=recurrent, key=0)
    brainstate.nn.init_all_states(cell, 2)
    p = param_values(cell)
    h = jnp.zeros((2, 4))
    for t in range(3):
        x = rand(t, 2, 3)
        h = _leaky_ref(p, h, x, math.exp(-1 / 4), recurrent)
        np.testing.assert_allclose(cell(x), h, **TIGHT)


def test_leaky_rate_readout_matches_formula(x64):
    ro = nn.LeakyRateReadout(3, 2, tau=3.0, dt=0.5, key=0)
    brainstate.nn.init_all_states(ro)
    d = math.exp(-0.5 / 3.0)
    r = jnp.zeros(2)
    for t in range(3):
        x = rand(t, 3)
        r = d * r + (1 - d) * (x @ ro.W.weight.value)
        np.testing.assert_allclose(ro(x), r, **TIGHT)


def _lif_ref(p, V, a, x, *, alpha, rho, beta, thr, recurrent, detach_reset):
    s = nn.spike_fn((V - thr - beta * a) / thr)
    current = x @ p[("W_in", "weight")]
    if recurrent:
        current = current + s @ p[("W_rec", "weight")]
    reset = jax.lax.stop_gradient(s) if detach_reset else s
    V = alpha * V + (1 - alpha) * current - thr * reset
    a = rho * a + s
    return nn.spike_fn((V - thr - beta * a) / thr), V, a


LIF_CONFIGS = [
    dict(beta=0.0, recurrent=False, detach_reset=False),
    dict(beta=0.5, recurrent=False, detach_reset=True),
    dict(beta=0.3, recurrent=True, detach_reset=False),
]


def _lif(cfg, key=0):
    return nn.LIF(
        3,
        4,
        tau_mem=10.0,
        tau_adapt=50.0,
        threshold=0.8,
        dt=1.0,
        key=key,
        w_init=nn.init.uniform(0.0, 4.0),
        w_rec_init=nn.init.uniform(-1.0, 1.0),
        **cfg,
    )


def _lif_kwargs(cfg):
    return dict(alpha=math.exp(-1 / 10.0), rho=math.exp(-1 / 50.0), thr=0.8, **cfg)


@pytest.mark.parametrize("cfg", LIF_CONFIGS)
def test_lif_matches_formula(x64, cfg):
    lif = _lif(cfg)
    brainstate.nn.init_all_states(lif, 2)
    p = param_values(lif)
    V, a = jnp.zeros((2, 4)), jnp.zeros((2, 4))
    n_spikes = 0.0
    for t in range(6):
        x = jnp.abs(rand(t, 2, 3))
        out, V, a = _lif_ref(p, V, a, x, **_lif_kwargs(cfg))
        np.testing.assert_allclose(lif(x), out, **TIGHT)
        np.testing.assert_allclose(lif.V.value, V, **TIGHT)
        np.testing.assert_allclose(lif.a.value, a, **TIGHT)
        n_spikes += float(out.sum())
    assert n_spikes > 0


# ---------------------------------------------------------------- torch equivalence


def _torch_cell(kind, n_in, n_out):
    torch.manual_seed(0)
    return {"rnn": torch.nn.RNNCell, "gru": torch.nn.GRUCell, "lstm": torch.nn.LSTMCell}[kind](
        n_in, n_out
    ).double()


def _copy_torch_cell(kind, tc, cell):
    values = {("W_ih", "weight"): t2j(tc.weight_ih).T, ("W_hh", "weight"): t2j(tc.weight_hh).T}
    if kind == "rnn":
        values[("W_ih", "bias")] = t2j(tc.bias_ih + tc.bias_hh)
    else:
        values[("W_ih", "bias")] = t2j(tc.bias_ih)
        values[("W_hh", "bias")] = t2j(tc.bias_hh)
    set_values(cell, values)


@pytest.mark.parametrize(
    "kind, cls", [("rnn", nn.VanillaRNNCell), ("gru", nn.GRUCell), ("lstm", nn.LSTMCell)]
)
@pytest.mark.parametrize("batch", [None, 3])
def test_cells_match_torch(x64, kind, cls, batch):
    n_in, n_out = 5, 4
    tc = _torch_cell(kind, n_in, n_out)
    cell = cls(n_in, n_out)
    brainstate.nn.init_all_states(cell, batch)
    _copy_torch_cell(kind, tc, cell)

    lead = () if batch is None else (batch,)
    g = torch.Generator().manual_seed(1)
    h = torch.randn(*lead, n_out, generator=g, dtype=torch.float64)
    c = torch.randn(*lead, n_out, generator=g, dtype=torch.float64)
    cell.h.value = t2j(h)
    if kind == "lstm":
        cell.c.value = t2j(c)
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(*lead, n_in, generator=g, dtype=torch.float64)
            if kind == "lstm":
                h, c = tc(x, (h, c))
            else:
                h = tc(x, h)
            np.testing.assert_allclose(cell(t2j(x)), h.numpy(), **TIGHT)
            if kind == "lstm":
                np.testing.assert_allclose(cell.c.value, c.numpy(), **TIGHT)


CONV_CASES = [
    dict(stride=1, padding="SAME", dilation=1, groups=1),
    dict(stride=2, padding=1, dilation=1, groups=1),
    dict(stride=1, padding="VALID", dilation=2, groups=2),
    dict(stride=(2, 1), padding=(1, 2), dilation=1, groups=1),
]


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_matches_torch(x64, dims, case):
    case = dict(case)
    if dims == 1 and isinstance(case["stride"], tuple):
        case.update(stride=case["stride"][0], padding=case["padding"][0])
    torch_padding = case["padding"].lower() if isinstance(case["padding"], str) else case["padding"]
    tconv = (torch.nn.Conv1d if dims == 1 else torch.nn.Conv2d)(
        4,
        6,
        3,
        stride=case["stride"],
        padding=torch_padding,
        dilation=case["dilation"],
        groups=case["groups"],
    ).double()
    conv = (nn.Conv1d if dims == 1 else nn.Conv2d)(4, 6, 3, **case)
    assert conv.weight.value.shape == tuple(tconv.weight.shape)
    set_values(conv, {("weight",): t2j(tconv.weight), ("bias",): t2j(tconv.bias)})
    x = torch.randn(2, 4, *([9] * dims), dtype=torch.float64)
    with torch.no_grad():
        expected = tconv(x).numpy()
    np.testing.assert_allclose(conv(t2j(x)), expected, **TIGHT)
    np.testing.assert_allclose(conv(t2j(x[0])), expected[0], **TIGHT)


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
def test_conv_without_bias(x64):
    tconv = torch.nn.Conv2d(2, 3, (3, 2), padding="same", bias=False).double()
    conv = nn.Conv2d(2, 3, (3, 2), padding="same", bias=False)
    assert conv.bias is None
    conv.weight.value = t2j(tconv.weight)
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64)
    with torch.no_grad():
        np.testing.assert_allclose(conv(t2j(x)), tconv(x).numpy(), **TIGHT)


# ---------------------------------------------------------------- gradients


def _gru_ref(p, h, x):
    gi = x @ p[("W_ih", "weight")] + p[("W_ih", "bias")]
    gh = h @ p[("W_hh", "weight")] + p[("W_hh", "bias")]
    gi_r, gi_z, gi_n = jnp.split(gi, 3, axis=-1)
    gh_r, gh_z, gh_n = jnp.split(gh, 3, axis=-1)
    r, z = jax.nn.sigmoid(gi_r + gh_r), jax.nn.sigmoid(gi_z + gh_z)
    n = jnp.tanh(gi_n + r * gh_n)
    return (1 - z) * n + z * h


def _check_grads(model, batch, xs, ref_loss):
    """brainstate.transform.grad over the model's ParamStates equals jax.grad of ``ref_loss``."""
    params = params_of(model)

    def loss():
        brainstate.nn.reset_all_states(model, batch)
        return sum(jnp.sum(jnp.sin(model(x))) for x in xs)

    grads = brainstate.transform.grad(loss, grad_states=params)()
    expected = jax.grad(ref_loss)({path: s.value for path, s in params.items()})
    assert set(grads) == set(expected)
    nonzero = 0
    for path in expected:
        np.testing.assert_allclose(grads[path], expected[path], **TIGHT)
        nonzero += int(jnp.any(expected[path] != 0))
    assert nonzero == len(expected)


def test_gru_grad_matches_reference(x64):
    cell = nn.GRUCell(3, 4, key=0)
    brainstate.nn.init_all_states(cell, 2)
    xs = [rand(t, 2, 3) for t in range(3)]

    def ref_loss(p):
        h, total = jnp.zeros((2, 4)), 0.0
        for x in xs:
            h = _gru_ref(p, h, x)
            total = total + jnp.sum(jnp.sin(h))
        return total

    _check_grads(cell, 2, xs, ref_loss)


@pytest.mark.parametrize("cfg", LIF_CONFIGS)
def test_lif_grad_matches_reference(x64, cfg):
    lif = _lif(cfg)
    brainstate.nn.init_all_states(lif)
    xs = [jnp.abs(rand(t, 3)) for t in range(6)]

    def ref_loss(p):
        V, a, total = jnp.zeros(4), jnp.zeros(4), 0.0
        for x in xs:
            out, V, a = _lif_ref(p, V, a, x, **_lif_kwargs(cfg))
            total = total + jnp.sum(jnp.sin(out))
        return total

    _check_grads(lif, None, xs, ref_loss)


def test_lif_detach_reset_changes_gradient(x64):
    grads = []
    for detach in (False, True):
        lif = _lif(dict(beta=0.0, recurrent=False, detach_reset=detach))
        brainstate.nn.init_all_states(lif)
        xs = [jnp.abs(rand(t, 3)) for t in range(6)]

        def loss():
            brainstate.nn.reset_all_states(lif)
            return sum(jnp.sum(lif(x)) for x in xs)

        grads.append(
            brainstate.transform.grad(loss, grad_states=params_of(lif))()[("W_in", "weight")]
        )
    assert not np.allclose(grads[0], grads[1])


# ---------------------------------------------------------------- surrogates


def test_spike_fn_forward_is_heaviside():
    x = jnp.array([-2.0, -1e-6, 0.0, 1e-6, 3.0])
    np.testing.assert_array_equal(nn.spike_fn(x), [0.0, 0.0, 0.0, 1.0, 1.0])
    np.testing.assert_array_equal(nn.sigmoid_surrogate(x), [0.0, 0.0, 0.0, 1.0, 1.0])
    assert nn.spike_fn(x).dtype == x.dtype


@settings(max_examples=20, deadline=None)
@given(x=st.floats(-5, 5), alpha=st.floats(0.5, 20))
def test_spike_fn_derivative_is_fast_sigmoid(x, alpha):
    x = jnp.float32(x)
    np.testing.assert_allclose(
        jax.grad(nn.spike_fn)(x, alpha), 1 / (alpha * abs(x) + 1) ** 2, rtol=1e-5
    )
    s = jax.nn.sigmoid(alpha * x)
    np.testing.assert_allclose(
        jax.grad(nn.sigmoid_surrogate)(x, alpha), alpha * s * (1 - s), rtol=1e-4, atol=1e-7
    )


def test_spike_fn_default_alpha_and_modes_agree():
    x = jnp.linspace(-1.0, 1.0, 7)
    expected = jnp.diag(1 / (10.0 * jnp.abs(x) + 1) ** 2)
    np.testing.assert_allclose(jax.jacfwd(nn.spike_fn)(x), expected, rtol=1e-6)
    np.testing.assert_allclose(jax.jacrev(nn.spike_fn)(x), expected, rtol=1e-6)
    _, tangent = jax.jvp(nn.spike_fn, (x,), (jnp.ones_like(x),))
    np.testing.assert_allclose(tangent, jnp.diag(expected), rtol=1e-6)


# ---------------------------------------------------------------- structure for the online compiler


def _param_vars(jaxpr, values, model):
    """Input vars of ``jaxpr`` (traced from ``pure_step``) that hold ParamStates."""
    params = params_of(model)
    return {v for v, path in zip(jaxpr.invars, sorted(values)) if path in params}


@pytest.mark.parametrize(
    "make, x, n_ops",
    [
        (lambda: nn.GRUCell(3, 4), jnp.ones((2, 3)), 2),
        (lambda: nn.LSTMCell(3, 4), jnp.ones(3), 2),
        (lambda: nn.VanillaRNNCell(3, 4), jnp.ones(3), 2),
        (lambda: nn.LIF(3, 4, recurrent=True, beta=0.2), jnp.ones(3), 2),
        (lambda: nn.LeakyRateReadout(3, 4), jnp.ones(3), 1),
    ],
)
def test_weights_only_reach_etp_matmul(make, x, n_ops):
    model = make()
    brainstate.nn.init_all_states(model, *x.shape[:-1])
    step, values = pure_step(model)
    closed = jax.make_jaxpr(step)(values, x)
    eqns = list(flat_eqns(closed.jaxpr))
    names = [e.primitive.name for e in eqns]
    assert names.count("etp_matmul") == n_ops
    assert "dot_general" not in names
    weights = _param_vars(closed.jaxpr, values, model)
    assert len(weights) == len(params_of(model))
    for eqn in closed.jaxpr.eqns:
        if any(v in weights for v in eqn.invars if isinstance(v, jcore.Var)):
            assert eqn.primitive.name == "etp_matmul"


def test_conv_uses_etp_conv():
    conv = nn.Conv2d(2, 3, 3)
    step, values = pure_step(conv)
    names = [
        e.primitive.name
        for e in flat_eqns(jax.make_jaxpr(step)(values, jnp.ones((1, 2, 5, 5))).jaxpr)
    ]
    assert names.count("etp_conv") == 1
    assert "conv_general_dilated" not in names


def _state_jacobian(model, names, n):
    """``{(out, in): d out'/d in}`` over the named hidden states of an unbatched model, each (n, n)."""
    brainstate.nn.init_all_states(model)
    step, values = pure_step(model)
    x = jnp.abs(rand(7, model.in_size[0])) * 2.0
    paths = [(name,) for name in names]

    def next_states(hidden):
        _, new_values = step({**values, **hidden}, x)
        return {p: new_values[p] for p in paths}

    hidden = {p: jnp.linspace(0.2, 1.4, n) + 0.1 * k for k, p in enumerate(paths)}
    jac = jax.jacobian(next_states)(hidden)
    return {(out, inp): np.asarray(jac[out][inp]) for out in paths for inp in paths}


def _is_block_diagonal_per_unit(jac, n):
    """Every d(state_k')/d(state_j) block is diagonal in the unit index."""
    off = ~np.eye(n, dtype=bool)
    return all(np.all(block[off] == 0) for block in jac.values())


@pytest.mark.parametrize("beta", [0.0, 0.4])
def test_lif_without_recurrence_is_element_wise_per_neuron(x64, beta):
    n = 5
    lif = nn.LIF(3, n, beta=beta, threshold=1.0, key=0, w_init=nn.init.uniform(0.0, 2.0))
    jac = _state_jacobian(lif, ("V", "a"), n)
    assert _is_block_diagonal_per_unit(jac, n)
    assert all(np.any(np.diag(jac[(p, p)]) != 0) for p in (("V",), ("a",)))

    rec = nn.LIF(3, n, beta=beta, recurrent=True, key=0, w_init=nn.init.uniform(0.0, 2.0))
    assert not _is_block_diagonal_per_unit(_state_jacobian(rec, ("V", "a"), n), n)


def test_leaky_rnn_without_recurrence_is_element_wise(x64):
    assert _is_block_diagonal_per_unit(_state_jacobian(nn.LeakyRNNCell(3, 4, key=0), ("h",), 4), 4)
    assert not _is_block_diagonal_per_unit(
        _state_jacobian(nn.LeakyRNNCell(3, 4, recurrent=True, key=0), ("h",), 4), 4
    )
