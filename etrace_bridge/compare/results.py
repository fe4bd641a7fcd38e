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
    objective: float  # mean training objective over the epoch's minibatches (NaN at 0)
    seconds: float  # wall time of the epoch's training steps (0 at epoch 0)


@dataclass
class MethodRun:
    method: str
    setup_seconds: float  # conversion + first (compiling) run, or 0-ish for BPTT
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
    first_seconds: float  # the first step at this T (includes compilation for online methods)
    step_seconds: float  # a warm step: the fastest of up to three


class MemoryPoint(NamedTuple):
    seq_len: int
    peak_mb: float  # peak RSS (MiB) during the first training step of length T
    before_mb: float  # RSS (MiB) just before that step

    @property
    def step_mb(self) -> float:
        """What the step added on top of the process's resident memory."""
        return self.peak_mb - self.before_mb


@dataclass
class MemoryProfile:
    """What one fresh process training with `method` measured."""

    method: str
    task_peak_mb: float = float("nan")  # peak RSS since start, after one task minibatch
    sweep: list[MemoryPoint] = field(default_factory=list)
    timing: list[TimePoint] = field(default_factory=list)
    hwm_reset: bool = True
    over_budget_from: int | None = None  # first T not run: its step would pass the budget
    error: str | None = None


class MemoryFit(NamedTuple):
    """peak MiB ~ fixed_mb + per_step_kb / 1024 * T, least squares over a method's sweep."""

    fixed_mb: float
    per_step_kb: float
    n_points: int


def memory_fit(profile: MemoryProfile) -> MemoryFit:
    """Separate a method's fixed runtime cost from what each extra time step adds (NaN if fewer
    than two sequence lengths were measured)."""
    points = [(p.seq_len, p.peak_mb) for p in profile.sweep if np.isfinite(p.peak_mb)]
    if len(points) < 2:
        return MemoryFit(float("nan"), float("nan"), len(points))
    ts, mb = np.array(points, dtype=float).T
    slope, intercept = np.polyfit(ts, mb, 1)
    return MemoryFit(float(intercept), float(slope * 1024.0), len(points))


class Crossover(NamedTuple):
    """Where the reference's peak memory passes a method's: from the fitted lines (`fitted_T`),
    and between which measured T it happens (`between`, or None if it never did)."""

    method: str
    fitted_T: float
    between: tuple[int, int] | None


def crossover(reference: MemoryProfile, other: MemoryProfile) -> Crossover:
    ref, oth = memory_fit(reference), memory_fit(other)
    growth = ref.per_step_kb - oth.per_step_kb
    fitted = (
        1024.0 * (oth.fixed_mb - ref.fixed_mb) / growth
        if np.isfinite(growth) and growth > 0
        else float("nan")
    )
    a = {p.seq_len: p.peak_mb for p in reference.sweep}
    b = {p.seq_len: p.peak_mb for p in other.sweep}
    common = sorted(set(a) & set(b))
    between, previous = None, None
    for t in common:
        if a[t] > b[t]:
            between = (previous, t) if previous is not None else (t, t)
            break
        previous = t
    if between is None and reference.over_budget_from is not None and common:
        between = (common[-1], reference.over_budget_from)
    return Crossover(other.method, fitted, between)


class StreamPoint(NamedTuple):
    """Accuracy on the trials that ended within one bin of the stream."""

    step: int  # time step at the end of the bin
    trials: int  # trials seen so far (per stream)
    accuracy: float  # over the bin's trials, all parallel streams


@dataclass
class StreamRun:
    method: str
    every: int  # optimizer step every `every` time steps
    curve: list[StreamPoint] = field(default_factory=list)
    seconds: float = 0.0
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
    stream: dict[str, StreamRun] = field(default_factory=dict)
    decays: dict[str, float] = field(default_factory=dict)  # io-dim trace decay per method
    horizon_decay: float = float("nan")  # max(0.9, 1 - 1/horizon)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
