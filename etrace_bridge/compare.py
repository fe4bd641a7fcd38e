"""Train one torch model by BPTT and by online eligibility-trace learning, side by side.

The measurements behind `etrace-compare` (`etrace_bridge.cli`); `etrace_bridge.report`
turns a `ComparisonResult` into tables and plots.

- Every method starts from the same initial weights (one seeded model, deep-copied), uses
  the same optimizer (Adam) and sees the same minibatches in the same order.
- BPTT gradients come from `etrace_bridge.bptt.bptt_gradients`, online ones from
  `OnlineLearner.run`; both are sums over time of the per-step loss.
- Learning curves are measured with the torch model itself (same evaluation code for all).
- Gradient fidelity: online vs BPTT gradients on the first minibatch at initialisation.
- Time vs sequence length: one training step on synthetic sequences of each length T, timed
  in this process after training (best of a few warm steps).
- Memory: each method trains in its own fresh subprocess (`memory_child`): its peak resident
  set size after one minibatch of the task, then, for each T (ascending), the peak during the
  first training step of length T (the kernel's high-water mark is reset before each point).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import importlib.util
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np
import torch
from torch import nn

from .bptt import GradientReport, bptt_gradients, compare_gradients
from .models import MODEL_NAMES, build_model, initial_state, spike_jax
from .tasks import IGNORE_INDEX, TASK_NAMES, SequenceTask, get_task, iterate_minibatches

__all__ = [
    "METHODS", "ONLINE_METHODS", "CompareError", "CompareConfig", "EpochStats", "MethodRun",
    "TimePoint", "MemoryPoint", "MemoryProfile", "ComparisonResult", "run_comparison",
    "resolve_model", "load_task", "memory_child",
]

METHODS = ("bptt", "d_rtrl", "es_d_rtrl", "hybrid")
ONLINE_METHODS = METHODS[1:]
CUSTOM_OPS = {"etrace::spike": spike_jax}
EVAL_CHUNK = 512
_RESULT_MARK = "ETRACE_MEMORY_RESULT "


class CompareError(Exception):
    """Bad input, or a model the tool cannot use; the command prints it as one line."""


def one_line(err: BaseException) -> str:
    """`Type: message` with all whitespace (newlines included) collapsed to single spaces."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


# ----------------------------------------------------------------------------- configuration

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
        if not _is_file_spec(self.model) and self.model not in MODEL_NAMES:
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


# ----------------------------------------------------------------------------- models

class ModelFactory(NamedTuple):
    """`build(n_in, n_out) -> nn.Module`; `spec` as given, `source` usable from another process."""
    spec: str
    source: str
    build: Callable[[int, int], nn.Module]


def _is_file_spec(spec: str) -> bool:
    return ":" in spec or spec.endswith(".py") or os.sep in spec


def resolve_model(spec: str, hidden: int) -> ModelFactory:
    """A built-in model name ('gru', 'lstm', 'lif', 'leaky') or 'path/to/file.py:factory'."""
    if not _is_file_spec(spec):
        if spec not in MODEL_NAMES:
            raise CompareError(f"unknown model {spec!r}; expected one of {', '.join(MODEL_NAMES)} "
                               "or path/to/file.py:factory")
        return ModelFactory(spec, spec, lambda n_in, n_out: build_model(spec, n_in, n_out,
                                                                          n_hidden=hidden))
    path_text, _, attr = spec.rpartition(":") if ":" in spec else (spec, "", "factory")
    path = Path(path_text).expanduser().resolve()
    factory = _load_factory(path, attr or "factory", spec)
    return ModelFactory(spec, f"{path}:{attr or 'factory'}", factory)


def _load_factory(path: Path, attr: str, spec: str) -> Callable:
    if not path.is_file():
        raise CompareError(f"model file {str(path)!r} not found (from --model {spec})")
    name = path.stem if path.stem.isidentifier() and path.stem not in sys.modules \
        else f"_etrace_user_model_{abs(hash(str(path)))}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise CompareError(f"cannot import {str(path)!r} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    sys.path.insert(0, str(path.parent))
    try:
        module_spec.loader.exec_module(module)
    except BaseException as err:  # SystemExit too: a user file must not end the command
        sys.modules.pop(name, None)
        raise CompareError(f"importing model file {str(path)!r} failed: {one_line(err)}") from err
    finally:
        sys.path.remove(str(path.parent))
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise CompareError(f"model file {str(path)!r} has no callable {attr!r} "
                           "(expected factory(n_in, n_out) -> torch.nn.Module)")
    return factory


