"""The PyTorch bridge: a torch GRU+readout trained online through etrace_bridge.

Model: ``nn.GRUCell(32, 128)`` + ``nn.Linear(128, 10)``, ``forward(x, h) -> (y, h)``, batch 32,
MSE loss, ES-D-RTRL (decay 0.9) unless said otherwise. Measured:

1. one online step, ``OnlineLearner.step(x_t, y_t)``, against torch eager doing that step's
   forward and backward (goal <= 1.5x; ``python -m benchmarks.bridge --step-only`` measures just
   this ratio) and against the same network written with
   ``etrace_core.nn`` (``GRUCell`` + ``Linear``) stepped with ``etrace_core.run_online`` on one time
   step (the path ``step`` takes inside); and a whole sequence, ``OnlineLearner.run`` against
   ``run_online`` on the native model (T = 100);
2. the DLPack boundary of one step: ``to_jax`` of every parameter, the input and the target, and
   ``to_torch`` of every gradient;
3. export + lowering + first compile: ``OnlineLearner(...)`` (torch.export, lowering to JAX, the
   eligibility-trace graph) and its first ``step`` (XLA compile), in a fresh process (cold: the
   first torch.export of the process) and again for a second model in that process (warm);
4. ``OnlineLearner.run`` (ES-D-RTRL) against torch BPTT of the same model (a plain loop, loss
   summed over time, one ``backward``), T = 100;
5. peak RSS of a fresh process per (method, T) for T = 10 and 1,000: online's growth against
   BPTT's.
"""

from __future__ import annotations

from . import common

if __name__ == "__main__":
    common.pin_threads()

import sys
import time
from typing import Any

import numpy as np

BATCH, N_IN, N_HID, N_OUT = 32, 32, 128, 10
DECAY = 0.9


def have_bridge() -> bool:
    try:
        from etrace_bridge import OnlineLearner, from_torch  # noqa: F401

        return True
    except Exception:
        return False


def torch_model(seed: int = 0, hidden: int = N_HID):
    import torch
    from torch import nn

    class GRUNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = nn.GRUCell(N_IN, hidden)
            self.readout = nn.Linear(hidden, N_OUT)

        def forward(self, x, h):
            h = self.cell(x, h)
            return self.readout(h), h

    torch.manual_seed(seed)
    return GRUNet()


def torch_data(T: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, BATCH, N_IN, generator=g), torch.randn(T, BATCH, N_OUT, generator=g))


def make_learner(model, xs, algorithm: str = "es_d_rtrl"):
    import torch

    from etrace_bridge import OnlineLearner

    h0 = torch.zeros(BATCH, N_HID)
    opts = {"decay_or_rank": DECAY} if algorithm != "d_rtrl" else {}
    return OnlineLearner(model, algorithm=algorithm, loss="mse", example_inputs=(xs[0], h0), **opts)


def torch_bptt(model, xs, ys):
    """Forward T steps, the summed MSE, one backward; gradients land in p.grad."""
    import torch
    import torch.nn.functional as F

    h = torch.zeros(xs.shape[1], N_HID)
    loss = 0.0
    for t in range(xs.shape[0]):
        y, h = model(xs[t], h)
        loss = loss + F.mse_loss(y, ys[t])
    loss.backward()
    return loss.detach()


def native_runner(xs_j, ys_j, loss_fn):
    """The same network on etrace_core.nn layers, ES-D-RTRL, run_online over (xs, ys)."""
    import brainstate

    import etrace_core

    from .algorithms import GRUNet

    net = GRUNet()
    brainstate.nn.init_all_states(net, batch_size=BATCH)
    algo = etrace_core.ES_D_RTRL(net, decay_or_rank=DECAY)
    algo.compile_graph(xs_j[0])
    algo.init_etrace_state()
    return algo


# ----------------------------------------------------------------------------------------------


