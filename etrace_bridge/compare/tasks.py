"""Built-in sequence tasks that need no download.

Every task is time-major: inputs `(T, N, n_in)` float32. The loss is applied at
every step to `(output_t, ys[t])`, which makes all kinds uniform:

- 'classification_last' and 'classification_every_step': `ys` is `(T, N)` int64
  class labels with IGNORE_INDEX (-100) on steps that carry no loss (for
  'classification_last' every step but the last). The named loss 'cross_entropy'
  of `etrace_bridge.bptt` and torch's `ignore_index` skip those entries.
- 'regression_every_step': `ys` is `(T, N, n_out)` float32, loss on every step.

The readout is the model output at each step; accuracy is measured on the
entries whose label is not -100.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from etrace_bridge.losses import IGNORE_INDEX

__all__ = [
    "IGNORE_INDEX",
    "SequenceTask",
    "sequential_digits",
    "delayed_recall",
    "spiking_dms",
    "cue_delay",
    "TASK_NAMES",
    "TASK_SETTINGS",
    "get_task",
    "iterate_minibatches",
]


KINDS = ("classification_last", "classification_every_step", "regression_every_step")


@dataclass
class SequenceTask:
    """A train/test split of a time-major sequence task (see the module docstring)."""

    name: str
    xs_train: np.ndarray
    ys_train: np.ndarray
    xs_test: np.ndarray
    ys_test: np.ndarray
    n_in: int
    n_out: int
    kind: str
    horizon: int | None = None  # steps from the earliest input a target needs to that target

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind {self.kind!r} not in {KINDS}")

    @property
    def seq_len(self) -> int:
        return self.xs_train.shape[0]

    @property
    def n_train(self) -> int:
        return self.xs_train.shape[1]

    @property
    def n_test(self) -> int:
        return self.xs_test.shape[1]


def _last_step_labels(labels: np.ndarray, seq_len: int) -> np.ndarray:
    ys = np.full((seq_len, len(labels)), IGNORE_INDEX, dtype=np.int64)
    ys[-1] = labels
    return ys


def sequential_digits(
    seed: int = 0, test_fraction: float = 0.25, rows: bool = True
) -> SequenceTask:
    """The 8x8 digits bundled with scikit-learn, scaled to [0, 1], one image per sequence.

    rows=True: one image row per step (T=8, n_in=8); rows=False: one pixel per step
    (T=64, n_in=1). Label (10 classes) at the last step only. The split is
    stratified by class and shuffled with `seed`.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    tr, te = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, random_state=seed, stratify=labels
    )
    shape = (8, 8) if rows else (64, 1)

    def time_major(idx):
        return np.ascontiguousarray(images[idx].reshape(len(idx), *shape).transpose(1, 0, 2))

    return SequenceTask(
        name="digits" if rows else "digits_pixels",
        xs_train=time_major(tr),
        ys_train=_last_step_labels(labels[tr], shape[0]),
        xs_test=time_major(te),
        ys_test=_last_step_labels(labels[te], shape[0]),
        n_in=shape[1],
        n_out=10,
        kind="classification_last",
        horizon=shape[0],
    )


def delayed_recall(
    n_train: int = 1024,
    n_test: int = 256,
    seq_len: int = 20,
    n_symbols: int = 4,
    delay: int = 5,
    seed: int = 0,
) -> SequenceTask:
    """Recall the symbol shown `delay` steps earlier.

    Each step shows a uniformly random symbol as a one-hot vector (n_in = n_symbols);
    the target at step t >= delay is the symbol of step t - delay, -100 before.
    """
    if not 0 < delay < seq_len:
        raise ValueError(f"need 0 < delay < seq_len, got delay={delay}, seq_len={seq_len}")
    rng = np.random.default_rng(seed)

    def make(n):
        symbols = rng.integers(0, n_symbols, size=(seq_len, n))
        xs = np.eye(n_symbols, dtype=np.float32)[symbols]
        ys = np.full((seq_len, n), IGNORE_INDEX, dtype=np.int64)
        ys[delay:] = symbols[:-delay]
        return xs, ys

    xs_train, ys_train = make(n_train)
    xs_test, ys_test = make(n_test)
    return SequenceTask(
        "recall",
        xs_train,
        ys_train,
        xs_test,
        ys_test,
        n_in=n_symbols,
        n_out=n_symbols,
        kind="classification_every_step",
        horizon=delay + 1,
    )


DMS_RATE_ON = 0.2
DMS_RATE_OFF = 0.02


