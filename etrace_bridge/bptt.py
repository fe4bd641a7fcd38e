"""Reference gradients by backpropagation through time in torch, and their comparison.

`bptt_gradients` runs a torch module one step at a time over a time-major
sequence and backpropagates the summed loss once: the exact gradient that online
eligibility-trace learning approximates. `compare_gradients` reports how close
an online gradient is to it, parameter by parameter.

Recurrent state conventions understood by `bptt_gradients`:

(a) `nn.RNNCell` / `nn.GRUCell` / `nn.LSTMCell`: state `h` or `(h, c)`, output `h`.
(b) `nn.RNN` / `nn.GRU` / `nn.LSTM`: fed a length-1 sequence per step (respecting
    `batch_first`); state `h` or `(h, c)` shaped `(num_layers, B, H)`; output the
    step's top-layer output.
(c) any module with `forward(x, *state) -> (y, *new_state)`; needs `state=`.
(d) modules that keep their state in registered buffers updated inside `forward`:
    called as `module(x)`. Selected by `state=None` or `state=()`. Prefer
    reassigning the buffer (`self.h = h_new`): an in-place `self.h.copy_(h_new)`
    breaks backpropagation if an op of an earlier step saved `self.h` itself.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .tasks import IGNORE_INDEX

__all__ = [
    "BPTTResult", "GradientRow", "GradientReport", "IGNORE_INDEX",
    "bptt_gradients", "compare_gradients", "resolve_loss", "LOSS_NAMES",
]

LOSS_NAMES = ("mse", "cross_entropy")


class BPTTResult(NamedTuple):
    """Summed loss, gradients keyed by torch parameter name, stacked (T, B, ...) outputs."""
    loss: float
    grads: dict[str, torch.Tensor]
    outputs: torch.Tensor


# ----------------------------------------------------------------------------- losses

def _torch_mse(output, target):
    return F.mse_loss(output, target.to(output.dtype))


def _torch_cross_entropy(output, target):
    logits = output.reshape(-1, output.shape[-1])
    labels = target.reshape(-1).long()
    valid = labels != IGNORE_INDEX
    per_item = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
    return per_item.sum() / valid.sum().clamp(min=1).to(per_item.dtype)


def _jax_mse(output, target):
    import jax.numpy as jnp
    return jnp.mean((output - target.astype(output.dtype)) ** 2)


def _jax_cross_entropy(output, target):
    import jax
    import jax.numpy as jnp
    logits = output.reshape(-1, output.shape[-1])
    labels = target.reshape(-1).astype(jnp.int32)
    valid = labels != IGNORE_INDEX
    safe = jnp.where(valid, labels, 0)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, safe[:, None], axis=-1)[:, 0]
    total = jnp.sum(jnp.where(valid, nll, 0.0))
    return total / jnp.maximum(jnp.sum(valid), 1).astype(total.dtype)


_LOSSES = {
    "torch": {"mse": _torch_mse, "cross_entropy": _torch_cross_entropy},
    "jax": {"mse": _jax_mse, "cross_entropy": _jax_cross_entropy},
}


def resolve_loss(loss: str | Callable, *, backend: str = "torch") -> Callable:
    """Return `loss(output_t, target_t) -> scalar` for a name or pass a callable through.

    'mse': mean squared error over all elements. 'cross_entropy': `output` logits
    `(B, C)` (or `(B, ..., C)`), integer targets `(B,)` (or `(B, ...)`); the mean over
    entries whose target is not IGNORE_INDEX (-100), and 0 when a step has none, so
    per-step losses on targets padded with -100 need no special casing.
    backend='jax' returns the JAX implementation with the same semantics.
    """
    if backend not in _LOSSES:
        raise ValueError(f"unknown backend {backend!r}; expected 'torch' or 'jax'")
    if callable(loss):
        return loss
    if isinstance(loss, str) and loss in _LOSSES[backend]:
        return _LOSSES[backend][loss]
    raise ValueError(f"unknown loss {loss!r}; expected a callable or one of {', '.join(LOSS_NAMES)}")


# ----------------------------------------------------------------------------- stepping

_CELLS = (nn.RNNCell, nn.GRUCell, nn.LSTMCell)


def _param_like(module: nn.Module, xs: torch.Tensor):
    p = next(module.parameters(), None)
    return (p.dtype, p.device) if p is not None else (xs.dtype, xs.device)


def _cell_step(module, x, state):
    if isinstance(module, nn.LSTMCell):
        h, c = module(x, tuple(state))
        return h, (h, c)
    h = module(x, state[0] if isinstance(state, (tuple, list)) else state)
    return h, h


def _cell_zero_state(module, batch, dtype, device):
    h = torch.zeros(batch, module.hidden_size, dtype=dtype, device=device)
    return (h, h.clone()) if isinstance(module, nn.LSTMCell) else h


def _rnn_step(module, x, state):
    time_dim = 1 if module.batch_first else 0
    out, new_state = module(x.unsqueeze(time_dim), state)
    return out.squeeze(time_dim), new_state


def _rnn_zero_state(module, batch, dtype, device):
    if module.bidirectional:
        raise ValueError("a bidirectional RNN has no step-by-step (causal) form")
    h_size = getattr(module, "proj_size", 0) or module.hidden_size
    h = torch.zeros(module.num_layers, batch, h_size, dtype=dtype, device=device)
    if isinstance(module, nn.LSTM):
        return h, torch.zeros(module.num_layers, batch, module.hidden_size, dtype=dtype, device=device)
    return h


def _forward_step(module, x, state):
    out = module(x, *state)
    if not isinstance(out, (tuple, list)) or len(out) != len(state) + 1:
        raise TypeError(
            f"{type(module).__name__}.forward(x, *state) must return (y, *new_state) with "
            f"{len(state)} state tensors, got {type(out).__name__}")
    return out[0], tuple(out[1:])


def _buffer_step(module, x, state):
    y = module(x)
    if isinstance(y, (tuple, list)):
        raise TypeError(
            f"{type(module).__name__} returned a tuple: for forward(x, *state) -> (y, *new_state) "
            "modules pass the initial state as state=")
    return y, state


def _required_positional(module) -> int:
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return 0
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in kinds and p.default is inspect.Parameter.empty for p in params)


def _pick_step(module, state, batch, dtype, device):
    """Return (step, initial_state) for the module's state convention."""
    if isinstance(module, _CELLS):
        if state is None:
            state = _cell_zero_state(module, batch, dtype, device)
        return _cell_step, state
    if isinstance(module, nn.RNNBase):
        if state is None:
            state = _rnn_zero_state(module, batch, dtype, device)
        elif module.bidirectional:
            raise ValueError("a bidirectional RNN has no step-by-step (causal) form")
        return _rnn_step, tuple(state) if isinstance(state, list) else state
    if state is None or (isinstance(state, (tuple, list)) and len(state) == 0):
        if _required_positional(module) > 1:
            raise TypeError(
                f"{type(module).__name__}.forward takes state arguments: pass the initial state "
                "as state= (forward(x, *state) -> (y, *new_state) convention)")
        return _buffer_step, ()
    return _forward_step, tuple(state) if isinstance(state, (tuple, list)) else (state,)


