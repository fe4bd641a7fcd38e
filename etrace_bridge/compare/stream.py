"""`--stream`: learn on one long stream of cue-delay trials, step by step, with an optimizer
step every N time steps and no reset between trials: the setting BPTT cannot do at all (it
needs the whole sequence before its first update).

- Online methods: `OnlineLearner.run` on each chunk of N steps continues the hidden states and
  traces of the previous chunk; Adam steps after each chunk.
- TBPTT: `tbptt_windows` over the whole stream with window N (whatever --tbptt-window or
  tbptt@K say) and an Adam step after every window that holds a go step (the usual PyTorch
  stream loop).
- BPTT: not run (reported as not applicable).

Accuracy over time: the prediction at each go step is the output the model gave then, with
the weights it had then (for online methods the torch model is stepped alongside the learner
without gradients, with the same weights). B = --batch-size independent streams run side by
side; every method sees the same streams and starts from the same weights.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import numpy as np
import torch

from .config import CompareConfig, method_base, one_line, torch_dtype
from .factory import zero_state
from .results import StreamPoint, StreamRun
from .tasks import IGNORE_INDEX, SequenceTask, cue_delay
from .trainers import OnlineTrainer, TBPTTTrainer, make_trainer


def stream_data(cfg: CompareConfig) -> tuple[SequenceTask, np.ndarray, np.ndarray]:
    """B streams of `stream_trials` cue-delay trials back to back: xs (trials*T, B, n_in), ys
    (trials*T, B) with the cue as label at each go step and -100 elsewhere."""
    kwargs = {k: v for k, v in cfg.task_kwargs().items() if k not in ("n_train", "n_test")}
    batch = cfg.batch_size
    task = cue_delay(n_train=batch * cfg.stream_trials, n_test=1, seed=cfg.seed + 7919, **kwargs)
    T, n_in = task.seq_len, task.n_in
    xs = task.xs_train.reshape(T, cfg.stream_trials, batch, n_in).transpose(1, 0, 2, 3)
    ys = task.ys_train.reshape(T, cfg.stream_trials, batch).transpose(1, 0, 2)
    return (
        task,
        np.ascontiguousarray(xs.reshape(-1, batch, n_in)),
        np.ascontiguousarray(ys.reshape(-1, batch)),
    )


def run_stream(cfg: CompareConfig, init, log: Callable[[str], None]) -> dict[str, StreamRun]:
    task, xs_np, ys_np = stream_data(cfg)
    dtype = torch_dtype(cfg.dtype)
    xs, ys = torch.from_numpy(xs_np).to(dtype), torch.from_numpy(ys_np)
    log(
        f"stream: {cfg.batch_size} streams of {cfg.stream_trials} trials "
        f"({xs.shape[0]} steps each), optimizer step every {cfg.stream_every} steps"
    )
    runs = {}
    for method in cfg.methods:
        if method_base(method) == "bptt":
            runs[method] = StreamRun(
                method,
                cfg.stream_every,
                error="not applicable: BPTT needs the whole stream before its first update",
            )
            continue
        log(f"stream: {method} ...")
        trainer = make_trainer(method, copy.deepcopy(init), task, cfg, xs[0])
        t0 = time.perf_counter()
        try:
            if isinstance(trainer, TBPTTTrainer):
                trainer.window = cfg.stream_every
                correct = _stream_tbptt(trainer, xs, ys)
            else:
                correct = _stream_online(trainer, xs, ys, cfg.stream_every)
        except Exception as err:
            runs[method] = StreamRun(method, cfg.stream_every, error=one_line(err))
            continue
        run = StreamRun(method, cfg.stream_every, seconds=time.perf_counter() - t0)
        run.curve = accuracy_curve(correct, ys_np, task.seq_len)
        runs[method] = run
    return runs


def _go_correct(outputs: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """(T, B) array: 1/0 at labelled steps (prediction right/wrong), NaN elsewhere."""
    right = (outputs.argmax(-1) == labels).double()
    right[labels == IGNORE_INDEX] = float("nan")
    return right.numpy()


def _stream_tbptt(trainer: TBPTTTrainer, xs, ys) -> np.ndarray:
    correct = []
    for win in trainer._windows(xs, ys):
        correct.append(_go_correct(win.outputs, ys[win.start : win.stop]))
        if win.has_loss:
            for name, p in trainer.model.named_parameters():
                p.grad = win.grads[name]
            trainer.optimizer.step()
    return np.concatenate(correct)


def _stream_online(trainer: OnlineTrainer, xs, ys, every: int) -> np.ndarray:
    model, learner = trainer.model, trainer.learner
    learner.reset_state(xs.shape[1])
    state = zero_state(model, xs.shape[1])
    correct = []
    for start in range(0, xs.shape[0], every):
        x, y = xs[start : start + every], ys[start : start + every]
        outputs = []
        with torch.no_grad():  # what the model predicts now, with its current weights
            for x_t in x:
                out = model(x_t, *state)
                if state:
                    out, *state = out
                outputs.append(out)
        correct.append(_go_correct(torch.stack(outputs), y))
        trainer.optimizer.zero_grad(set_to_none=True)
        learner.run(x, y)
        trainer.optimizer.step()
    return np.concatenate(correct)


def accuracy_curve(
    correct: np.ndarray, ys: np.ndarray, trial_len: int, bins: int = 20
) -> list[StreamPoint]:
    """Accuracy over the go steps of consecutive bins of trials, all streams together."""
    trials = correct.shape[0] // trial_len
    per_trial = correct.reshape(trials, trial_len, -1)[:, -1]  # (trials, B) at the go step
    size = max(1, trials // bins)
    points = []
    for start in range(0, trials, size):
        chunk = per_trial[start : start + size]
        points.append(
            StreamPoint(
                step=(start + len(chunk)) * trial_len,
                trials=start + len(chunk),
                accuracy=float(np.mean(chunk)),
            )
        )
    return points
