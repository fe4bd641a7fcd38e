"""``python -m benchmarks [--quick] [--out results.json]`` (console script ``etrace-bench``).

Runs the algorithm benchmarks (etrace_core vs JAX BPTT and, when installed, braintrace) and the
bridge benchmarks (torch model trained online through etrace_bridge), prints every figure and
goal, and writes raw times, memories, ratios and goals to a JSON file together with the machine,
the date and the package versions.

braintrace is optional: run this with an interpreter that has it (e.g. a venv created with
``--system-site-packages`` plus ``pip install braintrace==0.2.6``) to get its columns.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv=None) -> int:
    from . import common

    common.pin_threads()  # before jax / torch start

    p = argparse.ArgumentParser(prog="etrace-bench", description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="fewer repeats, fewer models and T <= 1,000 (a couple of minutes)",
    )
    p.add_argument("--out", default="benchmark-results.json", help="JSON output file")
    p.add_argument(
        "--only",
        choices=("algorithms", "bridge", "compile", "trace_memory", "cold_start"),
        default=None,
        help="run one of the sets",
    )
    args = p.parse_args(argv)

    from tqdm import tqdm

    from . import algorithms, bridge, cold_start, compile_depth, trace_memory

    started = time.perf_counter()
    result = {
        "date": common.now(),
        "command": " ".join(["python -m benchmarks"] + sys.argv[1:]),
        "python_executable": sys.executable,
        "quick": args.quick,
        "machine": common.machine_info(),
        "versions": common.versions(),
        "thread_pinning": {"XLA_FLAGS": " ".join(common.XLA_THREAD_FLAGS), "torch_threads": 1},
    }
    print(f"etrace benchmarks - {result['date']}")
    print(
        f"machine: {result['machine']['cpu']} ({result['machine']['cores']} cores), "
        f"load avg {result['machine']['load_avg_at_start']}"
    )
    print("versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items() if v))

    bar = tqdm(
        desc="benchmarks", unit="run", leave=False, file=sys.stderr, disable=not sys.stderr.isatty()
    )

    def progress(what):
        bar.set_postfix_str(str(what)[:40], refresh=False)
        bar.update(1)

    def log(msg):
        tqdm.write(msg)

    if args.only in (None, "algorithms"):
        result["algorithms"] = algorithms.run(quick=args.quick, progress=progress, log=log)
    if args.only in (None, "bridge"):
        result["bridge"] = bridge.run(quick=args.quick, progress=progress, log=log)
    if args.only in (None, "compile"):
        result["compile"] = compile_depth.run(quick=args.quick, progress=progress, log=log)
    if args.only in (None, "trace_memory"):
        result["trace_memory"] = trace_memory.run(quick=args.quick, progress=progress, log=log)
    if args.only in (None, "cold_start"):
        result["cold_start"] = cold_start.run(quick=args.quick, progress=progress, log=log)
    bar.close()
    result["wall_s"] = time.perf_counter() - started
    result["goals"] = [
        g
        for part in ("algorithms", "bridge", "compile", "trace_memory", "cold_start")
        if part in result
        for g in result[part]["goals"]
    ]
    print("\n== all goals ==")
    for g in result["goals"]:
        v = "n/a" if g["value"] is None else f"{g['value']:.3f}"
        print(
            f"  [{g['status']}] {g['name']}: {v} (goal {g['comparison']} {g['threshold']:g})"
            + (f" - {g['detail']}" if g["detail"] else "")
        )
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=float)
    print(f"\nwrote {args.out} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