# ----------------------------------------------------------------------------- BPTT

def _swap_in_buffer_copies(module):
    """Replace every buffer by a clone; return what `_put_back` needs to undo it."""
    originals, clones = [], {}
    for name, buf in list(module.named_buffers(remove_duplicate=False)):
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        originals.append((owner, leaf, buf))
        if id(buf) not in clones:
            clones[id(buf)] = buf.detach().clone()
        owner._buffers[leaf] = clones[id(buf)]
    return originals


def _put_back(originals):
    for owner, leaf, buf in originals:
        owner._buffers[leaf] = buf


def bptt_gradients(
    module: nn.Module,
    xs,
    targets,
    loss: str | Callable,
    *,
    state=None,
    step: Callable | None = None,
) -> BPTTResult:
    """Exact gradients of `sum_t loss(y_t, targets[t])` by backpropagation through time.

    xs: time-major `(T, B, ...)` tensor (numpy accepted). targets: a `(T, B, ...)`
    tensor, or a length-T sequence whose None entries add no loss at that step.
    state: initial state (tensor or tuple); zeros for conventions (a)/(b), required
    for (c), None or () for buffer-state modules (d). step: optional
    `step(module, x, state) -> (y, new_state)` replacing the convention detection;
    it receives `state` exactly as given.

    No side effects: `p.grad` is never touched (the gradients come from
    `torch.autograd.grad`) and the module runs on clones of its buffers, so the
    buffer tensors (identity and values) are as before. Parameters the loss does
    not reach get zero gradients.
    """
    xs = torch.as_tensor(xs)
    dtype, device = _param_like(module, xs)
    xs = xs.to(device)
    if targets is not None and not isinstance(targets, (list, tuple)):
        targets = torch.as_tensor(targets).to(device)
    if targets is None or len(targets) != xs.shape[0]:
        raise ValueError(f"need one target entry per time step ({xs.shape[0]})")
    loss_fn = resolve_loss(loss)
    if step is None:
        step, state = _pick_step(module, state, xs.shape[1], dtype, device)

    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    originals = _swap_in_buffer_copies(module)
    outputs = []
    total = None
    try:
        with torch.enable_grad():
            for t in range(xs.shape[0]):
                y, state = step(module, xs[t], state)
                outputs.append(y.detach())
                if targets[t] is None:
                    continue
                term = loss_fn(y, torch.as_tensor(targets[t], device=device))
                total = term if total is None else total + term
            if total is None or not total.requires_grad:
                grads = [None] * len(named)
            else:
                grads = torch.autograd.grad(total, [p for _, p in named], allow_unused=True)
    finally:
        _put_back(originals)
    grads = {n: (g.detach() if g is not None else torch.zeros_like(p))
             for (n, p), g in zip(named, grads)}
    value = 0.0 if total is None else float(total.detach())
    return BPTTResult(value, grads, torch.stack(outputs))


