"""D-RTRL's trace memory and time against its O(B |theta|) work.

Model: ``etrace_core.nn.GRUCell(32, H)`` + ``Linear(H, 10)``, batch 16, T = 20. Memory: the peak
RSS of a fresh process for D-RTRL minus that of ES-D-RTRL (whose traces are O(B (I + O))), in
units of B * |theta_traced| * 4 bytes (one float32 copy of the trace); goal <= 1.5 copies.
Time: D-RTRL per sequence against torch BPTT (``nn.GRUCell`` + ``nn.Linear``, autograd through
the unrolled loop, one torch thread) of the same size, interleaved, median of the rounds; goal
<= 3x at H = 256, batch 16; also printed at batch 64, where torch's GEMMs get more efficient
while D-RTRL's O(B |theta|) trace work grows linearly. Run: ``python -m benchmarks.trace_memory``.
"""

from __future__ import annotations

from . import common

if __name__ == "__main__":
    common.pin_threads()

from typing import Any

BATCH, N_IN, N_OUT, T = 16, 32, 10, 20


def _etrace_model(hidden: int, batch: int = BATCH):
    import brainstate

    from .algorithms import GRUNet

    model = GRUNet(N_IN, hidden, N_OUT, seed=0)
    brainstate.nn.init_all_states(model, batch_size=batch)
    return model


def traced_size(hidden: int) -> int:
    return 3 * hidden * (N_IN + hidden + 2)


def memory_case(method: str, hidden: int) -> dict[str, Any]:
    """One sequence of D-RTRL or ES-D-RTRL (for benchmarks.memory.peak_rss)."""
    import jax
    import jax.numpy as jnp

    import etrace_core

    model = _etrace_model(hidden)
    algo = (
        etrace_core.D_RTRL(model)
        if method == "d_rtrl"
        else etrace_core.ES_D_RTRL(model, decay_or_rank=0.9)
    )
    xs = jax.random.normal(jax.random.PRNGKey(0), (T, BATCH, N_IN))
    ys = jnp.zeros((T, BATCH, N_OUT))
    algo.compile_graph(xs[0])
    algo.init_etrace_state()
    res = etrace_core.run_online(algo, lambda o, y: jnp.mean((o - y) ** 2), xs, ys)
    jax.block_until_ready(res.grads)
    return {}


def _d_rtrl_runner(hidden: int, batch: int = BATCH):
    import jax
    import jax.numpy as jnp

    import etrace_core

    model = _etrace_model(hidden, batch)
    algo = etrace_core.D_RTRL(model)
    xs = jax.random.normal(jax.random.PRNGKey(0), (T, batch, N_IN))
    ys = jnp.zeros((T, batch, N_OUT))
    algo.compile_graph(xs[0])
    algo.init_etrace_state()

    def loss(o, y):  # one function object: run_online compiles once per loss function
        return jnp.mean((o - y) ** 2)

    def run():
        jax.block_until_ready(etrace_core.run_online(algo, loss, xs, ys).grads)

    return run


def _torch_bptt_runner(hidden: int, batch: int = BATCH):
    import torch
    from torch import nn

    torch.manual_seed(0)
    cell, readout = nn.GRUCell(N_IN, hidden), nn.Linear(hidden, N_OUT)
    xs, ys = torch.randn(T, batch, N_IN), torch.zeros(T, batch, N_OUT)

    def run():
        h = torch.zeros(batch, hidden)
        loss = 0.0
        for t in range(T):
            h = cell(xs[t], h)
            loss = loss + torch.mean((readout(h) - ys[t]) ** 2)
        loss.backward()

    return run


def time_ratio(hidden: int, batch: int = BATCH, repeats: int = 7) -> float:
    """Median D-RTRL time / median torch BPTT time, interleaved after a warm-up call each."""
    with common.torch_threads(1):
        t = common.time_interleaved(
            {
                "d_rtrl": _d_rtrl_runner(hidden, batch),
                "torch_bptt": _torch_bptt_runner(hidden, batch),
            },
            repeats=repeats,
            warmup=1,
        )
    return t["d_rtrl"].median / t["torch_bptt"].median


def run(quick: bool = False, progress=lambda _: None, log=print) -> dict[str, Any]:
    from .memory import peak_rss

    result: dict[str, Any] = {"copies": {}, "time_ratio": {}}
    goals = []
    for hidden in (256,) if quick else (256, 512):
        peaks = {
            m: peak_rss("benchmarks.trace_memory:memory_case", {"method": m, "hidden": hidden}).get(
                "peak_rss_mib"
            )
            for m in ("d_rtrl", "es_d_rtrl")
        }
        one_copy = BATCH * traced_size(hidden) * 4 / 2**20
        copies = (
            None if None in peaks.values() else (peaks["d_rtrl"] - peaks["es_d_rtrl"]) / one_copy
        )
        result["copies"][hidden] = copies
        log(
            f"  H={hidden}: D-RTRL {peaks['d_rtrl']:.0f} MiB, ES-D-RTRL {peaks['es_d_rtrl']:.0f} "
            f"MiB, one trace copy {one_copy:.0f} MiB -> {copies:.2f} copies"
        )
        goals.append(common.Goal(f"D-RTRL trace memory in trace copies, H={hidden}", copies, 1.5))
        progress(f"memory H={hidden}")
    for batch in (BATCH,) if quick else (BATCH, 64):
        ratio = time_ratio(256, batch)
        result["time_ratio"][f"256/B{batch}"] = ratio
        log(f"  H=256, B={batch}: D-RTRL time / torch BPTT time = {ratio:.2f}")
        progress(f"time B={batch}")
        if batch == BATCH:
            goals.append(
                common.Goal("D-RTRL time per sequence / torch BPTT, H=256, B=16", ratio, 3.0)
            )
    result["goals"] = [g.as_dict() for g in goals]
    for g in goals:
        log("  " + g.line())
    return result


if __name__ == "__main__":
    run()
