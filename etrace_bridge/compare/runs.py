"""Train one torch model by BPTT and by online eligibility-trace learning, side by side.

The measurements behind `etrace-compare` (`etrace_bridge.cli`); `etrace_bridge.report`
turns a `ComparisonResult` into tables and plots.

- Every method starts from the same initial weights (one seeded model, deep-copied), uses
  the same optimizer (Adam) and sees the same minibatches in the same order.
- BPTT gradients come from `etrace_bridge.bptt.bptt_gradients`, online ones from
  `OnlineLearner.run`; both are sums over time of the per-step loss.
- Learning curves are measured with the torch model itself (same evaluation code for all).
- Gradient fidelity: online vs BPTT gradients on the first minibatch at initialisation.
- Memory and time vs sequence length: each method trains in its own fresh subprocess
  (`measure.memory_child`): its peak resident set size after one minibatch of the task, then,
  for each T (ascending), the peak during the first training step of length T (the kernel's
  high-water mark is reset before each point) and the time of that step and of a second, warm
  one. A method whose step would pass `--memory-budget` stops there ("over budget").
- `--stream` (`stream.run_stream`) replaces all of this by learning on one long stream.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable

import numpy as np
from torch import nn

from etrace_bridge.bptt import GradientReport, compare_gradients

from .config import CompareConfig, is_online, method_base, numeric_setup, one_line, torch_dtype
from .data import (
    batch_size_for,
    evaluate,
    first_minibatch,
    load_task,
    minibatches,
    n_minibatches,
    task_loss,
)
from .factory import make_model, resolve_model
from .measure import measure_memory_all
from .results import ComparisonResult, EpochStats, MethodRun
from .tasks import SequenceTask
from .trainers import BPTTTrainer, OnlineTrainer, horizon_decay, make_trainer, trace_decay


def run_comparison(cfg: CompareConfig, *, log: Callable[[str], None] = print) -> ComparisonResult:
    """Everything `etrace-compare` reports, for an already `checked()` config."""
    start = time.perf_counter()
    with numeric_setup(cfg):
        factory = resolve_model(cfg.model, cfg.hidden)
        task = load_task(cfg)
        dtype = torch_dtype(cfg.dtype)
        init = make_model(factory, task, cfg)
        result = ComparisonResult(
            config=cfg,
            model_spec=factory.spec,
            model_class=type(init).__name__,
            n_params=sum(p.numel() for p in init.parameters()),
            task=dict(
                name=task.name,
                kind=task.kind,
                seq_len=task.seq_len,
                n_in=task.n_in,
                n_out=task.n_out,
                n_train=task.n_train,
                n_test=task.n_test,
                horizon=task.horizon,
            ),
            batch_size=batch_size_for(task, cfg),
            n_batches=n_minibatches(task, cfg),
        )
        result.decays = {
            m: trace_decay(m, task, cfg)
            for m in cfg.methods
            if method_base(m) in ("es_d_rtrl", "hybrid")
        }
        result.horizon_decay = horizon_decay(task)
        _warm_up_runtimes(export=any(is_online(m) for m in cfg.methods))
        log(
            f"model {factory.spec} ({result.model_class}, {result.n_params} parameters), task "
            f"{task.name} (T={task.seq_len}, {task.n_train} train / {task.n_test} test sequences)"
        )
        if cfg.stream:
            from .stream import run_stream

            result.stream = run_stream(cfg, init, log)
            result.seconds = time.perf_counter() - start
            return result
        xs0, ys0 = first_minibatch(task, cfg, dtype)
        trainers, setup = build_trainers(cfg, init, task, xs0, log)
        for method, trainer in trainers.items():
            if method_base(method) == "hybrid" and hybrid_choice(trainer) not in result.notes:
                result.notes.append(hybrid_choice(trainer))  # once for all hybrid variants
        result.fidelity = gradient_fidelity(init, trainers, xs0, ys0, task_loss(task), setup)
        for method, trainer in trainers.items():
            result.runs[method] = train_method(trainer, task, cfg, setup[method])
        del trainers
        if cfg.measure_memory:
            log(
                "measuring peak memory"
                + (
                    f" and time per update at T = {', '.join(map(str, cfg.seq_lens))}"
                    if cfg.sweep
                    else ""
                )
                + f", one fresh process per method (budget {cfg.memory_budget:.0f} MiB) ..."
            )
            result.memory = measure_memory_all(cfg, factory)
            result.timing = {m: p.timing for m, p in result.memory.items() if p.timing}
            result.notes += [
                f"memory measurement of {m} failed: {p.error}"
                for m, p in result.memory.items()
                if p.error
            ]
    result.seconds = time.perf_counter() - start
    return result


def _warm_up_runtimes(export: bool) -> None:
    """Pay the once-per-process costs (torch.export's first export, JAX backend start) before
    anything is timed, so they are not charged to whichever method comes first."""
    import jax.numpy as jnp
    import torch._dynamo  # noqa: F401

    jnp.zeros(1).block_until_ready()
    if export:
        from etrace_bridge.export import export_step

        export_step(nn.Linear(2, 2), (torch.zeros(3, 2),))


def build_trainers(cfg, init, task, xs0, log):
    """One trainer per method, each on its own deep copy of `init`; conversion time per method."""
    trainers, setup = {}, {}
    for method in cfg.methods:
        if is_online(method):
            log(f"converting the model for {method} ...")
        t0 = time.perf_counter()
        trainers[method] = make_trainer(method, copy.deepcopy(init), task, cfg, xs0[0])
        setup[method] = time.perf_counter() - t0
    return trainers, setup


def hybrid_choice(trainer: OnlineTrainer) -> str:
    """Which trace the hybrid algorithm keeps for each weight, as one sentence."""
    algo = trainer.learner.algorithm
    try:
        pairs = zip(
            (r.weight_path for r in algo.graph.hidden_param_op_relations), algo.trace_kinds()
        )
        kinds = {".".join(path): kind for path, kind in pairs}
    except Exception as err:  # informative only
        return f"hybrid: could not list its trace choices ({one_line(err)})"
    names = {"param": "D-RTRL (param-dim)", "io": "ES-D-RTRL (io-dim)"}
    parts = [
        f"{names[k]} traces for {', '.join(f'`{w}`' for w, v in kinds.items() if v == k)}"
        for k in ("param", "io")
        if k in kinds.values()
    ]
    limit = getattr(algo, "max_param_dim_size", None)
    return f"hybrid uses {'; '.join(parts) or 'no traces'}" + (
        f" (param-dim for element-wise weights and weights of at most {limit} elements)."
        if limit
        else "."
    )


def gradient_fidelity(init, trainers, xs, ys, loss, setup) -> dict[str, GradientReport]:
    """Online and truncated-BPTT gradients at initialisation vs BPTT on the same minibatch (also
    warms up the compiled online runs: their time is added to `setup`)."""
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


def train_method(
    trainer, task: SequenceTask, cfg: CompareConfig, setup_seconds: float
) -> MethodRun:
    """Train for cfg.epochs epochs; evaluate with the torch model after each one."""
    from tqdm.auto import tqdm

    dtype = torch_dtype(cfg.dtype)
    run = MethodRun(trainer.method, setup_seconds)
    run.curve.append(_epoch_stats(trainer.model, task, 0, float("nan"), 0.0, dtype))
    total = cfg.epochs * n_minibatches(task, cfg)
    with tqdm(
        total=total,
        desc=f"{trainer.method:>9}",
        unit="batch",
        disable=not cfg.progress,
        file=sys.stderr,
        leave=True,
        dynamic_ncols=True,
    ) as bar:
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
