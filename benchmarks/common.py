"""Shared helpers: thread pinning, interleaved timing, goals, machine and version records.

Nothing here imports jax or torch at module level, so ``pin_threads`` can run before either is
loaded (XLA reads its thread flags once, when the backend starts).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

XLA_THREAD_FLAGS = ("--xla_cpu_multi_thread_eigen=false", "intra_op_parallelism_threads=1")


def pinned_env(env: Optional[dict[str, str]] = None) -> dict[str, str]:
    """A copy of `env` (default: os.environ) with XLA and BLAS pinned to one thread."""
    env = dict(os.environ if env is None else env)
    flags = env.get("XLA_FLAGS", "")
    for flag in XLA_THREAD_FLAGS:
        if flag.split("=")[0] not in flags:
            flags = (flags + " " + flag).strip()
    env["XLA_FLAGS"] = flags
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env.setdefault(var, "1")
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def pin_threads() -> bool:
    """Pin XLA (and BLAS) to one thread in this process; True if jax was not loaded yet
    (otherwise the XLA flags no longer take effect and a warning is printed)."""
    os.environ.update(pinned_env())
    if "jax" in sys.modules:
        try:
            import jax

            started = bool(jax._src.xla_bridge._backends)  # noqa: SLF001
        except Exception:
            started = True
        if started:
            print(
                "benchmarks: jax backend already started; XLA thread flags not applied",
                file=sys.stderr,
            )
            return False
    return True


@contextlib.contextmanager
def torch_threads(n: int = 1):
    """Run the block with torch intra-op threads set to `n`, restoring the old value after."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ----------------------------------------------------------------------------------------------
# timing


def block(value):
    """Wait for every JAX array in `value` (torch results are already synchronous on CPU)."""
    try:
        import jax

        return jax.block_until_ready(value)
    except Exception:
        return value


@dataclass
class Timing:
    name: str
    times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def best(self) -> float:
        return min(self.times)

    def as_dict(self) -> dict[str, Any]:
        return {
            "median_s": self.median,
            "min_s": self.best,
            "repeats": len(self.times),
            "times_s": self.times,
        }


def time_interleaved(
    cases: dict[str, Callable[[], Any]],
    *,
    repeats: int = 7,
    warmup: int = 2,
    progress: Optional[Callable[[str], None]] = None,
) -> dict[str, Timing]:
    """Time every callable `repeats` times, interleaved round by round (the order rotates each
    round), after `warmup` untimed calls each. Each call's result is blocked on, so the time
    covers the whole computation. Returns {name: Timing}."""
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            block(cases[name]())
            if progress:
                progress(name)
    out = {name: Timing(name) for name in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            block(cases[name]())
            out[name].times.append(time.perf_counter() - t0)
            if progress:
                progress(name)
    return out


def time_once(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    block(fn())
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------
# goals


@dataclass
class Goal:
    name: str
    value: Optional[float]  # the measured quantity (a ratio, seconds, fraction)
    threshold: float
    comparison: str = "<="  # value <comparison> threshold passes
    detail: str = ""

    @property
    def status(self) -> str:
        if self.value is None:
            return "SKIP"
        ok = (
            self.value <= self.threshold
            if self.comparison == "<="
            else self.value >= self.threshold
        )
        return "PASS" if ok else "FAIL"

    def line(self) -> str:
        v = "n/a" if self.value is None else f"{self.value:.3f}"
        detail = f" - {self.detail}" if self.detail else ""
        return (
            f"[{self.status}] {self.name}: {v} (goal {self.comparison} {self.threshold:g}){detail}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "threshold": self.threshold,
            "comparison": self.comparison,
            "status": self.status,
            "detail": self.detail,
        }


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or b == 0:
        return None
    return a / b


# ----------------------------------------------------------------------------------------------
# machine and versions


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    mem_gib = round(int(line.split()[1]) / 2**20, 1)
                    break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem_gib,
        "platform": platform.platform(),
        "load_avg_at_start": load,
    }


def _version(name: str) -> Optional[str]:
    try:
        from importlib import metadata

        return metadata.version(name)
    except Exception:
        try:
            return getattr(importlib.import_module(name), "__version__", None)
        except Exception:
            return None


def versions() -> dict[str, Optional[str]]:
    return {
        "python": platform.python_version(),
        "jax": _version("jax"),
        "jaxlib": _version("jaxlib"),
        "torch": _version("torch"),
        "brainstate": _version("brainstate"),
        "numpy": _version("numpy"),
        "etrace": _version("etrace"),
        "braintrace": _version("braintrace"),
    }


def now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def fmt_ms(seconds: Optional[float]) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:9.2f} ms"


def fmt_mib(mib: Optional[float]) -> str:
    return "n/a" if mib is None else f"{mib:8.1f} MiB"


def script_main(run, description: str, argv=None) -> int:
    """The command line of one benchmark module: `--quick`, and `--out` to write the JSON."""
    import argparse
    import json

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    res = run(quick=args.quick)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1, default=float)
    return 0
