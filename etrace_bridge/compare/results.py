"""What a comparison measured, as plain records (the report reads only these)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from etrace_bridge.bptt import GradientReport

from .config import CompareConfig


class EpochStats(NamedTuple):
    """Torch-evaluated loss/accuracy after `epoch` epochs (0 = initial weights)."""
    epoch: int
    train_loss: float
    train_acc: float
    test_loss: float
    test_acc: float
    objective: float      # mean training objective over the epoch's minibatches (NaN at 0)
    seconds: float        # wall time of the epoch's training steps (0 at epoch 0)


@dataclass
class MethodRun:
    method: str
    setup_seconds: float            # conversion + first (compiling) run, or 0-ish for BPTT
    curve: list[EpochStats] = field(default_factory=list)

    @property
    def final(self) -> EpochStats:
        return self.curve[-1]

    @property
    def seconds_per_epoch(self) -> float:
        times = [e.seconds for e in self.curve[1:]]
        return float(np.mean(times)) if times else float("nan")


class TimePoint(NamedTuple):
    """Wall time of one training step (forward, gradients, Adam) over T synthetic steps."""
    seq_len: int
    first_seconds: float    # the first step at this T (includes compilation for online methods)
    step_seconds: float     # a warm step: the fastest of up to three


class MemoryPoint(NamedTuple):
    seq_len: int
    peak_mb: float          # peak RSS (MiB) during the first training step of length T
    before_mb: float        # RSS (MiB) just before that step

    @property
    def step_mb(self) -> float:
        """What the step added on top of the process's resident memory."""
        return self.peak_mb - self.before_mb


@dataclass
class MemoryProfile:
    """What one fresh process training with `method` measured."""
    method: str
    task_peak_mb: float = float("nan")     # peak RSS since start, after one task minibatch
    sweep: list[MemoryPoint] = field(default_factory=list)
    hwm_reset: bool = True
    error: str | None = None


@dataclass
class ComparisonResult:
    config: CompareConfig
    model_spec: str
    model_class: str
    n_params: int
    task: dict
    batch_size: int
    n_batches: int
    runs: dict[str, MethodRun] = field(default_factory=dict)
    fidelity: dict[str, GradientReport] = field(default_factory=dict)
    timing: dict[str, list[TimePoint]] = field(default_factory=dict)
    memory: dict[str, MemoryProfile] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
