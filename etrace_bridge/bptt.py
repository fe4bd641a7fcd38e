"""Reference gradients by backpropagation through time in torch, and their comparison.

`bptt_gradients` runs a torch module one step at a time over a time-major
sequence and backpropagates the summed loss once: the exact gradient that online
eligibility-trace learning approximates. `tbptt_windows` / `tbptt_gradients` are
truncated BPTT, the usual PyTorch answer to long sequences: windows of K steps,
the state carried from window to window but detached, so no gradient flows back
further than K steps. `compare_gradients` reports how close an online gradient is
to the exact one, parameter by parameter.

State conventions: see `etrace_bridge.conventions`. Prefer reassigning a state buffer
(`self.h = h_new`): an in-place `self.h.copy_(h_new)` breaks backpropagation if an op of an
earlier step saved `self.h` itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from .conventions import param_like, torch_step
from .losses import IGNORE_INDEX, resolve_loss
from .state_slots import swapped_slots
from .targets import check_targets

__all__ = [
    "BPTTResult",
    "TBPTTWindow",
    "GradientRow",
    "GradientReport",
    "bptt_gradients",
    "tbptt_windows",
    "tbptt_gradients",
    "compare_gradients",
]


class BPTTResult(NamedTuple):
    """Summed loss, gradients keyed by torch parameter name, stacked (T, B, ...) outputs."""

    loss: float
    grads: dict[str, torch.Tensor]
    outputs: torch.Tensor


# ----------------------------------------------------------------------------- BPTT


def _prepare(module, xs, targets, loss, state, step):
    """Inputs and targets on the module's device, the loss function, and the step convention
    with its start state (shared by full and truncated BPTT)."""
    xs = torch.as_tensor(xs)
    dtype, device = param_like(module, xs)
    xs = xs.to(device)
    if targets is not None and not isinstance(targets, (list, tuple)):
        targets = torch.as_tensor(targets).to(device)
    if targets is None or len(targets) != xs.shape[0]:
        raise ValueError(f"need one target entry per time step ({xs.shape[0]})")
    if step is None:
        step, state = torch_step(module, state, xs.shape[1], dtype, device)
    return xs, targets, device, resolve_loss(loss), step, state


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
    `torch.autograd.grad`) and the module runs on clones of its buffers, tensor attributes
    and spikingjelly memories (`etrace_bridge.state_slots`), which are put back after.
    Parameters the loss does not reach get zero gradients.
    """
    xs, targets, device, loss_fn, step, state = _prepare(module, xs, targets, loss, state, step)

    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    outputs = []
    total = None
    with swapped_slots(module):
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
    grads = {
        n: (g.detach() if g is not None else torch.zeros_like(p)) for (n, p), g in zip(named, grads)
    }
    value = 0.0 if total is None else float(total.detach())
    return BPTTResult(value, grads, torch.stack(outputs))


# ----------------------------------------------------------------------------- truncated BPTT


class TBPTTWindow(NamedTuple):
    """One truncated-BPTT window: steps [start, stop), its summed loss, its gradients (keyed by
    torch parameter name), whether any step of it carried a loss (a target that is not None and
    not all IGNORE_INDEX), and its (T_w, B, ...) outputs."""

    start: int
    stop: int
    loss: float
    grads: dict[str, torch.Tensor]
    has_loss: bool
    outputs: torch.Tensor


def _has_labels(target: torch.Tensor) -> bool:
    """False only for class targets that are all IGNORE_INDEX (a step that carries no loss)."""
    if target.is_floating_point() or target.is_complex():
        return True
    return bool((target != IGNORE_INDEX).any())


def _detach(state):
    if isinstance(state, torch.Tensor):
        return state.detach()
    if isinstance(state, (tuple, list)):
        return type(state)(_detach(s) for s in state)
    return state


def _detach_slots(module, slots) -> None:
    """Cut the autograd history of state kept in the module (buffers, tensor attributes,
    library memories); values unchanged."""
    for slot in slots:
        value = slot.get(module, None)
        if isinstance(value, torch.Tensor) and value.requires_grad:
            slot.set(module, value.detach())


