"""Recurrent models written the way PyTorch users write them, whose recurrence is element-wise
(issue 8): every parameter -- matmul weights however written, decays, gains, separate biases,
initial states, complex LRU parameters -- must learn online, D-RTRL exactly.

Each model has `forward(x, *state) -> (y, *new_state)` (or keeps its state in a buffer), a
readout of size N_OUT, and a `state(batch, dtype)` giving the initial state for BPTT and the
conversion (None where the model makes it itself).
"""

import math

import torch
from torch import nn

N_IN, N_HID, N_OUT = 3, 5, 2


def _p(*shape, scale=0.5):
    return nn.Parameter(torch.randn(*shape) * scale)


class _Zeros(nn.Module):
    def state(self, batch, dtype):
        return torch.zeros(batch, N_HID, dtype=dtype)


class WeightTransposed(_Zeros):
    """`h = a * h + tanh(x @ self.W.T + self.b)`, a learnable per-unit decay `a`."""

    matmul_weights = ("W",)

    def __init__(self):
        super().__init__()
        self.W, self.b = _p(N_HID, N_IN), _p(N_HID)
        self.a = nn.Parameter(torch.rand(N_HID) * 0.8)
        self.readout = nn.Linear(N_HID, N_OUT)

    def forward(self, x, h):
        h = self.a * h + torch.tanh(x @ self.W.T + self.b)
        return self.readout(h), h


class WeightEinsum(_Zeros):
    """The input weight used through `torch.einsum`."""

    matmul_weights = ("W",)

    def __init__(self):
        super().__init__()
        self.W, self.b = _p(N_HID, N_IN), _p(N_HID)
        self.readout = nn.Linear(N_HID, N_OUT)

    def forward(self, x, h):
        h = 0.7 * h + torch.tanh(torch.einsum("bi,hi->bh", x, self.W) + self.b)
        return self.readout(h), h


class WeightRight(_Zeros):
    """`x @ self.W` (the parameter on the right, (in, out) layout) and a separate bias."""

    matmul_weights = ("W",)

    def __init__(self):
        super().__init__()
        self.W, self.b = _p(N_IN, N_HID), _p(N_HID)
        self.readout = nn.Linear(N_HID, N_OUT)

    def forward(self, x, h):
        h = 0.6 * h + torch.sigmoid(x @ self.W + self.b)
        return self.readout(h), h


class WeightLeft(_Zeros):
    """`self.W @ x.T` (the parameter on the left), transposed back, through torch.matmul."""

    matmul_weights = ("W",)

    def __init__(self):
        super().__init__()
        self.W = _p(N_HID, N_IN)
        self.readout = nn.Linear(N_HID, N_OUT)

    def forward(self, x, h):
        h = 0.8 * h + torch.tanh(torch.matmul(self.W, x.T).T)
        return self.readout(h), h


class IndRNN(_Zeros):
    """Independently recurrent network (Li et al. 2018): `h = relu(W x + u * h + b)`."""

    matmul_weights = ("inp.weight",)

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(N_IN, N_HID, bias=False)
        self.u = nn.Parameter(torch.rand(N_HID) * 0.9)
        self.b = _p(N_HID, scale=0.1)
        self.readout = nn.Linear(N_HID, N_OUT)

    def forward(self, x, h):
        h = torch.relu(self.inp(x) + self.u * h + self.b + 0.5)
        return self.readout(h), h


class LeakyTau(_Zeros):
    """Leaky integrator with a learnable time constant, per unit or shared (a scalar)."""

    matmul_weights = ("inp.weight",)

    def __init__(self, shared=False):
        super().__init__()
        self.inp = nn.Linear(N_IN, N_HID)
        shape = () if shared else (N_HID,)
        self.log_tau = nn.Parameter(torch.log(torch.full(shape, 3.0)) + 0.3 * torch.randn(shape))
        self.readout = nn.Linear(N_HID, N_OUT)

    def forward(self, x, h):
        decay = torch.exp(-1.0 / torch.exp(self.log_tau))
        h = decay * h + (1 - decay) * torch.tanh(self.inp(x))
        return self.readout(h), h


class MinGRU(_Zeros):
    """minGRU (Feng et al. 2024): `h = (1 - z) * h + z * h~`, z and h~ from x only."""

    matmul_weights = ("z.weight", "cand.weight")

    def __init__(self):
        super().__init__()
        self.z, self.cand = nn.Linear(N_IN, N_HID), nn.Linear(N_IN, N_HID)
        self.readout = nn.Linear(N_HID, N_OUT)

    def forward(self, x, h):
        z = torch.sigmoid(self.z(x))
        h = (1 - z) * h + z * self.cand(x)
        return self.readout(h), h


