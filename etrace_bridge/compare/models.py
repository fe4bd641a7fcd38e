"""Built-in torch models for the online-vs-BPTT comparison tool.

State conventions (see `etrace_bridge.bptt`):

- `GRUClassifier`, `StackedGRUClassifier`, `LSTMClassifier`, `LeakyRNN`,
  `MultiTimescaleLeaky`: explicit state, `forward(x, *state) -> (y, *new_state)`;
  `initial_state` gives the zero state.
- `LIFNet`: state in registered (non-persistent) buffers of shape `(B, H)`, sized
  by `reset_state(batch_size)` and updated in `forward` by plain attribute
  assignment (`self.v = v_new`). `torch.export` records that as a buffer mutation
  (`graph_signature.buffers_to_mutate` after `run_decompositions()`) just like
  `self.v.copy_(v_new)`, and unlike `copy_` it never invalidates tensors autograd
  saved from the previous step.

The spiking nonlinearity is the custom op `etrace::spike` (`spike_op`): a
Heaviside step forward and a fast-sigmoid surrogate derivative
`1 / (1 + SURROGATE_SCALE * |x|)**2` backward. `spike_jax` is the same function
in JAX, for the bridge's custom-op table `{"etrace::spike": spike_jax}`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import torch
from torch import nn

__all__ = [
    "SURROGATE_SCALE",
    "spike_op",
    "spike_jax",
    "GRUClassifier",
    "StackedGRUClassifier",
    "LSTMClassifier",
    "LeakyRNN",
    "MultiTimescaleLeaky",
    "LIFNet",
    "MODEL_NAMES",
    "build_model",
    "initial_state",
]

SURROGATE_SCALE = 10.0


# ----------------------------------------------------------------------------- spike op


@torch.library.custom_op("etrace::spike", mutates_args=())
def spike_op(x: torch.Tensor) -> torch.Tensor:
    """Heaviside step `(x > 0)` in x's dtype; x is the membrane potential minus threshold."""
    return (x > 0).to(x.dtype)


@spike_op.register_fake
def _spike_fake(x):
    return torch.empty_like(x)


def _spike_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _spike_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return grad / (1.0 + SURROGATE_SCALE * x.abs()) ** 2


spike_op.register_autograd(_spike_backward, setup_context=_spike_setup)


@jax.custom_jvp
def spike_jax(x):
    """JAX twin of `spike_op`: Heaviside forward, fast-sigmoid surrogate derivative."""
    return (x > 0).astype(x.dtype)


@spike_jax.defjvp
def _spike_jax_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    return spike_jax(x), dx / (1.0 + SURROGATE_SCALE * jnp.abs(x)) ** 2


# ----------------------------------------------------------------------------- models


class GRUClassifier(nn.Module):
    """GRU cell with a linear readout; `forward(x, h) -> (logits, h)`."""

    def __init__(self, n_in: int, n_hidden: int, n_out: int):
        super().__init__()
        self.cell = nn.GRUCell(n_in, n_hidden)
        self.readout = nn.Linear(n_hidden, n_out)

    def forward(self, x, h):
        h = self.cell(x, h)
        return self.readout(h), h


class StackedGRUClassifier(nn.Module):
    """Two stacked `nn.GRUCell` layers with a linear readout of the second;
    `forward(x, h1, h2) -> (logits, h1, h2)`. Layer 1's weights reach the output through layer
    2's memory: a path through time that single-step traces drop (windows `+wK` keep it inside
    a window)."""

    def __init__(self, n_in: int, n_hidden: int, n_out: int):
        super().__init__()
        self.cell1 = nn.GRUCell(n_in, n_hidden)
        self.cell2 = nn.GRUCell(n_hidden, n_hidden)
        self.readout = nn.Linear(n_hidden, n_out)

    def forward(self, x, h1, h2):
        h1 = self.cell1(x, h1)
        h2 = self.cell2(h1, h2)
        return self.readout(h2), h1, h2


class LSTMClassifier(nn.Module):
    """LSTM cell with a linear readout; `forward(x, h, c) -> (logits, h, c)`."""

    def __init__(self, n_in: int, n_hidden: int, n_out: int):
        super().__init__()
        self.cell = nn.LSTMCell(n_in, n_hidden)
        self.readout = nn.Linear(n_hidden, n_out)

    def forward(self, x, h, c):
        h, c = self.cell(x, (h, c))
        return self.readout(h), h, c


class LeakyRNN(nn.Module):
    """Leaky integrator without recurrent weights: `h = alpha*h + (1-alpha)*tanh(W x + b)`.

    The recurrence is element-wise, so eligibility traces are exact for it.
    `forward(x, h) -> (y, h)` with a linear readout `y`.
    """

    def __init__(self, n_in: int, n_hidden: int, n_out: int, alpha: float = 0.9):
        super().__init__()
        self.alpha = float(alpha)
        self.input = nn.Linear(n_in, n_hidden)
        self.readout = nn.Linear(n_hidden, n_out)

    def forward(self, x, h):
        h = self.alpha * h + (1.0 - self.alpha) * torch.tanh(self.input(x))
        return self.readout(h), h