# ----------------------------------------------------------------------------- comparison

class GradientRow(NamedTuple):
    name: str
    shape: tuple
    rel_error: float
    cosine: float


@dataclass
class GradientReport:
    """Per-parameter agreement of an online gradient with the BPTT reference."""
    rows: list[GradientRow] = field(default_factory=list)

    @property
    def worst_rel_error(self) -> float:
        return max((r.rel_error for r in self.rows), default=0.0)

    @property
    def min_cosine(self) -> float:
        return min((r.cosine for r in self.rows), default=1.0)

    def _cells(self):
        header = ("parameter", "shape", "rel. error", "cosine")
        body = [(r.name, "x".join(map(str, r.shape)) or "scalar", f"{r.rel_error:.3e}", f"{r.cosine:.6f}")
                for r in self.rows]
        return header, body

    def table(self) -> str:
        """Aligned plain-text table, one parameter per line."""
        header, body = self._cells()
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(4)]
        fmt = lambda row: "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, body)])

    def to_markdown(self) -> str:
        """GitHub-flavoured markdown table."""
        header, body = self._cells()
        lines = ["| " + " | ".join(header) + " |", "|---|---|---:|---:|"]
        lines += ["| " + " | ".join((f"`{r[0]}`", *r[1:])) + " |" for r in body]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _as_numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().double().numpy()
    return np.asarray(value, dtype=np.float64)


def _key(name) -> str:
    return ".".join(name) if isinstance(name, tuple) else str(name)


def compare_gradients(online: dict, reference: dict[str, torch.Tensor]) -> GradientReport:
    """Relative error `||a-b|| / max(||b||, tiny)` and cosine of online `a` vs reference `b`.

    Keys are torch parameter names; tuple paths such as `('cell', 'weight_ih')` are
    joined with dots. Values may be torch tensors or JAX/numpy arrays. The cosine of
    two zero gradients is 1, of a zero and a non-zero one 0. Rows follow `reference`.
    """
    online = {_key(k): v for k, v in online.items()}
    missing = [k for k in reference if k not in online]
    extra = [k for k in online if k not in reference]
    if missing or extra:
        raise ValueError(f"gradient keys differ: missing from online {missing}, not in reference {extra}")
    tiny = np.finfo(np.float64).tiny
    rows = []
    for name, ref in reference.items():
        a, b = _as_numpy(online[name]), _as_numpy(ref)
        if a.shape != b.shape:
            raise ValueError(f"{name}: online gradient shape {a.shape} != reference {b.shape}")
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        rel = float(np.linalg.norm(a - b) / max(nb, tiny))
        if na == 0 and nb == 0:
            cos = 1.0
        elif na == 0 or nb == 0:
            cos = 0.0
        else:
            cos = float(np.clip(np.vdot(a, b) / (na * nb), -1.0, 1.0))
        rows.append(GradientRow(name, tuple(b.shape), rel, cos))
    return GradientReport(rows)
