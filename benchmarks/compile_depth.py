"""Compile time of the eligibility-trace graph against depth: ``nn.GRU(num_layers=L)`` through
the bridge, L = 1, 4, 16 (and stacked ``etrace_core.nn.GRUCell`` layers for reference).

``nn.GRU`` stacks its layers' states into one (L, B, H) tensor, so every state reaches O(L)
slices and concatenations: position propagation must not replay them per state. Goal: the
log-log slope of compile time from L = 4 to 16 at most 1.3 (linear work, plus noise).
Run: ``python -m benchmarks.compile_depth``.
"""

from __future__ import annotations

from . import common

if __name__ == "__main__":
    common.pin_threads()

import math
import time
from typing import Any

DEPTHS = (1, 4, 16)


def _bridge_gru(layers: int):
    import torch

    from etrace_bridge import from_torch

    torch.manual_seed(0)
    module = from_torch(torch.nn.GRU(8, 16, num_layers=layers), (torch.zeros(4, 8),))
    return module, module.example_step_inputs()


def compile_seconds(layers: int) -> float:
    """Seconds of `compile_graph` (D-RTRL) for an nn.GRU of `layers` layers, caches cleared."""
    import etrace_core
    from etrace_core.compiler.positions import _relabel_targets

    module, example = _bridge_gru(layers)
    _relabel_targets.cache_clear()
    algo = etrace_core.D_RTRL(module)
    start = time.perf_counter()
    algo.compile_graph(*example)
    return time.perf_counter() - start


def run(quick: bool = False, progress=lambda _: None, log=print) -> dict[str, Any]:
    result: dict[str, Any] = {"compile_s": {}}
    for layers in DEPTHS:
        seconds = min(compile_seconds(layers) for _ in range(1 if quick else 2))
        result["compile_s"][layers] = seconds
        log(f"  nn.GRU(num_layers={layers:>2}): compile_graph {seconds:.3f} s")
        progress(f"compile L={layers}")
    t4, t16 = result["compile_s"][4], result["compile_s"][16]
    slope = math.log(t16 / t4) / math.log(16 / 4)
    result["slope_4_16"] = slope
    result["goals"] = [
        common.Goal(
            "compile_graph log-log slope in depth, nn.GRU L=4->16",
            slope,
            1.3,
            detail=f"{t4:.2f} s -> {t16:.2f} s",
        ).as_dict()
    ]
    log("  " + common.Goal("slope", slope, 1.3).line())
    return result


if __name__ == "__main__":
    run()
