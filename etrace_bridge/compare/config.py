"""What `etrace-compare` compares: the configuration, its checks, and the error type."""
from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass

import torch
from etrace_bridge.algorithms import ALGORITHM_NAMES

from .models import MODEL_NAMES
from .tasks import TASK_NAMES

ONLINE_METHODS = ALGORITHM_NAMES
METHODS = ("bptt", *ONLINE_METHODS)



class CompareError(Exception):
    """Bad input, or a model the tool cannot use; the command prints it as one line."""


def one_line(err: BaseException) -> str:
    """`Type: message` with all whitespace (newlines included) collapsed to single spaces."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


@dataclass(frozen=True)
class CompareConfig:
    """What to compare and how long to train (see `etrace-compare --help`)."""
    model: str = "gru"
    task: str = "digits"
    methods: tuple[str, ...] = METHODS
    hidden: int = 64
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-2
    seed: int = 0
    train_subset: int | None = None
    test_subset: int | None = None
    seq_lens: tuple[int, ...] = (10, 100, 1000)
    decay: float = 0.9
    dtype: str = "float32"
    measure_memory: bool = True
    sweep: bool = True
    progress: bool = True
    threads: int | None = 1

    def checked(self) -> "CompareConfig":
        """Validate names and sizes (raises CompareError); methods deduplicated, in given order."""
        methods = tuple(dict.fromkeys(m.strip().lower().replace("-", "_")
                                      for m in self.methods if m.strip()))
        if not methods:
            raise CompareError(f"no methods given; choose from {', '.join(METHODS)}")
        for m in methods:
            if m not in METHODS:
                raise CompareError(f"unknown method {m!r}; expected one of {', '.join(METHODS)}")
        if self.task not in TASK_NAMES:
            raise CompareError(f"unknown task {self.task!r}; expected one of "
                               f"{', '.join(TASK_NAMES)}")
        if not is_file_spec(self.model) and self.model not in MODEL_NAMES:
            raise CompareError(f"unknown model {self.model!r}; expected one of "
                               f"{', '.join(MODEL_NAMES)} or path/to/file.py:factory")
        for name in ("hidden", "epochs", "batch_size", "train_subset", "test_subset", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise CompareError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if not self.seq_lens or min(self.seq_lens) < 1:
            raise CompareError(f"--seq-lens must be positive integers, got {list(self.seq_lens)}")
        if not 0.0 <= self.decay < 1.0:
            raise CompareError(f"--decay must be in [0, 1), got {self.decay}")
        if self.lr <= 0:
            raise CompareError(f"--lr must be positive, got {self.lr}")
        if self.dtype not in ("float32", "float64"):
            raise CompareError(f"--dtype must be float32 or float64, got {self.dtype!r}")
        return dataclasses.replace(self, methods=methods,
                                   seq_lens=tuple(sorted(set(self.seq_lens))))


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