def time_steps(*, T: int = 100, repeats: int = 7, warmup: int = 2, progress=None) -> dict[str, Any]:
    import jax
    import torch

    import etrace_core
    from etrace_bridge.arrays import to_jax, to_torch

    xs, ys = torch_data(T)
    xs_j, ys_j = to_jax(xs), to_jax(ys)
    model = torch_model()
    learner = make_learner(model, xs)
    loss_fn = learner.loss_fn
    algo = native_runner(xs_j, ys_j, loss_fn)
    x1, y1 = xs_j[:1], ys_j[:1]
    params = list(model.parameters())
    grads_j = [jax.numpy.zeros(tuple(p.shape), jax.numpy.float32) for p in params]

    def bridged_step():
        model.zero_grad(set_to_none=True)
        return learner.step(xs[0], ys[0])

    h0 = torch.zeros(BATCH, N_HID)

    def torch_eager_step():
        """The same step in torch: forward from a state, MSE, backward (grads in p.grad)."""
        model.zero_grad(set_to_none=True)
        y, _ = model(xs[0], h0)
        torch.nn.functional.mse_loss(y, ys[0]).backward()

    def native_step():
        r = etrace_core.run_online(algo, loss_fn, x1, y1)
        return r.loss, r.grads

    def bridged_run():
        model.zero_grad(set_to_none=True)
        return learner.run(xs, ys)

    def native_run():
        r = etrace_core.run_online(algo, loss_fn, xs_j, ys_j)
        return r.loss, r.grads

    def bptt():
        model.zero_grad(set_to_none=True)
        return torch_bptt(model, xs, ys)

    def dlpack_in():
        return [to_jax(p) for p in params] + [to_jax(xs[0]), to_jax(ys[0])]

    def dlpack_out():
        return [to_torch(g) for g in grads_j]

    def sync_params():
        learner.model.sync_from_torch()

    step_cases = {
        "bridged_step": bridged_step,
        "torch_eager_step": torch_eager_step,
        "native_step": native_step,
        "dlpack_to_jax": dlpack_in,
        "dlpack_to_torch": dlpack_out,
        "sync_from_torch": sync_params,
    }
    seq_cases = {"bridged_run": bridged_run, "native_run": native_run, "torch_bptt": bptt}
    out: dict[str, Any] = {"T": T, "batch": BATCH}
    st = common.time_interleaved(
        step_cases, repeats=repeats * 5, warmup=warmup * 5, progress=progress
    )
    sq = common.time_interleaved(seq_cases, repeats=repeats, warmup=warmup, progress=progress)
    out["times"] = {k: v.as_dict() for k, v in {**st, **sq}.items()}
    out["median_s"] = {k: v.median for k, v in {**st, **sq}.items()}
    # the same computation? (same weights are not shared here, so only shapes/finite-ness)
    out["bridged_loss_finite"] = bool(np.isfinite(float(bridged_run())))
    return out


def compile_case(preinit_export: bool = False) -> dict[str, Any]:
    """Fresh process: OnlineLearner construction + first step, cold then warm (child side).

    preinit_export: first run torch.export once on a trivial module, so that the "cold" figure
    leaves out torch.export's own one-time start-up (dynamo imports and caches)."""
    import torch

    xs, ys = torch_data(4)
    out = {}
    if preinit_export:
        t0 = time.perf_counter()
        torch.export.export(torch.nn.Linear(2, 2), (torch.zeros(1, 2),))
        out["torch_export_startup_s"] = time.perf_counter() - t0
    for phase in ("cold", "warm"):
        model = torch_model(seed=1 if phase == "cold" else 2)
        t0 = time.perf_counter()
        learner = make_learner(model, xs)
        t1 = time.perf_counter()
        learner.step(xs[0], ys[0])
        t2 = time.perf_counter()
        out[phase] = {"learner_s": t1 - t0, "first_step_s": t2 - t1, "total_s": t2 - t0}
    # the stages of a warm build: export + lowering (from_torch), then the trace graph
    import etrace_core
    from etrace_bridge import from_torch

    model = torch_model(seed=3)
    t0 = time.perf_counter()
    tm = from_torch(model, (xs[0], torch.zeros(BATCH, N_HID)))
    t1 = time.perf_counter()
    algo = etrace_core.ES_D_RTRL(tm, decay_or_rank=DECAY)
    algo.compile_graph(*tm.example_step_inputs())
    t2 = time.perf_counter()
    out["warm_stages"] = {"export_and_lowering_s": t1 - t0, "etrace_graph_s": t2 - t1}
    return out


def memory_case(method: str, T: int) -> dict[str, Any]:
    """Fresh process (child side): one training sequence of T steps with `method`."""
    import torch

    common_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    xs, ys = torch_data(T)
    model = torch_model()
    if method == "online":
        learner = make_learner(model, xs)
        loss = float(learner.run(xs, ys))
    elif method == "bptt":
        loss = float(torch_bptt(model, xs, ys))
    else:
        raise ValueError(method)
    torch.set_num_threads(common_threads)
    return {"loss": loss}


