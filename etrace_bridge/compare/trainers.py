"""One training step per method: torch BPTT, truncated BPTT, or an OnlineLearner; Adam steps."""

from __future__ import annotations

import torch
from torch import nn

from etrace_bridge.bptt import bptt_gradients, tbptt_windows

from .config import (
    CompareConfig,
    CompareError,
    method_base,
    method_option,
    method_window,
    one_line,
)
from .data import task_loss
from .factory import zero_state
from .models import spike_jax
from .tasks import SequenceTask

CUSTOM_OPS = {"etrace::spike": spike_jax}


class BPTTTrainer:
    """Torch autograd through the unrolled sequence (`bptt_gradients`), then an Adam step."""

    def __init__(self, model: nn.Module, loss: str, lr: float):
        self.method, self.model, self.loss = "bptt", model, loss
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    def _bptt(self, xs, ys):
        state = zero_state(self.model, xs.shape[1])
        return bptt_gradients(self.model, xs, ys, self.loss, state=state or None)

    def gradients(self, xs, ys) -> dict[str, torch.Tensor]:
        return self._bptt(xs, ys).grads

    def train_batch(self, xs, ys) -> float:
        result = self._bptt(xs, ys)
        _set_grads(self.model, result.grads)
        self.optimizer.step()
        return result.loss


class TBPTTTrainer:
    """Truncated BPTT (`tbptt_windows`): windows of `window` steps, the state carried across
    windows but detached.

    update='window' (default, what PyTorch users write): one Adam step after every window that
    carries a loss (a window without any labelled step has nothing to back-propagate and takes
    no step). update='sequence': the windows' gradients are summed and one Adam step is taken
    per sequence, like every other method here.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: str,
        lr: float,
        window: int,
        update: str = "window",
        method: str = "tbptt",
    ):
        if update not in ("window", "sequence"):
            raise CompareError(f"--tbptt-update must be 'window' or 'sequence', got {update!r}")
        self.method, self.model, self.loss = method, model, loss
        self.window, self.update = window, update
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        self._state = None

    def _windows(self, xs, ys, state=None):
        state = zero_state(self.model, xs.shape[1]) if state is None else state
        return tbptt_windows(self.model, xs, ys, self.loss, window=self.window, state=state or None)

    def gradients(self, xs, ys) -> dict[str, torch.Tensor]:
        total = None
        for win in self._windows(xs, ys):
            total = (
                dict(win.grads)
                if total is None
                else {n: g + win.grads[n] for n, g in total.items()}
            )
        return total

    def train_batch(self, xs, ys) -> float:
        loss, total = 0.0, None
        for win in self._windows(xs, ys):
            loss += win.loss
            if self.update == "window":
                if win.has_loss:
                    _set_grads(self.model, win.grads)
                    self.optimizer.step()
            else:
                total = (
                    dict(win.grads)
                    if total is None
                    else {n: g + win.grads[n] for n, g in total.items()}
                )
        if total is not None:
            _set_grads(self.model, total)
            self.optimizer.step()
        return loss


class OnlineTrainer:
    """`OnlineLearner.run` over the sequence (gradients into `p.grad`), then an Adam step."""

    def __init__(
        self,
        method: str,
        model: nn.Module,
        loss: str,
        lr: float,
        example_x: torch.Tensor,
        decay: float,
        algorithm: str | None = None,
        window: int | None = None,
    ):
        from etrace_bridge.learner import OnlineLearner

        algorithm = algorithm or method
        self.method, self.model, self.decay = method, model, decay
        options = {} if algorithm == "d_rtrl" else {"decay_or_rank": decay}
        if window is not None:
            options["window"] = window
        state = zero_state(model, example_x.shape[0])
        try:
            self.learner = OnlineLearner(
                model,
                algorithm=algorithm,
                loss=loss,
                example_inputs=(example_x, *state),
                custom_ops=CUSTOM_OPS,
                **options,
            )
        except Exception as err:
            raise CompareError(
                f"cannot convert the model for online learning ({method}): {one_line(err)}"
            ) from err
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        self._ran = False

    def _run(self, xs, ys) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        try:
            self.learner.reset_state(xs.shape[1])
            loss = float(self.learner.run(xs, ys))
        except Exception as err:
            if self._ran:
                raise
            raise CompareError(
                f"the first online run ({self.method}) failed: {one_line(err)}"
            ) from err
        self._ran = True
        return loss

    def gradients(self, xs, ys) -> dict[str, torch.Tensor]:
        self._run(xs, ys)
        grads = {
            n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in self.model.named_parameters()
            if p.requires_grad
        }
        self.optimizer.zero_grad(set_to_none=True)
        return grads

    def train_batch(self, xs, ys) -> float:
        loss = self._run(xs, ys)
        self.optimizer.step()
        return loss


def _set_grads(model: nn.Module, grads: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        if name in grads:
            p.grad = grads[name]


def trace_decay(method: str, task: SequenceTask, cfg: CompareConfig) -> float:
    """The io-dim trace decay of a method: its own `@decay`, else --decay, else chosen from the
    task's horizon H as max(0.9, 1 - 1/H) (a trace then remembers about H steps)."""
    option = method_option(method)
    if option is not None:
        return float(option)
    if cfg.decay is not None:
        return cfg.decay
    return horizon_decay(task)


def horizon_decay(task: SequenceTask) -> float:
    horizon = task.horizon or task.seq_len
    return max(0.9, 1.0 - 1.0 / horizon)


def tbptt_window(method: str, cfg: CompareConfig) -> int:
    option = method_option(method)
    return int(option) if option is not None else cfg.tbptt_window


def make_trainer(
    method: str, model: nn.Module, task: SequenceTask, cfg: CompareConfig, example_x: torch.Tensor
):
    base = method_base(method)
    if base == "bptt":
        return BPTTTrainer(model, task_loss(task), cfg.lr)
    if base == "tbptt":
        return TBPTTTrainer(
            model,
            task_loss(task),
            cfg.lr,
            tbptt_window(method, cfg),
            cfg.tbptt_update,
            method=method,
        )
    return OnlineTrainer(
        method,
        model,
        task_loss(task),
        cfg.lr,
        example_x,
        trace_decay(method, task, cfg),
        algorithm=base,
        window=method_window(method),
    )