def tbptt_windows(
    module: nn.Module,
    xs,
    targets,
    loss: str | Callable,
    *,
    window: int,
    state=None,
    step: Callable | None = None,
) -> Iterator[TBPTTWindow]:
    """Truncated BPTT: yield one `TBPTTWindow` per `window` consecutive steps.

    Within a window the gradient is exact BPTT of that window's summed loss; the state enters
    the next window detached, so gradients never reach back more than `window` steps (the last
    window may be shorter). The generator resumes with the parameters as they are then: a
    caller that runs `optimizer.step()` between windows gets the per-window updates PyTorch
    users write by hand (`etrace-compare`'s `tbptt` does that); summing the windows' gradients
    without stepping gives `tbptt_gradients`. Arguments as for `bptt_gradients`; like it, no
    `p.grad` is touched and the module runs on clones of its buffers (put back when the
    generator finishes or is closed).
    """
    if int(window) < 1:
        raise ValueError(f"window must be a positive number of steps, got {window}")
    window = int(window)
    xs, targets, device, loss_fn, step, state = _prepare(module, xs, targets, loss, state, step)
    with swapped_slots(module) as slots:
        for start in range(0, xs.shape[0], window):
            stop = min(start + window, xs.shape[0])
            named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
            state = _detach(state)
            _detach_slots(module, slots)
            outputs, total, labelled = [], None, False
            with torch.enable_grad():
                for t in range(start, stop):
                    y, state = step(module, xs[t], state)
                    outputs.append(y.detach())
                    if targets[t] is None:
                        continue
                    target = torch.as_tensor(targets[t], device=device)
                    labelled = labelled or _has_labels(target)
                    term = loss_fn(y, target)
                    total = term if total is None else total + term
                if total is None or not total.requires_grad:
                    grads = [None] * len(named)
                else:
                    grads = torch.autograd.grad(total, [p for _, p in named], allow_unused=True)
            grads = {
                n: (g.detach() if g is not None else torch.zeros_like(p))
                for (n, p), g in zip(named, grads)
            }
            value = 0.0 if total is None else float(total.detach())
            state = _detach(state)
            yield TBPTTWindow(start, stop, value, grads, labelled, torch.stack(outputs))


def tbptt_gradients(
    module: nn.Module,
    xs,
    targets,
    loss: str | Callable,
    *,
    window: int,
    state=None,
    step: Callable | None = None,
) -> BPTTResult:
    """Truncated-BPTT gradient of `sum_t loss(y_t, targets[t])` with the parameters held fixed:
    the sum of every window's gradient (`tbptt_windows`). Equals `bptt_gradients` when
    `window >= T`; for `window < T` it drops every path through time longer than the window.
    """
    loss_total, grads, outputs = 0.0, None, []
    for win in tbptt_windows(module, xs, targets, loss, window=window, state=state, step=step):
        loss_total += win.loss
        outputs.append(win.outputs)
        grads = (
            dict(win.grads) if grads is None else {n: g + win.grads[n] for n, g in grads.items()}
        )
    return BPTTResult(loss_total, grads or {}, torch.cat(outputs))


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
        body = [
            (
                r.name,
                "x".join(map(str, r.shape)) or "scalar",
                f"{r.rel_error:.3e}",
                f"{r.cosine:.6f}",
            )
            for r in self.rows
        ]
        return header, body

    def table(self) -> str:
        """Aligned plain-text table, one parameter per line."""
        header, body = self._cells()
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(4)]
        fmt = lambda row: "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))
        )
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
    """float64 values; a complex gradient as its (real, imaginary) pairs, so both count."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().resolve_conj()
        if value.is_complex():
            value = torch.view_as_real(value)
        return value.double().numpy()
    value = np.asarray(value)
    if np.iscomplexobj(value):
        value = np.stack([value.real, value.imag], axis=-1)
    return value.astype(np.float64)


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
        raise ValueError(
            f"gradient keys differ: missing from online {missing}, not in reference {extra}"
        )
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