def measure_memory(Ts=(10, 1000), *, progress=None) -> dict[str, Any]:
    from .memory import peak_rss

    out: dict[str, Any] = {}
    for method in ("online", "bptt"):
        for T in Ts:
            out.setdefault(method, {})[str(T)] = peak_rss(
                "benchmarks.bridge:memory_case", {"method": method, "T": T}
            )
            if progress:
                progress(f"bridge/{method}/T={T}")
    return out


# ----------------------------------------------------------------------------------------------


def run(*, quick: bool = False, progress=None, log=print) -> dict[str, Any]:
    from .memory import peak_rss

    result: dict[str, Any] = {
        "config": {
            "batch": BATCH,
            "n_in": N_IN,
            "n_hid": N_HID,
            "n_out": N_OUT,
            "decay": DECAY,
            "algorithm": "es_d_rtrl",
        },
        "goals": [],
    }
    if not have_bridge():
        log("etrace_bridge (OnlineLearner, from_torch) does not import: bridge benchmarks skipped")
        result["skipped"] = "etrace_bridge.OnlineLearner / from_torch not importable"
        result["goals"] = [g.as_dict() for g in goals(result)]
        return result
    T = 100
    repeats, warmup = (3, 1) if quick else (9, 2)
    mem_Ts = (10, 1000)
    with common.torch_threads(1):
        log(
            f"\n== bridge: torch GRUCell({N_IN},{N_HID}) + Linear({N_HID},{N_OUT}), "
            f"batch {BATCH} =="
        )
        r = time_steps(T=T, repeats=repeats, warmup=warmup, progress=progress)
    result["timing"] = r
    med = r["median_s"]
    dl = med["dlpack_to_jax"] + med["dlpack_to_torch"]
    result["ratios"] = {
        "bridged_step/native_step": common.ratio(med["bridged_step"], med["native_step"]),
        "bridged_step/torch_eager_step": common.ratio(med["bridged_step"], med["torch_eager_step"]),
        "bridged_run/native_run": common.ratio(med["bridged_run"], med["native_run"]),
        "dlpack/bridged_step": common.ratio(dl, med["bridged_step"]),
        "bridged_run/torch_bptt": common.ratio(med["bridged_run"], med["torch_bptt"]),
    }
    for k in (
        "bridged_step",
        "torch_eager_step",
        "native_step",
        "dlpack_to_jax",
        "dlpack_to_torch",
        "sync_from_torch",
    ):
        log(f"  {k:16s} {common.fmt_ms(med[k])} / step")
    for k in ("bridged_run", "native_run", "torch_bptt"):
        log(f"  {k:16s} {common.fmt_ms(med[k])} / sequence (T={T})")
    for k, v in result["ratios"].items():
        log(f"  ratio {k:26s} {v:6.3f}")

    log("\n== bridge: export + lowering + first compile (fresh process) ==")
    c = peak_rss("benchmarks.bridge:compile_case", {})
    c2 = peak_rss("benchmarks.bridge:compile_case", {"preinit_export": True})
    result["compile"] = c
    result["compile_preinit_export"] = c2
    if "error" in c:
        log(f"  ERROR {c['error']}")
    else:
        for phase in ("cold", "warm"):
            p = c[phase]
            log(
                f"  {phase}: OnlineLearner(...) {p['learner_s']:.2f} s + first step "
                f"{p['first_step_s']:.2f} s = {p['total_s']:.2f} s"
            )
        s = c["warm_stages"]
        log(
            f"  warm stages: export+lowering {s['export_and_lowering_s']:.2f} s, "
            f"etrace graph {s['etrace_graph_s']:.2f} s"
        )
    if "error" not in c2:
        p = c2["cold"]
        log(
            f"  cold after torch.export start-up ({c2['torch_export_startup_s']:.2f} s, trivial "
            f"module): OnlineLearner(...) {p['learner_s']:.2f} s + first step "
            f"{p['first_step_s']:.2f} s = {p['total_s']:.2f} s"
        )
    if progress:
        progress("bridge/compile")

    log(f"\n== bridge: peak RSS, fresh process per (method, T), T = {list(mem_Ts)} ==")
    mem = measure_memory(mem_Ts, progress=progress)
    result["memory"] = mem
    for method, byT in mem.items():
        log(
            f"  {method:8s} "
            + "  ".join(f"T={T}: {common.fmt_mib(byT[str(T)].get('peak_rss_mib'))}" for T in mem_Ts)
            + "".join(f"  ERROR {v['error']}" for v in byT.values() if "error" in v)
        )
    result["goals"] = [g.as_dict() for g in goals(result)]
    log("\n== goals ==")
    for g in goals(result):
        log("  " + g.line())
    return result


