"""One training step per method: torch BPTT, or an OnlineLearner, each followed by Adam."""
from __future__ import annotations

import torch
from etrace_bridge.bptt import bptt_gradients
from torch import nn

from .config import CompareConfig, CompareError, one_line
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
        for name, p in self.model.named_parameters():
            if name in result.grads:
                p.grad = result.grads[name]
        self.optimizer.step()
        return result.loss


class OnlineTrainer:
    """`OnlineLearner.run` over the sequence (gradients into `p.grad`), then an Adam step."""

    def __init__(self, method: str, model: nn.Module, loss: str, lr: float,
                 example_x: torch.Tensor, decay: float):
        from etrace_bridge.learner import OnlineLearner

        self.method, self.model = method, model
        options = {} if method == "d_rtrl" else {"decay_or_rank": decay}
        state = zero_state(model, example_x.shape[0])
        try:
            self.learner = OnlineLearner(model, algorithm=method, loss=loss,
                                         example_inputs=(example_x, *state),
                                         custom_ops=CUSTOM_OPS, **options)
        except Exception as err:
            raise CompareError(f"cannot convert the model for online learning ({method}): "
                               f"{one_line(err)}") from err
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
            raise CompareError(f"the first online run ({self.method}) failed: "
                               f"{one_line(err)}") from err
        self._ran = True
        return loss

    def gradients(self, xs, ys) -> dict[str, torch.Tensor]:
        self._run(xs, ys)
        grads = {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
                 for n, p in self.model.named_parameters() if p.requires_grad}
        self.optimizer.zero_grad(set_to_none=True)
        return grads

    def train_batch(self, xs, ys) -> float:
        loss = self._run(xs, ys)
        self.optimizer.step()
        return loss


def make_trainer(method: str, model: nn.Module, task: SequenceTask, cfg: CompareConfig,
                 example_x: torch.Tensor):
    if method == "bptt":
        return BPTTTrainer(model, task_loss(task), cfg.lr)
    return OnlineTrainer(method, model, task_loss(task), cfg.lr, example_x, cfg.decay)