class MultiTimescaleLeaky(nn.Module):
    """Leaky integrators with fixed per-unit time constants spread log-uniformly over
    [tau_min, tau_max] steps: `h = alpha*h + tanh(W x)`, `alpha = exp(-1/tau)`.

    No recurrent weights and a memoryless linear readout `y = V h + c`: the recurrence is
    element-wise, so D-RTRL's online gradient equals BPTT's. The slow units can hold a cue for
    hundreds of steps, which the single 10-step time constant of `LeakyRNN` cannot. The input
    is not scaled by (1 - alpha) and has no bias: a cue then stays at full size in a slow unit
    (a (1 - alpha) factor shrinks it by tau and leaves the readout weights to grow by as much,
    which Adam needed thousands of updates for), and no constant input piles up over up to
    1000 steps. `alpha` is a constant buffer (not learned). `forward(x, h) -> (y, h)`.
    """

    def __init__(
        self, n_in: int, n_hidden: int, n_out: int, tau_min: float = 1.0, tau_max: float = 1000.0
    ):
        super().__init__()
        if not 0 < tau_min <= tau_max:
            raise ValueError(f"need 0 < tau_min <= tau_max, got {tau_min}, {tau_max}")
        tau = torch.logspace(
            math.log10(tau_min), math.log10(tau_max), n_hidden, dtype=torch.float64
        )
        self.register_buffer("alpha", torch.exp(-1.0 / tau).to(torch.get_default_dtype()))
        self.input = nn.Linear(n_in, n_hidden, bias=False)
        self.readout = nn.Linear(n_hidden, n_out)

    def forward(self, x, h):
        h = self.alpha * h + torch.tanh(self.input(x))
        return self.readout(h), h


class LIFNet(nn.Module):
    """Leaky integrate-and-fire layer with a linear readout, state in buffers.

    Per step (dt = 1): `v = a*v + W_in x [+ W_rec z] - threshold*z` (soft reset by
    the previous spikes), `z = spike(v - threshold)`, `out = k*out + W_out z`,
    with `a = exp(-1/tau_mem)`, `k = exp(-1/tau_out)`; returns `out`.
    With `tau_out=None` the readout is memoryless, `out = W_out z` (model name `lif_direct`):
    without recurrent weights every path through time then stays inside one unit and D-RTRL
    is exact; the leaky readout (`lif`) has its own memory, which makes it approximate.
    Buffers `v`, `z` `(B, n_hidden)` and `out` `(B, n_out)`; call
    `reset_state(batch_size)` before a sequence.
    """

    def __init__(
        self,
        n_in: int,
        n_hidden: int,
        n_out: int,
        tau_mem: float = 20.0,
        threshold: float = 1.0,
        recurrent: bool = False,
        tau_out: float | None = 10.0,
    ):
        super().__init__()
        self.n_hidden, self.n_out = n_hidden, n_out
        self.threshold = float(threshold)
        self.decay_mem = math.exp(-1.0 / tau_mem)
        self.decay_out = None if tau_out is None else math.exp(-1.0 / tau_out)
        self.input = nn.Linear(n_in, n_hidden)
        self.recurrent = nn.Linear(n_hidden, n_hidden, bias=False) if recurrent else None
        self.readout = nn.Linear(n_hidden, n_out)
        self.reset_state(1)

    def reset_state(self, batch_size: int = 1) -> None:
        """Zero the state buffers, sized for `batch_size`, in the parameters' dtype/device."""
        w = self.input.weight
        zeros = lambda n: torch.zeros(batch_size, n, dtype=w.dtype, device=w.device)
        self.register_buffer("v", zeros(self.n_hidden), persistent=False)
        self.register_buffer("z", zeros(self.n_hidden), persistent=False)
        if self.decay_out is not None:
            self.register_buffer("out", zeros(self.n_out), persistent=False)

    def forward(self, x):
        if x.shape[0] != self.v.shape[0]:
            raise ValueError(
                f"batch {x.shape[0]} but state sized for {self.v.shape[0]}: "
                "call reset_state(batch_size) first"
            )
        current = self.input(x)
        if self.recurrent is not None:
            current = current + self.recurrent(self.z)
        v = self.decay_mem * self.v + current - self.threshold * self.z
        z = spike_op(v - self.threshold)
        self.v, self.z = v, z
        if self.decay_out is None:
            return self.readout(z)
        out = self.decay_out * self.out + self.readout(z)
        self.out = out
        return out


# ----------------------------------------------------------------------------- lookup

_BUILDERS = {
    "multiscale": MultiTimescaleLeaky,
    "gru": GRUClassifier,
    "lstm": LSTMClassifier,
    "lif": LIFNet,
    "leaky": LeakyRNN,
    "lif_direct": lambda n_in, n_hidden, n_out, **kw: LIFNet(
        n_in, n_hidden, n_out, **{"tau_out": None, **kw}
    ),
    "gru2": StackedGRUClassifier,
}
MODEL_NAMES = tuple(_BUILDERS)


def build_model(name: str, n_in: int, n_out: int, n_hidden: int = 64, **kwargs) -> nn.Module:
    """Build a built-in model by name (MODEL_NAMES); kwargs go to its class."""
    try:
        cls = _BUILDERS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}"
        ) from None
    return cls(n_in, n_hidden, n_out, **kwargs)


def initial_state(model: nn.Module, batch_size: int) -> tuple[torch.Tensor, ...]:
    """Zero state tuple to pass as `forward(x, *state)`; () for buffer-state models (reset here)."""
    if hasattr(model, "reset_state"):
        model.reset_state(batch_size)
        return ()
    if isinstance(model, StackedGRUClassifier):
        hidden, n_state = model.cell1.hidden_size, 2
    elif isinstance(model, (GRUClassifier, LSTMClassifier)):
        hidden, n_state = model.cell.hidden_size, 2 if isinstance(model, LSTMClassifier) else 1
    elif isinstance(model, (LeakyRNN, MultiTimescaleLeaky)):
        hidden, n_state = model.input.out_features, 1
    else:
        raise TypeError(f"no initial state known for {type(model).__name__}")
    w = next(model.parameters())
    return tuple(
        torch.zeros(batch_size, hidden, dtype=w.dtype, device=w.device) for _ in range(n_state)
    )