def goals(result):
    G = common.Goal
    if "skipped" in result:
        why = result["skipped"]
        return [
            G("bridge: bridged step / native etrace_core step", None, 1.1, detail=why),
            G(
                "bridge: OnlineLearner.step / torch eager forward+backward of the step",
                None,
                1.5,
                detail=why,
            ),
            G("bridge: export + lowering + first compile, cold (s)", None, 2.0, detail=why),
            G("bridge: OnlineLearner.run / torch BPTT (T=100)", None, 1.0, detail=why),
            G(
                "bridge: online peak-RSS growth / BPTT growth (T=10 -> 1000)",
                None,
                0.25,
                detail=why,
            ),
        ]
    r = result["ratios"]
    out = [
        G("bridge: bridged step / native etrace_core step", r["bridged_step/native_step"], 1.1),
        G(
            "bridge: OnlineLearner.step / torch eager forward+backward of the step",
            r.get("bridged_step/torch_eager_step"),
            1.5,
        ),
        G("bridge: bridged run / native run_online (T=100)", r["bridged_run/native_run"], 1.1),
    ]
    c = result.get("compile", {})
    cold = c.get("cold", {}).get("total_s")
    warm = c.get("warm", {}).get("total_s")
    out.append(
        G(
            "bridge: export + lowering + first compile, cold (s)",
            cold,
            2.0,
            detail="" if warm is None else f"warm (second model in the process): {warm:.2f} s",
        )
    )
    out.append(G("bridge: export + lowering + first compile, warm (s)", warm, 2.0))
    c2 = result.get("compile_preinit_export", {})
    pre = c2.get("cold", {}).get("total_s")
    out.append(
        G(
            "bridge: export + lowering + first compile, cold after torch.export start-up (s)",
            pre,
            2.0,
            detail=""
            if pre is None
            else f"torch.export start-up itself: {c2['torch_export_startup_s']:.2f} s",
        )
    )
    out.append(
        G("bridge: OnlineLearner.run / torch BPTT (T=100)", r["bridged_run/torch_bptt"], 1.0)
    )
    mem = result.get("memory", {})
    try:
        on = mem["online"]["1000"]["peak_rss_mib"] - mem["online"]["10"]["peak_rss_mib"]
        bp = mem["bptt"]["1000"]["peak_rss_mib"] - mem["bptt"]["10"]["peak_rss_mib"]
        val, detail = on / bp if bp > 0 else None, f"online +{on:.1f} MiB, BPTT +{bp:.1f} MiB"
    except (KeyError, TypeError):
        val, detail = None, "memory runs failed"
    out.append(
        G("bridge: online peak-RSS growth / BPTT growth (T=10 -> 1000)", val, 0.25, detail=detail)
    )
    return out


def step_speed(*, rounds: int = 100, calls: int = 10, log=print) -> dict[str, float]:
    """`OnlineLearner.step` against torch eager forward+backward of the same step, interleaved in
    one process; best of `rounds` rounds of `calls` calls each (robust on a busy machine)."""
    import torch
    import torch.nn.functional as F

    xs, ys = torch_data(2)
    model = torch_model()
    learner = make_learner(model, xs)
    h0 = torch.zeros(BATCH, N_HID)

    def eager():
        model.zero_grad(set_to_none=True)
        F.mse_loss(model(xs[0], h0)[0], ys[0]).backward()

    def step():
        model.zero_grad(set_to_none=True)
        learner.step(xs[0], ys[0])

    cases = {"torch_eager_step": eager, "bridged_step": step}
    best = {k: float("inf") for k in cases}
    for _ in range(2 * calls):
        eager(), step()
    for _ in range(rounds):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t0) / calls)
    best["ratio"] = best["bridged_step"] / best["torch_eager_step"]
    log(
        f"torch GRUCell({N_IN},{N_HID}) + Linear, batch {BATCH}: OnlineLearner.step "
        f"{best['bridged_step'] * 1e3:.3f} ms, torch eager forward+backward "
        f"{best['torch_eager_step'] * 1e3:.3f} ms, ratio {best['ratio']:.2f} (goal <= 1.5)"
    )
    return best


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--step-only" in argv:
        with common.torch_threads(1):
            step_speed()
        return 0
    return common.script_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