def make_model(factory: ModelFactory, task: SequenceTask, cfg: CompareConfig) -> nn.Module:
    """The seeded initial model every method starts from, in the configured dtype."""
    torch.manual_seed(cfg.seed)
    try:
        model = factory.build(task.n_in, task.n_out)
    except Exception as err:
        raise CompareError(f"building model {factory.spec}({task.n_in}, {task.n_out}) failed: "
                           f"{one_line(err)}") from err
    if not isinstance(model, nn.Module):
        raise CompareError(f"model factory {factory.spec} returned {type(model).__name__}, "
                           "not a torch.nn.Module")
    model = model.to(_torch_dtype(cfg.dtype))
    if hasattr(model, "reset_state"):
        model.reset_state(1)  # buffers follow the new dtype
    return model


def zero_state(model: nn.Module, batch: int) -> tuple[torch.Tensor, ...]:
    """Initial recurrent state for `forward(x, *state)`; () for buffer-state models (reset here).

    Understood: `reset_state(batch)` (state in buffers), the model's own
    `initial_state(batch)`, the built-in models, and stateless `forward(x)` models.
    """
    if hasattr(model, "reset_state"):
        model.reset_state(batch)
        return ()
    own = getattr(model, "initial_state", None)
    if callable(own):
        state = own(batch)
        return tuple(state) if isinstance(state, (tuple, list)) else (state,)
    try:
        return initial_state(model, batch)
    except TypeError:
        pass
    if _state_arguments(model) == 0:
        return ()
    raise CompareError(
        f"{type(model).__name__}.forward takes {_state_arguments(model)} state argument(s) but the "
        "model has no initial_state(batch_size) method returning them (or, for state kept in "
        "buffers, a reset_state(batch_size) method)")


def _state_arguments(model: nn.Module) -> int:
    import inspect
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return 0
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return max(0, sum(p.kind in kinds and p.default is p.empty for p in params) - 1)


def torch_outputs(model: nn.Module, xs: torch.Tensor) -> torch.Tensor:
    """Run the torch model over a time-major sequence without gradients; outputs (T, B, ...)."""
    state = zero_state(model, xs.shape[1])
    outputs, training = [], model.training
    model.eval()
    try:
        with torch.no_grad():
            for x in xs:
                out = model(x, *state)
                if state:
                    out, *state = out
                outputs.append(out)
    finally:
        model.train(training)
    return torch.stack(outputs)


# ----------------------------------------------------------------------------- tasks

def load_task(cfg: CompareConfig) -> SequenceTask:
    """The task, cut to the configured train/test subsets (first sequences of each split)."""
    task = get_task(cfg.task, seed=cfg.seed)
    n_train = min(cfg.train_subset or task.n_train, task.n_train)
    n_test = min(cfg.test_subset or task.n_test, task.n_test)
    return dataclasses.replace(
        task, xs_train=task.xs_train[:, :n_train], ys_train=task.ys_train[:, :n_train],
        xs_test=task.xs_test[:, :n_test], ys_test=task.ys_test[:, :n_test])


def task_loss(task: SequenceTask) -> str:
    return "mse" if task.kind == "regression_every_step" else "cross_entropy"


def batch_size_for(task: SequenceTask, cfg: CompareConfig) -> int:
    return min(cfg.batch_size, task.n_train)


