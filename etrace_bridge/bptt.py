"""Reference gradients by backpropagation through time in torch, and their comparison.

`bptt_gradients` runs a torch module one step at a time over a time-major
sequence and backpropagates the summed loss once: the exact gradient that online
eligibility-trace learning approximates. `compare_gradients` reports how close
an online gradient is to it, parameter by parameter.

State conventions: see `etrace_bridge.conventions`. Prefer reassigning a state buffer
(`self.h = h_new`): an in-place `self.h.copy_(h_new)` breaks backpropagation if an op of an
earlier step saved `self.h` itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .conventions import param_like, torch_step
from .losses import resolve_loss
from .targets import check_targets

__all__ = ["BPTTResult", "GradientRow", "GradientReport", "bptt_gradients", "compare_gradients"]


class BPTTResult(NamedTuple):
    """Summed loss, gradients keyed by torch parameter name, stacked (T, B, ...) outputs."""
    loss: float
    grads: dict[str, torch.Tensor]
    outputs: torch.Tensor


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
    dtype, device = param_like(module, xs)
    xs = xs.to(device)
    if targets is not None and not isinstance(targets, (list, tuple)):
        targets = torch.as_tensor(targets).to(device)
    if targets is None or len(targets) != xs.shape[0]:
        raise ValueError(f"need one target entry per time step ({xs.shape[0]})")
    loss_fn = resolve_loss(loss)
    if step is None:
        step, state = torch_step(module, state, xs.shape[1], dtype, device)

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
                target = torch.as_tensor(targets[t], device=device)
                check_targets(loss, tuple(y.shape), target)
                term = loss_fn(y, target)
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
