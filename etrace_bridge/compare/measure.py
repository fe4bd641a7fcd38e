"""Peak memory and time per update vs T, per method, each in a fresh, isolated Python process.

The child reports each sequence length as soon as it is measured, so a child that has to stop
keeps what it measured. A step whose memory would pass `--memory-budget` is not run: the child
predicts it from the points so far (what the last step added grows linearly in T) and, as a
backstop, a watchdog thread ends the child the moment its resident memory passes the budget;
both are reported as "over budget from T", never as a crash. The RSS readings are the ones
`benchmarks/` uses (one harness for both).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.rss import peak_rss_mb, reset_peak_rss, rss_mb

from .config import CompareConfig, numeric_setup, torch_dtype
from .data import first_minibatch, load_task, synthetic_batch
from .factory import ModelFactory, make_model, resolve_model
from .results import MemoryPoint, MemoryProfile, TimePoint
from .trainers import make_trainer

_MARK = "ETRACE_MEMORY "
OVER_BUDGET_EXIT = 3


def measure_memory_all(cfg: CompareConfig, factory: ModelFactory) -> dict[str, MemoryProfile]:
    """One fresh process per method, up to two at a time (peak RSS is per process, so running
    side by side does not change it; the times share the cores)."""
    workers = max(1, min(2, len(cfg.methods), _usable_cores()))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {m: pool.submit(measure_memory, cfg, factory, m) for m in cfg.methods}
        return {m: f.result() for m, f in futures.items()}


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _child_env() -> dict:
    """The child imports the same etrace_bridge and benchmarks as this process."""
    import etrace_bridge

    root = str(Path(etrace_bridge.__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}


def measure_memory(
    cfg: CompareConfig, factory: ModelFactory, method: str, timeout: float = 3600.0
) -> MemoryProfile:
    """Run `memory_child` for one method in a fresh Python process and read its report.

    A child killed by a signal (seen once in a long run: SIGABRT under heavy load, not
    reproducible) is run once more in a fresh process; a second failure is reported.
    """
    job = dict(config={**dataclasses.asdict(cfg), "model": factory.source}, method=method)
    code = "from etrace_bridge.compare.measure import memory_child; memory_child()"
    for attempt in (1, 2):
        try:
            proc = subprocess.run(
                child_command(code),
                input=json.dumps(job),
                text=True,
                capture_output=True,
                timeout=timeout,
                env=_child_env(),
            )
        except subprocess.TimeoutExpired as err:
            profile = parse_child_output(method, err.stdout or "")
            profile.error = f"timed out after {timeout:.0f} s"
            return profile
        profile = parse_child_output(method, proc.stdout)
        if proc.returncode == OVER_BUDGET_EXIT and profile.over_budget_from is not None:
            return profile
        if proc.returncode == 0 or proc.returncode > 0 or attempt == 2:
            break
    if proc.returncode != 0:
        tail = [line for line in proc.stderr.splitlines() if line.strip()][-1:] or ["no output"]
        cause = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else tail[0].strip()
        again = " (twice)" if proc.returncode < 0 else ""
        profile.error = f"child exited with status {proc.returncode}{again}: {cause}"
    return profile


def parse_child_output(method: str, stdout: str | bytes) -> MemoryProfile:
    """Collect the child's report lines (`_MARK` + JSON) into a MemoryProfile."""
    if isinstance(stdout, bytes):
        stdout = stdout.decode(errors="replace")
    profile = MemoryProfile(method)
    for line in stdout.splitlines():
        if not line.startswith(_MARK):
            continue
        record = json.loads(line[len(_MARK) :])
        kind = record.pop("kind")
        if kind == "task":
            profile.task_peak_mb, profile.hwm_reset = record["peak_mb"], record["hwm_reset"]
        elif kind == "point":
            profile.sweep.append(
                MemoryPoint(record["seq_len"], record["peak_mb"], record["before_mb"])
            )
            profile.timing.append(
                TimePoint(record["seq_len"], record["first_seconds"], record["step_seconds"])
            )
            profile.hwm_reset = profile.hwm_reset and record["hwm_reset"]
        elif kind == "over_budget":
            profile.over_budget_from = record["seq_len"]
    return profile