def minibatches(task: SequenceTask, cfg: CompareConfig, epoch: int, dtype: torch.dtype
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The epoch's shuffled full-size minibatches as torch tensors, identical for every method."""
    for xs, ys in iterate_minibatches(task.xs_train, task.ys_train, batch_size_for(task, cfg),
                                      shuffle=True, seed=cfg.seed * 1000 + epoch, drop_last=True):
        yield _tensors(xs, ys, dtype)


def _tensors(xs, ys, dtype):
    ys = torch.from_numpy(np.ascontiguousarray(ys))
    return (torch.from_numpy(np.ascontiguousarray(xs)).to(dtype),
            ys.to(dtype) if ys.is_floating_point() else ys)


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

def evaluate(model: nn.Module, xs: np.ndarray, ys: np.ndarray, kind: str, dtype
             ) -> tuple[float, float]:
    """(loss, accuracy) of the torch model: mean cross-entropy over labelled entries and their
    accuracy; for regression, mean squared error and NaN."""
    total, count, correct = 0.0, 0, 0
    for start in range(0, xs.shape[1], EVAL_CHUNK):
        x, y = _tensors(xs[:, start:start + EVAL_CHUNK], ys[:, start:start + EVAL_CHUNK], dtype)
        out = torch_outputs(model, x)
        if kind == "regression_every_step":
            total += float(((out - y) ** 2).sum())
            count += y.numel()
            continue
        logits, labels = out.reshape(-1, out.shape[-1]), y.reshape(-1)
        mask = labels != IGNORE_INDEX
        total += float(torch.nn.functional.cross_entropy(logits[mask], labels[mask],
                                                         reduction="sum"))
        correct += int((logits[mask].argmax(-1) == labels[mask]).sum())
        count += int(mask.sum())
    count = max(count, 1)
    return total / count, (float("nan") if kind == "regression_every_step" else correct / count)


# ----------------------------------------------------------------------------- trainers

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
        from .learner import OnlineLearner

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


# ----------------------------------------------------------------------------- results

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


# ----------------------------------------------------------------------------- the comparison

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


def _torch_dtype(name: str) -> torch.dtype:
    return torch.float64 if name == "float64" else torch.float32


def run_comparison(cfg: CompareConfig, *, log: Callable[[str], None] = print) -> ComparisonResult:
    """Everything `etrace-compare` reports, for an already `checked()` config."""
    start = time.perf_counter()
    with numeric_setup(cfg):
        factory = resolve_model(cfg.model, cfg.hidden)
        task = load_task(cfg)
        dtype = _torch_dtype(cfg.dtype)
        init = make_model(factory, task, cfg)
        result = ComparisonResult(
            config=cfg, model_spec=factory.spec, model_class=type(init).__name__,
            n_params=sum(p.numel() for p in init.parameters()),
            task=dict(name=task.name, kind=task.kind, seq_len=task.seq_len, n_in=task.n_in,
                      n_out=task.n_out, n_train=task.n_train, n_test=task.n_test),
            batch_size=batch_size_for(task, cfg), n_batches=n_minibatches(task, cfg))
        xs0, ys0 = first_minibatch(task, cfg, dtype)
        _warm_up_runtimes(export=any(m != "bptt" for m in cfg.methods))
        log(f"model {factory.spec} ({result.model_class}, {result.n_params} parameters), task "
            f"{task.name} (T={task.seq_len}, {task.n_train} train / {task.n_test} test sequences)")
        trainers, setup = build_trainers(cfg, init, task, xs0, log)
        if "hybrid" in trainers:
            result.notes.append(hybrid_choice(trainers["hybrid"]))
        result.fidelity = gradient_fidelity(init, trainers, xs0, ys0, task_loss(task), setup)
        for method, trainer in trainers.items():
            result.runs[method] = train_method(trainer, task, cfg, setup[method])
        if cfg.sweep:
            log(f"timing one training step at T = {', '.join(map(str, cfg.seq_lens))} ...")
            result.timing = {m: time_vs_length(t, task, cfg) for m, t in trainers.items()}
        if cfg.measure_memory:
            log("measuring peak memory, one fresh process per method ...")
            result.memory = measure_memory_all(cfg, factory)
            result.notes += [f"memory measurement of {m} failed: {p.error}"
                             for m, p in result.memory.items() if p.error]
    result.seconds = time.perf_counter() - start
    return result


def _warm_up_runtimes(export: bool) -> None:
    """Pay the once-per-process costs (torch.export's first export, JAX backend start) before
    anything is timed, so they are not charged to whichever method comes first."""
    import jax.numpy as jnp
    import torch._dynamo  # noqa: F401

    jnp.zeros(1).block_until_ready()
    if export:
        from .export import export_step
        export_step(nn.Linear(2, 2), (torch.zeros(3, 2),))


def build_trainers(cfg, init, task, xs0, log):
    """One trainer per method, each on its own deep copy of `init`; conversion time per method."""
    trainers, setup = {}, {}
    for method in cfg.methods:
        if method != "bptt":
            log(f"converting the model for {method} ...")
        t0 = time.perf_counter()
        trainers[method] = make_trainer(method, copy.deepcopy(init), task, cfg, xs0[0])
        setup[method] = time.perf_counter() - t0
    return trainers, setup


def hybrid_choice(trainer: "OnlineTrainer") -> str:
    """Which trace the hybrid algorithm keeps for each weight, as one sentence."""
    algo = trainer.learner.algorithm
    try:
        pairs = zip((r.weight_path for r in algo.graph.hidden_param_op_relations),
                    algo.trace_kinds())
        kinds = {".".join(path): kind for path, kind in pairs}
    except Exception as err:  # informative only
        return f"hybrid: could not list its trace choices ({one_line(err)})"
    names = {"param": "D-RTRL (param-dim)", "io": "ES-D-RTRL (io-dim)"}
    parts = [f"{names[k]} traces for {', '.join(f'`{w}`' for w, v in kinds.items() if v == k)}"
             for k in ("param", "io") if k in kinds.values()]
    limit = getattr(algo, "max_param_dim_size", None)
    return (f"hybrid uses {'; '.join(parts) or 'no traces'}"
            + (f" (param-dim for element-wise weights and weights of at most {limit} elements)."
               if limit else "."))


def gradient_fidelity(init, trainers, xs, ys, loss, setup) -> dict[str, GradientReport]:
    """Online gradients at initialisation vs BPTT on the same minibatch (also warms up the
    compiled online runs: their time is added to `setup`)."""
    online = [m for m in trainers if m != "bptt"]
    if not online:
        return {}
    reference = BPTTTrainer(copy.deepcopy(init), loss, 1.0).gradients(xs, ys)
    reports = {}
    for method in online:
        t0 = time.perf_counter()
        grads = trainers[method].gradients(xs, ys)
        setup[method] += time.perf_counter() - t0
        reports[method] = compare_gradients(grads, reference)
    return reports


def train_method(trainer, task: SequenceTask, cfg: CompareConfig, setup_seconds: float
                 ) -> MethodRun:
    """Train for cfg.epochs epochs; evaluate with the torch model after each one."""
    from tqdm.auto import tqdm

    dtype = _torch_dtype(cfg.dtype)
    run = MethodRun(trainer.method, setup_seconds)
    run.curve.append(_epoch_stats(trainer.model, task, 0, float("nan"), 0.0, dtype))
    total = cfg.epochs * n_minibatches(task, cfg)
    with tqdm(total=total, desc=f"{trainer.method:>9}", unit="batch", disable=not cfg.progress,
              file=sys.stderr, leave=True, dynamic_ncols=True) as bar:
        for epoch in range(1, cfg.epochs + 1):
            losses, seconds = [], 0.0
            for xs, ys in minibatches(task, cfg, epoch, dtype):
                t0 = time.perf_counter()
                losses.append(trainer.train_batch(xs, ys))
                seconds += time.perf_counter() - t0
                bar.update(1)
            stats = _epoch_stats(trainer.model, task, epoch, float(np.mean(losses)), seconds, dtype)
            run.curve.append(stats)
            bar.set_postfix(loss=f"{stats.train_loss:.3f}", test_acc=f"{stats.test_acc:.3f}")
    return run


def _epoch_stats(model, task, epoch, objective, seconds, dtype) -> EpochStats:
    train_loss, train_acc = evaluate(model, task.xs_train, task.ys_train, task.kind, dtype)
    test_loss, test_acc = evaluate(model, task.xs_test, task.ys_test, task.kind, dtype)
    return EpochStats(epoch, train_loss, train_acc, test_loss, test_acc, objective, seconds)


def time_vs_length(trainer, task: SequenceTask, cfg: CompareConfig) -> list[TimePoint]:
    """Time a first and a second training step on synthetic sequences of each length T."""
    dtype, points = _torch_dtype(cfg.dtype), []
    for seq_len in cfg.seq_lens:
        batch = batch_size_for(task, cfg)
        xs, ys = synthetic_batch(task, seq_len, batch, dtype, cfg.seed + seq_len)
        first = _timed(trainer.train_batch, xs, ys)
        points.append(TimePoint(seq_len, first, _best_time(trainer.train_batch, xs, ys)))
    return points


def _best_time(fn, *args, repeats: int = 3, budget: float = 1.0) -> float:
    """Fastest of up to `repeats` runs, stopping once `budget` seconds are spent (noise from
    other processes only ever adds time)."""
    times, spent = [], 0.0
    while len(times) < repeats and (not times or spent < budget):
        times.append(_timed(fn, *args))
        spent += times[-1]
    return min(times)


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- memory

def measure_memory_all(cfg: CompareConfig, factory: ModelFactory) -> dict[str, MemoryProfile]:
    """One fresh process per method, up to two at a time (peak RSS is per process, so running
    side by side does not change it)."""
    workers = max(1, min(2, len(cfg.methods), _usable_cores()))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {m: pool.submit(measure_memory, cfg, factory, m) for m in cfg.methods}
        return {m: f.result() for m, f in futures.items()}


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def measure_memory(cfg: CompareConfig, factory: ModelFactory, method: str,
                   timeout: float = 1200.0) -> MemoryProfile:
    """Run `memory_child` for one method in a fresh Python process and read its report."""
    job = dict(config={**dataclasses.asdict(cfg), "model": factory.source}, method=method)
    code = "from etrace_bridge.compare import memory_child; memory_child()"
    try:
        proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(job), text=True,
                              capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return MemoryProfile(method, error=f"timed out after {timeout:.0f} s")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_MARK):
            data = json.loads(line[len(_RESULT_MARK):])
            data["sweep"] = [MemoryPoint(*p) for p in data["sweep"]]
            return MemoryProfile(**data)
    tail = [line for line in proc.stderr.splitlines() if line.strip()][-1:] or ["no output"]
    cause = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else tail[0].strip()
    return MemoryProfile(method, error=f"child exited with status {proc.returncode}: {cause}")


