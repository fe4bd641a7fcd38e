"""Built-in torch models, the spike custom op and its JAX twin."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from etrace_bridge.bptt import bptt_gradients
from etrace_bridge.compare.models import (
    SURROGATE_SCALE,
    GRUClassifier,
    LeakyRNN,
    LIFNet,
    LSTMClassifier,
    build_model,
    initial_state,
    spike_jax,
    spike_op,
)

T, B, N_IN, N_OUT, H = 5, 3, 4, 2, 6
NAMES = ["gru", "lstm", "lif", "leaky", "gru2"]


def _points():
    return torch.tensor([-2.0, -0.3, -1e-3, 0.0, 1e-3, 0.25, 1.7], dtype=torch.float64)


def test_spike_op_forward_backward_matches_formula():
    x = _points().requires_grad_(True)
    z = spike_op(x)
    assert z.dtype == torch.float64
    assert z.tolist() == [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    g = torch.linspace(0.5, 2.0, 7, dtype=torch.float64)
    (dx,) = torch.autograd.grad(z, x, g)
    torch.testing.assert_close(
        dx, g / (1 + SURROGATE_SCALE * x.detach().abs()) ** 2, rtol=0, atol=0
    )
    assert torch.ops.etrace.spike.default(x.detach()).tolist() == z.tolist()


def test_spike_op_opcheck():
    torch.library.opcheck(spike_op, (torch.randn(3, 4),))


def test_spike_jax_matches_torch_op(x64):
    x = _points()
    xt = x.clone().requires_grad_(True)
    z_t = spike_op(xt)
    (g_t,) = torch.autograd.grad(z_t.sum(), xt)
    xj = jnp.asarray(x.numpy())
    assert xj.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(spike_jax(xj)), z_t.detach().numpy(), rtol=0, atol=1e-12)
    g_j = jax.grad(lambda v: spike_jax(v).sum())(xj)
    np.testing.assert_allclose(np.asarray(g_j), g_t.numpy(), rtol=1e-12, atol=1e-12)
    _, jvp = jax.jvp(spike_jax, (xj,), (jnp.ones_like(xj),))
    np.testing.assert_allclose(np.asarray(jvp), g_t.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        np.asarray(jax.jit(jax.vmap(spike_jax))(xj[:, None]))[:, 0], z_t.detach().numpy()
    )


@pytest.mark.parametrize("name", NAMES)
def test_each_model_steps_and_has_bptt_gradients(name):
    torch.manual_seed(0)
    model = build_model(name, N_IN, N_OUT, n_hidden=H)
    state = initial_state(model, B)
    x = torch.rand(B, N_IN) * 3
    out = model(x, *state)
    y = out[0] if state else out
    assert y.shape == (B, N_OUT)
    if state:
        assert len(out) == len(state) + 1 and all(s.shape == (B, H) for s in out[1:])

    xs = torch.rand(T, B, N_IN) * 3
    targets = torch.randint(0, N_OUT, (T, B))
    res = bptt_gradients(model, xs, targets, "cross_entropy", state=initial_state(model, B))
    assert res.outputs.shape == (T, B, N_OUT)
    assert set(res.grads) == {n for n, _ in model.named_parameters()}
    assert all(torch.isfinite(g).all() for g in res.grads.values())
    assert res.grads["readout.weight"].abs().sum() > 0


def test_lif_dynamics_and_gradient_flow():
    torch.manual_seed(0)
    model = LIFNet(N_IN, H, N_OUT, recurrent=True, threshold=0.5)
    with torch.no_grad():
        model.input.weight.fill_(0.5)
        model.input.bias.zero_()
    model.reset_state(B)
    x = torch.ones(B, N_IN)
    out1 = model(x)
    assert torch.all(model.v == 2.0) and torch.all(model.z == 1.0)
    model(x)
    assert torch.allclose(
        model.v, model.decay_mem * 2.0 + 2.0 + model.recurrent.weight.sum(1) - 0.5
    )
    assert out1.shape == (B, N_OUT)
    with pytest.raises(ValueError, match="reset_state"):
        model(torch.ones(B + 1, N_IN))
    model.reset_state(B)
    res = bptt_gradients(
        model, torch.rand(T, B, N_IN), torch.randint(0, 2, (T, B)), "cross_entropy"
    )
    assert res.grads["input.weight"].abs().sum() > 0  # surrogate gradient reaches the input layer
    assert res.grads["recurrent.weight"].abs().sum() > 0
    assert torch.all(model.v == 0)  # bptt_gradients leaves the state buffers untouched


def test_lif_reset_state_follows_dtype():
    model = LIFNet(N_IN, H, N_OUT).double()
    model.reset_state(7)
    assert model.v.shape == (7, H) and model.v.dtype == torch.float64
    assert model.out.shape == (7, N_OUT)
    assert "v" not in model.state_dict()


def test_leaky_rnn_has_no_recurrent_weight():
    model = LeakyRNN(N_IN, H, N_OUT, alpha=0.5)
    assert {n for n, _ in model.named_parameters()} == {
        "input.weight",
        "input.bias",
        "readout.weight",
        "readout.bias",
    }
    x, h = torch.randn(B, N_IN), torch.randn(B, H)
    _, h1 = model(x, h)
    torch.testing.assert_close(h1, 0.5 * h + 0.5 * torch.tanh(model.input(x)))


def test_initial_state_shapes():
    assert [s.shape for s in initial_state(GRUClassifier(2, 5, 3), 4)] == [(4, 5)]
    assert [s.shape for s in initial_state(LSTMClassifier(2, 5, 3), 4)] == [(4, 5), (4, 5)]
    assert [s.shape for s in initial_state(LeakyRNN(2, 5, 3), 4)] == [(4, 5)]
    lif = LIFNet(2, 5, 3)
    assert initial_state(lif, 4) == () and lif.v.shape == (4, 5)
    with pytest.raises(TypeError):
        initial_state(torch.nn.Linear(2, 2), 4)


def test_build_model_unknown_name():
    with pytest.raises(ValueError, match="gru, lstm, lif, leaky"):
        build_model("transformer", 2, 2)
    assert build_model("lif", 2, 2, recurrent=True).recurrent is not None


def _export(model, batch):
    state = initial_state(model, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.export.export(model, (torch.rand(batch, N_IN), *state))


@pytest.mark.parametrize("name", NAMES)
def test_models_export(name):
    ep = _export(build_model(name, N_IN, N_OUT, n_hidden=H), B)
    assert len(ep.graph_signature.user_outputs) >= 1


@pytest.mark.parametrize("recurrent", [False, True])
def test_lif_export_records_buffer_mutations(recurrent):
    ep = _export(LIFNet(N_IN, H, N_OUT, recurrent=recurrent), B)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        decomposed = ep.run_decompositions()
    assert set(decomposed.graph_signature.buffers_to_mutate.values()) == {"v", "z", "out"}
    targets = {str(n.target) for n in decomposed.graph.nodes if n.op == "call_function"}
    assert "etrace.spike.default" in targets
