"""Small torch models and comparison helpers shared by the export/lowering/module tests."""

import jax.numpy as jnp
import numpy as np
import torch
import torch.utils._pytree as pytree
from torch import nn

F32_TOL = 1e-5
F64_TOL = 1e-12


def jx(tree):
    """torch tensors (any pytree) -> JAX arrays, copying (tests must not alias torch memory)."""
    return pytree.tree_map(
        lambda t: jnp.asarray(t.detach().numpy().copy()) if isinstance(t, torch.Tensor) else t, tree
    )


def assert_close(actual, expected, tol, what=""):
    """Max abs difference <= tol * max(1, max|expected|), leaf by leaf."""
    a_leaves, e_leaves = pytree.tree_leaves(actual), pytree.tree_leaves(expected)
    assert len(a_leaves) == len(e_leaves), f"{what}: {len(a_leaves)} vs {len(e_leaves)} leaves"
    for a, e in zip(a_leaves, e_leaves):
        e = e.detach().numpy() if isinstance(e, torch.Tensor) else np.asarray(e)
        a = np.asarray(a)
        assert a.shape == e.shape, f"{what}: shape {a.shape} vs {e.shape}"
        assert a.dtype == e.dtype, f"{what}: dtype {a.dtype} vs {e.dtype}"
        if e.size:
            err = float(np.max(np.abs(a.astype(np.float64) - e.astype(np.float64))))
            scale = max(1.0, float(np.max(np.abs(e))))
            assert err <= tol * scale, f"{what}: max abs error {err} > {tol} * {scale}"


class LeakyCell(nn.Module):
    """forward(x, h) -> (y, h): leaky integrator with a readout."""

    def __init__(self, n_in=4, n_hidden=6, n_out=3, alpha=0.8):
        super().__init__()
        self.alpha = alpha
        self.inp = nn.Linear(n_in, n_hidden)
        self.rec = nn.Linear(n_hidden, n_hidden, bias=False)
        self.out = nn.Linear(n_hidden, n_out)

    def forward(self, x, h):
        h = self.alpha * h + (1 - self.alpha) * torch.tanh(self.inp(x) + self.rec(h))
        return self.out(h), h


class LIFCell(nn.Module):
    """LIF neurons with state in registered buffers, updated in place (copy_) in forward."""

    def __init__(self, n_in=4, n_hidden=6, batch=3, threshold=0.5):
        super().__init__()
        self.fc = nn.Linear(n_in, n_hidden)
        self.threshold = threshold
        self.register_buffer("v", torch.zeros(batch, n_hidden))
        self.register_buffer("tau", torch.tensor(2.0))

    def forward(self, x):
        v = self.v + (self.fc(x) - self.v) / self.tau
        spike = (v > self.threshold).to(v.dtype)
        self.v.copy_(v * (1 - spike))
        return spike


class LIFNetwork(nn.Module):
    """LIF layer (buffer state) -> Linear readout; buffer path is ('lif', 'v')."""

    def __init__(self, n_in=4, n_hidden=6, n_out=2, batch=3):
        super().__init__()
        self.lif = LIFCell(n_in, n_hidden, batch)
        self.readout = nn.Linear(n_hidden, n_out)

    def forward(self, x):
        return self.readout(self.lif(x))


class GRUReadout(nn.Module):
    """GRUCell -> Linear readout; forward(x, h) -> (y, h)."""

    def __init__(self, n_in=4, n_hidden=5, n_out=3):
        super().__init__()
        self.gru = nn.GRUCell(n_in, n_hidden)
        self.readout = nn.Linear(n_hidden, n_out)

    def forward(self, x, h):
        h = self.gru(x, h)
        return self.readout(h), h


class StackedLSTM(nn.Module):
    """Two stacked LSTMCells; forward(x, h1, c1, h2, c2) -> (y, h1, c1, h2, c2)."""

    def __init__(self, n_in=4, n_hidden=5, n_out=2):
        super().__init__()
        self.cells = nn.ModuleList([nn.LSTMCell(n_in, n_hidden), nn.LSTMCell(n_hidden, n_hidden)])
        self.readout = nn.Linear(n_hidden, n_out)

    def forward(self, x, h1, c1, h2, c2):
        h1, c1 = self.cells[0](x, (h1, c1))
        h2, c2 = self.cells[1](h1, (h2, c2))
        return self.readout(h2), h1, c1, h2, c2


class ConvGRU(nn.Module):
    """Conv1d feature extractor -> GRUCell; x: (B, C, L); forward(x, h) -> (y, h)."""

    def __init__(self, channels=2, length=8, n_hidden=5):
        super().__init__()
        self.conv = nn.Conv1d(channels, 3, kernel_size=3, stride=2, padding=1)
        self.gru = nn.GRUCell(3 * ((length + 1) // 2), n_hidden)

    def forward(self, x, h):
        feats = torch.relu(self.conv(x)).flatten(1)
        h = self.gru(feats, h)
        return h.mean(-1), h
