"""Peak memory per method, each in a fresh, isolated Python process; RSS readings.

The same RSS readings serve `benchmarks/` (one harness for both).
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from benchmarks.rss import peak_rss_mb, reset_peak_rss, rss_mb

from .config import CompareConfig, numeric_setup, torch_dtype
from .data import first_minibatch, load_task, synthetic_batch
from .factory import ModelFactory, make_model, resolve_model
from .results import MemoryPoint, MemoryProfile
from .trainers import make_trainer

_RESULT_MARK = "ETRACE_MEMORY_RESULT "


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
    code = "from etrace_bridge.compare.measure import memory_child; memory_child()"
    try:
        proc = subprocess.run(child_command(code), input=json.dumps(job), text=True,
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
    dtype = torch_dtype(cfg.dtype)
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
