"""Peak resident memory of one benchmark case, measured in a fresh Python process.

`peak_rss("benchmarks.algorithms:memory_case", kwargs)` starts
``python -m benchmarks.memory <target> <json kwargs>``; the child pins threads, imports the target
module, records its high-water RSS so far (imports done), calls ``fn(**kwargs)`` (which builds the
model and runs one training sequence, blocking on the result), and prints one JSON line with
``peak_rss_mib`` (the process's ``VmHWM`` from ``/proc/self/status`` at the end; on Linux
``getrusage(RUSAGE_SELF).ru_maxrss`` of a subprocess also counts the RSS of the forked parent
copy before ``execve``, so it is kept only as ``ru_maxrss_mib``), ``import_rss_mib``
and whatever dict the function returned. Every case gets its own process, so no allocator cache
or compiled executable of another case counts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

from .common import pinned_env
from .rss import peak_rss_mb, ru_maxrss_mb

MARKER = "@@BENCH_RESULT@@"
REPO_ROOT = Path(__file__).resolve().parent.parent


def peak_rss(
    target: str,
    kwargs: Optional[dict[str, Any]] = None,
    *,
    python: Optional[str] = None,
    timeout: float = 900.0,
) -> dict[str, Any]:
    """Run `target` ("module:function") with `kwargs` in a fresh subprocess and return its
    result dict (``peak_rss_mib``, ``import_rss_mib``, ``wall_s`` and the function's own keys).
    On failure the dict has ``error`` and no ``peak_rss_mib``."""
    cmd = [python or sys.executable, "-m", "benchmarks.memory", target, json.dumps(kwargs or {})]
    env = pinned_env()
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(REPO_ROOT)
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-8:]
    return {"error": f"exit code {proc.returncode}: " + " | ".join(tail)}


def _child(target: str, kwargs_json: str) -> None:
    import importlib
    import time

    module_name, fn_name = target.split(":")
    module = importlib.import_module(module_name)
    fn = getattr(module, fn_name)
    import_rss = peak_rss_mb()
    t0 = time.perf_counter()
    extra = fn(**json.loads(kwargs_json)) or {}
    wall = time.perf_counter() - t0
    hwm, maxrss = peak_rss_mb(), ru_maxrss_mb()
    # VmHWM is this process's own high-water mark. ru_maxrss also keeps, across execve, the RSS
    # the forked child had before it (a copy of the parent's), so it is only a fallback.
    result = {
        "peak_rss_mib": hwm,
        "ru_maxrss_mib": maxrss,
        "import_rss_mib": import_rss,
        "wall_s": wall,
    }
    result.update(extra)
    print(MARKER + json.dumps(result), flush=True)


if __name__ == "__main__":
    from .common import pin_threads

    pin_threads()
    _child(sys.argv[1], sys.argv[2])