def _lru_init(module, r_min=0.4, r_max=0.9, max_phase=math.pi / 5):
    """Linear Recurrent Unit parameters as in Orvieto et al. 2023 (ring init, gamma norm)."""
    u1, u2 = torch.rand(N_HID), torch.rand(N_HID)
    nu_log = torch.log(-0.5 * torch.log(u1 * (r_max**2 - r_min**2) + r_min**2))
    module.nu_log = nn.Parameter(nu_log)
    module.theta_log = nn.Parameter(torch.log(max_phase * u2))
    module.gamma_log = nn.Parameter(torch.log(torch.sqrt(1 - torch.exp(-torch.exp(nu_log)) ** 2)))
    module.B_re, module.B_im = _p(N_HID, N_IN), _p(N_HID, N_IN)
    module.C_re, module.C_im = _p(N_OUT, N_HID), _p(N_OUT, N_HID)
    module.D = _p(N_OUT, N_IN)


class RealLRU(nn.Module):
    """LRU with real tensors: the complex state as two real states (re, im)."""

    matmul_weights = ("B_re", "B_im")

    def __init__(self):
        super().__init__()
        _lru_init(self)

    def state(self, batch, dtype):
        return (torch.zeros(batch, N_HID, dtype=dtype),) * 2

    def forward(self, x, h_re, h_im):
        mod, phase = torch.exp(-torch.exp(self.nu_log)), torch.exp(self.theta_log)
        lam_re, lam_im = mod * torch.cos(phase), mod * torch.sin(phase)
        gamma = torch.exp(self.gamma_log)
        u_re, u_im = gamma * (x @ self.B_re.T), gamma * (x @ self.B_im.T)
        h_re, h_im = lam_re * h_re - lam_im * h_im + u_re, lam_re * h_im + lam_im * h_re + u_im
        y = h_re @ self.C_re.T - h_im @ self.C_im.T + x @ self.D.T
        return y, h_re, h_im


class ComplexLRU(nn.Module):
    """LRU with torch complex tensors (real parameters, complex state)."""

    matmul_weights = ()

    def __init__(self):
        super().__init__()
        _lru_init(self)

    def state(self, batch, dtype):
        cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
        return torch.zeros(batch, N_HID, dtype=cdtype)

    def forward(self, x, h):
        lam = torch.exp(torch.complex(-torch.exp(self.nu_log), torch.exp(self.theta_log)))
        B = torch.complex(self.B_re, self.B_im) * torch.exp(self.gamma_log).unsqueeze(-1)
        h = lam * h + x.to(B.dtype) @ B.T
        y = (h @ torch.complex(self.C_re, self.C_im).T).real + x @ self.D.T
        return y, h


class LearnableH0(nn.Module):
    """Leaky integrator whose initial state is a parameter: the `forward(x, h=None)` idiom."""

    matmul_weights = ("inp.weight",)

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(N_IN, N_HID)
        self.h0 = _p(N_HID, scale=1.0)
        self.readout = nn.Linear(N_HID, N_OUT)

    def state(self, batch, dtype):
        return None

    def forward(self, x, h=None):
        if h is None:
            h = self.h0.expand(x.shape[0], -1)
        h = 0.8 * h + 0.2 * torch.tanh(self.inp(x))
        return self.readout(h), h


class PlainLIF(nn.Module):
    """Leaky integrate-and-fire in plain torch: membrane in a buffer, learnable per-unit decay
    `sigmoid(beta_logit)`, a smooth (sigmoid) spike and soft reset."""

    matmul_weights = ("inp.weight",)

    def __init__(self, batch):
        super().__init__()
        self.inp = nn.Linear(N_IN, N_HID)
        self.beta_logit = nn.Parameter(torch.randn(N_HID) * 0.5 + 1.5)
        self.readout = nn.Linear(N_HID, N_OUT)
        self.register_buffer("v", torch.zeros(batch, N_HID))

    def state(self, batch, dtype):
        return None

    def forward(self, x):
        v = torch.sigmoid(self.beta_logit) * self.v + self.inp(x)
        spike = torch.sigmoid(4.0 * (v - 1.0))
        self.v = v - spike
        return self.readout(spike)


def families(batch):
    """{name: factory}: every model family of issue 8's test list."""
    return {
        "x@W.T+b": WeightTransposed,
        "einsum": WeightEinsum,
        "x@W": WeightRight,
        "W@x.T": WeightLeft,
        "IndRNN": IndRNN,
        "leaky-tau": LeakyTau,
        "leaky-shared-tau": lambda: LeakyTau(shared=True),
        "minGRU": MinGRU,
        "real-LRU": RealLRU,
        "complex-LRU": ComplexLRU,
        "h0": LearnableH0,
        "LIF": lambda: PlainLIF(batch),
    }
