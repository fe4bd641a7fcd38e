"""Cold start of the bridge: ``OnlineLearner(...)`` + its first ``run`` against a bare
``torch.export.export`` of the same model, each in fresh processes of the same run.

Model: ``nn.GRUCell(32, 128)`` + ``nn.Linear(128, 10)``, batch 32 (benchmarks.bridge's model),
ES-D-RTRL, a first ``run`` of T = 10 steps. Imports are done before the clock starts on both
sides (and reported apart). The learner's time is broken down by stage: torch.export, its
decomposition to core ATen (torch's re-trace, skipped when it would change nothing:
``etrace_bridge.decompose``), the eager trial run and conversion checks, lowering, the
eligibility-trace graph (``compile_graph``), the trace init, the loss, and JAX's own tracing /
MLIR lowering / XLA compile (from ``jax.monitoring``). ``--cache DIR`` also measures the learner
with JAX's persistent compilation cache in DIR (``etrace_bridge.enable_compilation_cache``;
first a process that fills it, then processes that read it). Goal: learner / export <= 2.0.
Run: ``python -m benchmarks.cold_start [--repeats N] [--cache DIR]``.
"""

from __future__ import annotations

from . import common

if __name__ == "__main__":
    common.pin_threads()

import argparse
import statistics
import sys
import time
from collections import defaultdict
from typing import Any

T = 10


def export_case() -> dict[str, Any]:
    """Child: a bare torch.export.export of the model (static shapes)."""
    t0 = time.perf_counter()
    import torch

    from .bridge import BATCH, N_HID, torch_data, torch_model

    common_torch_threads()
    t1 = time.perf_counter()
    model = torch_model(seed=1)
    xs, _ = torch_data(1)
    t2 = time.perf_counter()
    torch.export.export(model, (xs[0], torch.zeros(BATCH, N_HID)))
    t3 = time.perf_counter()
    return {"import_s": t1 - t0, "cold_s": t3 - t2}


def common_torch_threads():
    import torch

    torch.set_num_threads(1)


class _Stages:
    """Wall time spent inside named functions (outermost call only) and JAX compile events."""

    def __init__(self):
        self.total = defaultdict(float)
        self.depth = 0

    def wrap(self, owner, name, label):
        fn = getattr(owner, name)
        stages = self

        def timed(*args, **kwargs):
            stages.depth += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                stages.depth -= 1
                stages.total[label] += time.perf_counter() - t0

        setattr(owner, name, timed)

    def listen(self):
        import jax.monitoring

        names = {
            "/jax/core/compile/jaxpr_trace_duration": "jax: tracing to jaxpr",
            "/jax/core/compile/jaxpr_to_mlir_module_duration": "jax: jaxpr -> MLIR",
            "/jax/core/compile/backend_compile_duration": "jax: XLA compile",
        }

        def on(event, duration, **_):
            if event in names:
                self.total[names[event]] += duration

        jax.monitoring.register_event_duration_secs_listener(on)


def learner_case(cache_dir: str = "") -> dict[str, Any]:
    """Child: OnlineLearner(...) + first run, with a breakdown by stage."""
    t0 = time.perf_counter()
    import torch

    import etrace_bridge
    import etrace_bridge.export as ex
    import etrace_bridge.learner as lr
    import etrace_bridge.module as md
    import etrace_core.algorithms.base as base

    from .bridge import make_learner, torch_data, torch_model

    common_torch_threads()
    t1 = time.perf_counter()
    if cache_dir:
        etrace_bridge.enable_compilation_cache(cache_dir)
    st = _Stages()
    st.wrap(torch.export, "export", "torch.export")
    st.wrap(ex, "decompose", "decomposition to core ATen")
    st.wrap(torch.export.ExportedProgram, "run_decompositions", "  of which torch re-trace")
    st.wrap(ex, "_eager_call", "eager trial run (state slots, export checks)")
    st.wrap(md, "lower", "lowering (ATen -> JAX)")
    st.wrap(base.ETraceAlgorithm, "compile_graph", "compile_graph (trace graph)")
    st.wrap(base.ETraceAlgorithm, "init_etrace_state", "init_etrace_state")
    st.wrap(lr, "_jax_loss", "loss")
    st.listen()
    model = torch_model(seed=1)
    xs, ys = torch_data(T)
    t2 = time.perf_counter()
    learner = make_learner(model, xs)
    t3 = time.perf_counter()
    learner.run(xs, ys)
    t4 = time.perf_counter()
    return {
        "import_s": t1 - t0,
        "construct_s": t3 - t2,
        "first_run_s": t4 - t3,
        "cold_s": t4 - t2,
        "stages": dict(st.total),
    }


def run(
    *,
    repeats: int = 3,
    cache_dir: str = "",
    quick: bool = False,
    progress=lambda _: None,
    log=print,
) -> dict[str, Any]:
    from .memory import peak_rss

    repeats = 2 if quick else repeats
    cases = [
        ("export", "benchmarks.cold_start:export_case", {}),
        ("learner", "benchmarks.cold_start:learner_case", {}),
    ]
    if cache_dir:
        peak_rss("benchmarks.cold_start:learner_case", {"cache_dir": cache_dir})  # fills it
        cases.append(
            ("learner_cached", "benchmarks.cold_start:learner_case", {"cache_dir": cache_dir})
        )
    runs = defaultdict(list)
    for r in range(repeats):  # interleaved: every case once per round
        for name, target, kw in cases:
            res = peak_rss(target, kw)
            if "error" in res:
                raise RuntimeError(f"{name}: {res['error']}")
            runs[name].append(res)
        progress(f"round {r + 1}/{repeats}")
        log(
            f"  round {r + 1}: "
            + ", ".join(f"{n} {runs[n][-1]['cold_s']:.2f} s" for n, _, _ in cases)
        )
    med = {n: statistics.median(x["cold_s"] for x in rs) for n, rs in runs.items()}
    imp = {n: statistics.median(x["import_s"] for x in rs) for n, rs in runs.items()}
    out: dict[str, Any] = {"median_s": med, "import_s": imp, "runs": dict(runs)}
    log(f"== cold start, fresh processes, median of {repeats} (imports excluded) ==")
    log(
        f"  torch.export.export (bare)      {med['export']:.2f} s   (imports {imp['export']:.2f} s)"
    )
    goals = []
    for name in [n for n, _, _ in cases if n != "export"]:
        rs = runs[name]
        ratio = med[name] / med["export"]
        out[f"ratio_{name}"] = ratio
        log(
            f"  {name:31s} {med[name]:.2f} s   (imports {imp[name]:.2f} s; construct "
            f"{statistics.median(x['construct_s'] for x in rs):.2f} s, first run "
            f"{statistics.median(x['first_run_s'] for x in rs):.2f} s)  ratio {ratio:.2f}"
        )
        keys = sorted({k for x in rs for k in x["stages"]})
        for k in keys:
            log(f"      {k:34s} {statistics.median(x['stages'].get(k, 0.0) for x in rs):.3f} s")
        goals.append(common.Goal(f"cold start ({name}) / bare torch.export", ratio, 2.0))
    out["goals"] = [g.as_dict() for g in goals]
    for g in goals:
        log("  " + g.line())
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cache", default="", help="also measure with this compilation cache dir")
    a = p.parse_args(argv)
    run(repeats=a.repeats, cache_dir=a.cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