def _emit(kind: str, **record) -> None:
    print(_MARK + json.dumps({"kind": kind, **record}), flush=True)


def child_command(code: str) -> list[str]:
    """The command line of a measuring child, isolated from its working directory.

    `-I` keeps the working directory, PYTHONPATH and the user site off `sys.path`, so a file
    there named like a module (`numpy.py`, `etrace_bridge.py`) is never run; the child then
    gets this process's own absolute `sys.path` (minus the relative '' entry that means "the
    working directory"), so it imports the same packages as its parent.
    """
    paths = [os.path.abspath(p) for p in sys.path if p]
    return [sys.executable, "-I", "-c", f"import sys; sys.path[:] = {paths!r}; {code}"]


def memory_child() -> None:
    """Entry point of the measuring subprocess: job JSON on stdin, report lines on stdout."""
    import warnings

    warnings.simplefilter("ignore")
    job = json.loads(sys.stdin.read())
    raw = job["config"]
    cfg = CompareConfig(
        **{
            **raw,
            "methods": tuple(raw["methods"]),
            "seq_lens": tuple(raw["seq_lens"]),
            "progress": False,
        }
    )
    with numeric_setup(cfg):
        profile_memory(cfg, job["method"])


class _Watchdog:
    """Ends this process (status OVER_BUDGET_EXIT) once its RSS passes `budget_mb` while a step
    of length `seq_len` runs; the report line names that T first."""

    def __init__(self, budget_mb: float, interval: float = 0.02):
        self.budget_mb, self.interval, self.seq_len = budget_mb, interval, None
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self):
        while True:
            time.sleep(self.interval)
            if self.seq_len is not None and rss_mb() > self.budget_mb:
                _emit("over_budget", seq_len=self.seq_len, measured=True)
                os._exit(OVER_BUDGET_EXIT)


def predicted_peak_mb(points: list[MemoryPoint], seq_len: int) -> float:
    """Peak RSS a step of length `seq_len` would reach: the process's memory before the last
    measured step plus what that step added, scaled linearly in T."""
    if not points:
        return float("nan")
    last = points[-1]
    return last.before_mb + max(last.step_mb, 0.0) * seq_len / last.seq_len


def profile_memory(cfg: CompareConfig, method: str) -> None:
    """Peak RSS after one task minibatch, then peak during one step and the time of a first and
    a warm step at each T (ascending), within the memory budget."""
    import jax

    dtype = torch_dtype(cfg.dtype)
    task = load_task(cfg)
    model = make_model(resolve_model(cfg.model, cfg.hidden), task, cfg)
    xs, ys = first_minibatch(task, cfg, dtype)
    trainer = make_trainer(method, model, task, cfg, xs[0])
    watchdog = _Watchdog(cfg.memory_budget)
    watchdog.seq_len = 0
    trainer.train_batch(xs, ys)
    _emit("task", peak_mb=peak_rss_mb(), hwm_reset=True)
    points: list[MemoryPoint] = []
    for seq_len in cfg.seq_lens if cfg.sweep else ():
        if predicted_peak_mb(points, seq_len) > cfg.memory_budget:
            _emit("over_budget", seq_len=seq_len, measured=False)
            break
        xs, ys = synthetic_batch(task, seq_len, xs.shape[1], dtype, cfg.seed + seq_len)
        jax.clear_caches()  # every T compiles afresh, also the T of the task minibatch
        gc.collect()
        reset = reset_peak_rss()
        before = rss_mb()
        watchdog.seq_len = seq_len
        t0 = time.perf_counter()
        trainer.train_batch(xs, ys)
        first = time.perf_counter() - t0
        point = MemoryPoint(seq_len, peak_rss_mb(), before)
        t0 = time.perf_counter()
        trainer.train_batch(xs, ys)
        warm = time.perf_counter() - t0
        points.append(point)
        _emit(
            "point",
            seq_len=seq_len,
            peak_mb=point.peak_mb,
            before_mb=before,
            first_seconds=first,
            step_seconds=warm,
            hwm_reset=reset,
        )
