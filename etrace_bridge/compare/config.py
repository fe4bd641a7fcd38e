"""What `etrace-compare` compares: the configuration, its checks, and the error type."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass

import torch

from etrace_bridge.algorithms import ALGORITHM_NAMES

from .models import MODEL_NAMES
from .tasks import TASK_NAMES, TASK_SETTINGS

ONLINE_METHODS = ALGORITHM_NAMES
# bptt: torch BPTT; tbptt: torch truncated BPTT (window K, state detached between windows);
# the rest are etrace's online algorithms. `name@value` is a variant: tbptt@K (window),
# es_d_rtrl@0.99 / hybrid@0.99 (trace decay). An online method ending in `+wK` learns in windows
# of K steps (exact BPTT inside a window, traces across windows): d_rtrl+w4, es_d_rtrl@0.99+w2;
# `+w1` is one step of exact backprop + traces.
METHODS = ("bptt", "tbptt", *ONLINE_METHODS)
DEFAULT_METHODS = ("bptt", "tbptt", "d_rtrl", "es_d_rtrl")
TORCH_METHODS = ("bptt", "tbptt")
_VARIANT_OPTION = {"tbptt": "window", "es_d_rtrl": "decay", "hybrid": "decay"}
# command-line flag -> CompareConfig field -> task keyword
TASK_FLAGS = {
    "delay": "delay",
    "seq_len": "seq_len",
    "distractors": "distractors",
    "cues": "n_cues",
    "n_train": "n_train",
    "n_test": "n_test",
}


WINDOW_MARK = "+w"
VARIANTS_HELP = "tbptt@K, es_d_rtrl@DECAY, hybrid@DECAY, and +wK on an online method"


def method_base(method: str) -> str:
    """'tbptt@20' -> 'tbptt', 'es_d_rtrl@0.99+w4' -> 'es_d_rtrl'."""
    return method.partition(WINDOW_MARK)[0].partition("@")[0]


def method_option(method: str) -> float | None:
    """'tbptt@20' -> 20.0, 'es_d_rtrl@0.99' -> 0.99, 'es_d_rtrl@0.99+w4' -> 0.99, 'bptt' -> None."""
    _, at, value = method.partition(WINDOW_MARK)[0].partition("@")
    return float(value) if at else None


def method_window(method: str) -> int | None:
    """The online window of a variant: 'd_rtrl+w4' -> 4, 'd_rtrl' -> None."""
    _, mark, value = method.partition(WINDOW_MARK)
    return int(value) if mark else None


def is_online(method: str) -> bool:
    return method_base(method) not in TORCH_METHODS


class CompareError(Exception):
    """Bad input, or a model the tool cannot use; the command prints it as one line."""


def one_line(err: BaseException) -> str:
    """`Type: message` with all whitespace (newlines included) collapsed to single spaces."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


