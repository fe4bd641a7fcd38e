"""The task's data as torch minibatches, synthetic sequences of any length, and evaluation."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from .config import CompareConfig
from .factory import torch_outputs
from .tasks import IGNORE_INDEX, SequenceTask, get_task, iterate_minibatches

EVAL_CHUNK = 512


def load_task(cfg: CompareConfig) -> SequenceTask:
    """The task, cut to the configured train/test subsets (first sequences of each split)."""
    task = get_task(cfg.task, seed=cfg.seed, **cfg.task_kwargs())
    n_train = min(cfg.train_subset or task.n_train, task.n_train)
    n_test = min(cfg.test_subset or task.n_test, task.n_test)
    return dataclasses.replace(
        task,
        xs_train=task.xs_train[:, :n_train],
        ys_train=task.ys_train[:, :n_train],
        xs_test=task.xs_test[:, :n_test],
        ys_test=task.ys_test[:, :n_test],
    )


def task_loss(task: SequenceTask) -> str:
    return "mse" if task.kind == "regression_every_step" else "cross_entropy"


def batch_size_for(task: SequenceTask, cfg: CompareConfig) -> int:
    return min(cfg.batch_size, task.n_train)


def minibatches(
    task: SequenceTask, cfg: CompareConfig, epoch: int, dtype: torch.dtype
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The epoch's shuffled full-size minibatches as torch tensors, identical for every method."""
    for xs, ys in iterate_minibatches(
        task.xs_train,
        task.ys_train,
        batch_size_for(task, cfg),
        shuffle=True,
        seed=cfg.seed * 1000 + epoch,
        drop_last=True,
    ):
        yield _tensors(xs, ys, dtype)


def _tensors(xs, ys, dtype):
    ys = torch.from_numpy(np.ascontiguousarray(ys))
    return (
        torch.from_numpy(np.ascontiguousarray(xs)).to(dtype),
        ys.to(dtype) if ys.is_floating_point() else ys,
    )


def first_minibatch(task, cfg, dtype):
    return next(minibatches(task, cfg, 1, dtype))


def n_minibatches(task: SequenceTask, cfg: CompareConfig) -> int:
    return task.n_train // batch_size_for(task, cfg)


def synthetic_batch(task: SequenceTask, seq_len: int, batch: int, dtype, seed: int):
    """Random inputs of the task's input size and random targets of the task's kind, length T."""
    gen = torch.Generator().manual_seed(seed)
    xs = torch.rand(seq_len, batch, task.n_in, generator=gen, dtype=dtype)
    if task.kind == "regression_every_step":
        return xs, torch.randn(seq_len, batch, task.n_out, generator=gen, dtype=dtype)
    labels = torch.randint(0, task.n_out, (seq_len, batch), generator=gen)
    if task.kind == "classification_last":
        labels[:-1] = IGNORE_INDEX
    return xs, labels


# ----------------------------------------------------------------------------- evaluation


def evaluate(
    model: nn.Module, xs: np.ndarray, ys: np.ndarray, kind: str, dtype
) -> tuple[float, float]:
    """(loss, accuracy) of the torch model: mean cross-entropy over labelled entries and their
    accuracy; for regression, mean squared error and NaN."""
    total, count, correct = 0.0, 0, 0
    for start in range(0, xs.shape[1], EVAL_CHUNK):
        x, y = _tensors(xs[:, start : start + EVAL_CHUNK], ys[:, start : start + EVAL_CHUNK], dtype)
        out = torch_outputs(model, x)
        if kind == "regression_every_step":
            total += float(((out - y) ** 2).sum())
            count += y.numel()
            continue
        logits, labels = out.reshape(-1, out.shape[-1]), y.reshape(-1)
        mask = labels != IGNORE_INDEX
        total += float(
            torch.nn.functional.cross_entropy(logits[mask], labels[mask], reduction="sum")
        )
        correct += int((logits[mask].argmax(-1) == labels[mask]).sum())
        count += int(mask.sum())
    count = max(count, 1)
    return total / count, (float("nan") if kind == "regression_every_step" else correct / count)