def memory_child() -> None:
    """Entry point of the measuring subprocess: job JSON on stdin, result line on stdout."""
    import warnings
    warnings.simplefilter("ignore")
    job = json.loads(sys.stdin.read())
    raw = job["config"]
    cfg = CompareConfig(**{**raw, "methods": tuple(raw["methods"]),
                           "seq_lens": tuple(raw["seq_lens"]), "progress": False})
    with numeric_setup(cfg):
        profile = profile_memory(cfg, job["method"])
    print(_RESULT_MARK + json.dumps(dataclasses.asdict(profile)), flush=True)


def profile_memory(cfg: CompareConfig, method: str) -> MemoryProfile:
    """Peak RSS after one task minibatch, then during one step at each T (ascending)."""
    import jax
    dtype = _torch_dtype(cfg.dtype)
    task = load_task(cfg)
    model = make_model(resolve_model(cfg.model, cfg.hidden), task, cfg)
    xs, ys = first_minibatch(task, cfg, dtype)
    trainer = make_trainer(method, model, task, cfg, xs[0])
    trainer.train_batch(xs, ys)
    profile = MemoryProfile(method, task_peak_mb=peak_rss_mb())
    for seq_len in cfg.seq_lens if cfg.sweep else ():
        xs, ys = synthetic_batch(task, seq_len, xs.shape[1], dtype, cfg.seed + seq_len)
        jax.clear_caches()  # every T compiles afresh, also the T of the task minibatch
        gc.collect()
        profile.hwm_reset = reset_peak_rss() and profile.hwm_reset
        before = rss_mb()
        trainer.train_batch(xs, ys)
        profile.sweep.append(MemoryPoint(seq_len, peak_rss_mb(), before))
    return profile


def _proc_status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """This process's current resident set size in MiB (NaN where /proc is missing)."""
    value = _proc_status_mb("VmRSS")
    return float("nan") if value is None else value


def peak_rss_mb() -> float:
    """This process's peak resident set size (VmHWM) in MiB."""
    value = _proc_status_mb("VmHWM")
    if value is not None:
        return value
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 1024.0


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0); False if impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