@dataclass(frozen=True)
class CompareConfig:
    """What to compare and how long to train (see `etrace-compare --help`)."""

    model: str = "multiscale"
    task: str = "cue_delay"
    methods: tuple[str, ...] = DEFAULT_METHODS
    hidden: int = 64
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-2
    seed: int = 0
    train_subset: int | None = None
    test_subset: int | None = None
    seq_lens: tuple[int, ...] = (10, 100, 1000)
    decay: float | None = None  # None: chosen from the task's horizon (trace_decay)
    dtype: str = "float32"
    measure_memory: bool = True
    sweep: bool = True
    progress: bool = True
    threads: int | None = 1
    # task settings (None: the task's default; only the ones a task takes, see TASK_SETTINGS)
    delay: int | None = None
    seq_len: int | None = None
    distractors: int | None = None
    cues: int | None = None
    n_train: int | None = None
    n_test: int | None = None
    tbptt_window: int = 10
    tbptt_update: str = "window"
    memory_budget: float = 4096.0  # MiB; a method whose step would pass it is not run
    stream: bool = False
    stream_every: int = 10
    stream_trials: int = 200

    def task_kwargs(self) -> dict:
        """The task keywords given on the command line (checked by `checked`)."""
        return {
            kw: getattr(self, field)
            for field, kw in TASK_FLAGS.items()
            if getattr(self, field) is not None
        }

    def checked(self) -> CompareConfig:
        """Validate names and sizes (raises CompareError); methods deduplicated, in given order."""
        methods = tuple(
            dict.fromkeys(m.strip().lower().replace("-", "_") for m in self.methods if m.strip())
        )
        if not methods:
            raise CompareError(f"no methods given; choose from {', '.join(METHODS)}")
        for m in methods:
            _check_method(m)
        if self.task not in TASK_NAMES:
            raise CompareError(
                f"unknown task {self.task!r}; expected one of {', '.join(TASK_NAMES)}"
            )
        wrong = [
            f"--{f.replace('_', '-')}"
            for f, kw in TASK_FLAGS.items()
            if getattr(self, f) is not None and kw not in TASK_SETTINGS[self.task]
        ]
        if wrong:
            takes = (
                ", ".join(
                    f"--{f.replace('_', '-')}"
                    for f, kw in TASK_FLAGS.items()
                    if kw in TASK_SETTINGS[self.task]
                )
                or "no settings"
            )
            raise CompareError(
                f"task {self.task} does not take {', '.join(wrong)} (it takes {takes})"
            )
        for name in ("delay", "seq_len", "distractors", "cues", "n_train", "n_test"):
            value = getattr(self, name)
            if value is not None and value < (0 if name == "distractors" else 1):
                raise CompareError(
                    f"--{name.replace('_', '-')} must be "
                    f"{'>= 0' if name == 'distractors' else 'at least 1'}, "
                    f"got {value}"
                )
        if self.cues is not None and self.cues < 2:
            raise CompareError(f"--cues must be at least 2, got {self.cues}")
        if self.tbptt_window < 1:
            raise CompareError(f"--tbptt-window must be at least 1, got {self.tbptt_window}")
        if self.tbptt_update not in ("window", "sequence"):
            raise CompareError(
                f"--tbptt-update must be window or sequence, got {self.tbptt_update!r}"
            )
        if self.memory_budget <= 0:
            raise CompareError(f"--memory-budget must be positive (MiB), got {self.memory_budget}")
        if self.stream_every < 1 or self.stream_trials < 1:
            raise CompareError("--stream-every and --stream-trials must be at least 1")
        if self.stream and self.task != "cue_delay":
            raise CompareError(f"--stream runs the cue_delay task, not {self.task}")
        if not is_file_spec(self.model) and self.model not in MODEL_NAMES:
            raise CompareError(
                f"unknown model {self.model!r}; expected one of "
                f"{', '.join(MODEL_NAMES)} or path/to/file.py:factory"
            )
        for name in ("hidden", "epochs", "batch_size", "train_subset", "test_subset", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise CompareError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if not self.seq_lens or min(self.seq_lens) < 1:
            raise CompareError(f"--seq-lens must be positive integers, got {list(self.seq_lens)}")
        if self.decay is not None and not 0.0 <= self.decay < 1.0:
            raise CompareError(f"--decay must be in [0, 1), got {self.decay}")
        if self.lr <= 0:
            raise CompareError(f"--lr must be positive, got {self.lr}")
        if self.dtype not in ("float32", "float64"):
            raise CompareError(f"--dtype must be float32 or float64, got {self.dtype!r}")
        return dataclasses.replace(
            self, methods=methods, seq_lens=tuple(sorted(set(self.seq_lens)))
        )


def _check_method(m: str) -> None:
    head, mark, window = m.partition(WINDOW_MARK)
    base, at, value = head.partition("@")
    if base not in METHODS:
        raise CompareError(
            f"unknown method {m!r}; expected one of {', '.join(METHODS)} "
            f"(variants: {VARIANTS_HELP})"
        )
    if mark:
        if base in TORCH_METHODS:
            raise CompareError(
                f"{m!r}: +wK (online windows) applies to the online methods "
                f"{', '.join(ONLINE_METHODS)}; truncated BPTT's window is tbptt@K"
            )
        if not (window.isdigit() and int(window) >= 1):
            raise CompareError(f"{m!r}: the online window +wK needs a positive integer K")
    if not at:
        return
    if base not in _VARIANT_OPTION:
        raise CompareError(f"method {base} takes no @option (got {m!r}); variants: {VARIANTS_HELP}")
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if base == "tbptt" and not (number >= 1 and number == int(number)):
        raise CompareError(f"{m!r}: the TBPTT window must be a positive integer")
    if base != "tbptt" and not 0.0 <= number < 1.0:
        raise CompareError(f"{m!r}: the trace decay must be in [0, 1)")


def is_file_spec(spec: str) -> bool:
    return ":" in spec or spec.endswith(".py") or os.sep in spec


@contextlib.contextmanager
def numeric_setup(cfg: CompareConfig):
    """JAX 64-bit mode for float64 runs and the torch thread count; both restored afterwards."""
    import jax

    previous_x64 = jax.config.read("jax_enable_x64")
    previous_threads = torch.get_num_threads()
    jax.config.update("jax_enable_x64", cfg.dtype == "float64")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous_x64)
        torch.set_num_threads(previous_threads)


def torch_dtype(name: str) -> torch.dtype:
    return torch.float64 if name == "float64" else torch.float32