def spiking_dms(
    n_train: int = 1024, n_test: int = 256, seq_len: int = 50, n_in: int = 40, seed: int = 0
) -> SequenceTask:
    """Spiking delayed match-to-sample: does the test pattern match the sample pattern?

    Inputs are Bernoulli (discrete-time Poisson) spikes, 0/1 float32. The input
    neurons are split at random into two populations, one per pattern. Steps
    [0, S) show the sample: its population fires with probability DMS_RATE_ON per
    step, everything else with DMS_RATE_OFF; steps [S, T - S) are a delay at
    DMS_RATE_OFF; steps [T - S, T) show the test pattern. S = max(1, round(0.3 T)).
    Label 1 = match, 0 = non-match, at the last step; exactly half of each split
    matches, and sample patterns are balanced too.
    """
    if seq_len < 2 or n_in < 2:
        raise ValueError("spiking_dms needs seq_len >= 2 and n_in >= 2")
    rng = np.random.default_rng(seed)
    period = max(1, round(0.3 * seq_len))
    populations = np.zeros((2, n_in), dtype=bool)
    order = rng.permutation(n_in)
    populations[0, order[: n_in // 2]] = True
    populations[1, order[n_in // 2 :]] = True

    def make(n):
        match = rng.permutation(np.arange(n) % 2)
        sample = rng.permutation((np.arange(n) // 2) % 2)
        test = np.where(match == 1, sample, 1 - sample)
        rates = np.full((seq_len, n, n_in), DMS_RATE_OFF)
        rates[:period] = np.where(populations[sample], DMS_RATE_ON, DMS_RATE_OFF)
        rates[seq_len - period :] = np.where(populations[test], DMS_RATE_ON, DMS_RATE_OFF)
        xs = (rng.random(rates.shape) < rates).astype(np.float32)
        return xs, _last_step_labels(match.astype(np.int64), seq_len)

    xs_train, ys_train = make(n_train)
    xs_test, ys_test = make(n_test)
    return SequenceTask(
        "dms",
        xs_train,
        ys_train,
        xs_test,
        ys_test,
        n_in=n_in,
        n_out=2,
        kind="classification_last",
        horizon=seq_len,
    )


def cue_delay(
    n_train: int = 1024,
    n_test: int = 256,
    delay: int = 100,
    n_cues: int = 4,
    distractors: int = 4,
    noise: float = 1.0,
    seed: int = 0,
) -> SequenceTask:
    """Cue, delay, go: report the cue shown `delay` + 1 steps before the go signal.

    Step 0 shows one of `n_cues` cues (one-hot on the cue channels); steps 1..delay show
    Gaussian noise of std `noise` on `distractors` distractor channels (cue and go channels
    zero); step delay + 1 shows the go channel. The label (the cue) is given at that last step
    only, so T = delay + 2 and the one dependency spans delay + 1 steps. Cues are balanced in
    each split; chance is 1 / n_cues. Inputs: n_cues + 1 + distractors channels.
    """
    if delay < 1 or n_cues < 2 or distractors < 0 or noise < 0:
        raise ValueError(
            f"cue_delay needs delay >= 1, n_cues >= 2, distractors >= 0, noise >= 0;"
            f" got delay={delay}, n_cues={n_cues}, distractors={distractors}, "
            f"noise={noise}"
        )
    rng = np.random.default_rng(seed)
    seq_len, n_in = delay + 2, n_cues + 1 + distractors

    def make(n):
        cues = rng.permutation(np.arange(n) % n_cues)
        xs = np.zeros((seq_len, n, n_in), dtype=np.float32)
        xs[0, np.arange(n), cues] = 1.0
        xs[1 : delay + 1, :, n_cues + 1 :] = noise * rng.standard_normal(
            (delay, n, distractors)
        ).astype(np.float32)
        xs[-1, :, n_cues] = 1.0
        return xs, _last_step_labels(cues.astype(np.int64), seq_len)

    xs_train, ys_train = make(n_train)
    xs_test, ys_test = make(n_test)
    return SequenceTask(
        "cue_delay",
        xs_train,
        ys_train,
        xs_test,
        ys_test,
        n_in=n_in,
        n_out=n_cues,
        kind="classification_last",
        horizon=delay + 1,
    )


_TASKS = {
    "cue_delay": cue_delay,
    "digits": sequential_digits,
    "recall": delayed_recall,
    "dms": spiking_dms,
}
TASK_NAMES = tuple(_TASKS)
# The command-line settings each task takes (keyword arguments of its function).
TASK_SETTINGS = {
    "cue_delay": ("delay", "n_cues", "distractors", "noise", "n_train", "n_test"),
    "digits": (),
    "recall": ("delay", "seq_len", "n_symbols", "n_train", "n_test"),
    "dms": ("seq_len", "n_train", "n_test"),
}


def get_task(name: str, **kwargs) -> SequenceTask:
    """Build a task by name ('cue_delay', 'digits', 'recall', 'dms'); kwargs go to its function
    (the settings in TASK_SETTINGS[name], and seed)."""
    try:
        fn = _TASKS[name]
    except KeyError:
        raise ValueError(
            f"unknown task {name!r}; expected one of {', '.join(TASK_NAMES)}"
        ) from None
    return fn(**kwargs)


def iterate_minibatches(
    xs: np.ndarray,
    ys: np.ndarray,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int | None = 0,
    drop_last: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield time-major `(xs[:, idx], ys[:, idx])` batches over the sequence axis 1.

    With shuffle=True the order is a permutation drawn from `seed`. The last,
    smaller batch is yielded unless drop_last=True.
    """
    n = xs.shape[1]
    if ys.shape[1] != n:
        raise ValueError(f"xs has {n} sequences but ys has {ys.shape[1]}")
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        yield xs[:, idx], ys[:, idx]
