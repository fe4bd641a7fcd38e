"""`etrace-compare`: train a recurrent model by BPTT and online, side by side.

    etrace-compare --quick --out etrace-report          # the long-horizon story, fast
    etrace-compare --out docs/compare-report            # the same, full size (T up to 50,000)
    etrace-compare --task digits --methods bptt,d_rtrl,es_d_rtrl,hybrid   # GRU, T = 8
    etrace-compare --task digits --methods bptt,d_rtrl+w2,es_d_rtrl+w4   # online + windows
    etrace-compare --stream --stream-every 10           # one long stream, no resets
    etrace-compare --model lif_direct --delay 50 --methods bptt,tbptt@60,d_rtrl
    etrace-compare --model my_model.py:factory --epochs 5

Bad input ends with one line on stderr (`etrace-compare: error: ...`) and exit status 2
(1 for a failure while running); `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .config import DEFAULT_METHODS
from .config import METHODS as METHOD_NAMES

PROG = "etrace-compare"

# Settings that --quick changes; an explicit flag always wins. `delay` applies to cue_delay.
DEFAULTS = dict(
    hidden=64,
    epochs=10,
    batch_size=32,
    train_subset=None,
    test_subset=None,
    seq_lens=(100, 1000, 3000, 10000, 30000, 50000),
    delay=100,
    stream_trials=200,
)
QUICK = dict(
    hidden=32,
    epochs=4,
    batch_size=32,
    train_subset=512,
    test_subset=256,
    seq_lens=(100, 1000),
    delay=40,
    stream_trials=60,
)


class UsageError(Exception):
    """A command-line mistake; printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + error
        raise UsageError(f"{message} (see {PROG} --help)")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _name_list(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def _decay(text: str) -> float | None:
    if text.strip().lower() == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1) or 'auto', got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Train a recurrent torch model with BPTT and with online eligibility-trace "
        "algorithms (D-RTRL, ES-D-RTRL, hybrid) from the same initial weights; "
        "report learning curves, gradient fidelity vs BPTT, time and memory "
        "(also vs sequence length).",
        epilog="A user model file defines factory(n_in, n_out) -> torch.nn.Module with either "
        "forward(x, *state) -> (y, *new_state) plus initial_state(batch_size), or state "
        "kept in buffers plus reset_state(batch_size).",
    )
    p.add_argument(
        "--model",
        default=None,
        help="multiscale (leaky units, time constants 1-1000 steps; the default for "
        "cue_delay), gru (the default for the other tasks), "
        "gru2 (two stacked nn.GRUCell layers), lstm, lif (spiking, leaky "
        "readout), lif_direct (spiking, memoryless readout), leaky (one 10-step time "
        "constant), or path/to/file.py:factory",
    )
    p.add_argument(
        "--task",
        default="cue_delay",
        help="cue_delay (cue, --delay steps of distractor noise, go; default), "
        "digits (sequential 8x8 digits, T=8), recall (delayed recall), "
        "dms (spiking delayed match-to-sample)",
    )
    p.add_argument(
        "--methods",
        type=_name_list,
        default=DEFAULT_METHODS,
        help=f"comma-separated subset of {','.join(METHOD_NAMES)} (default "
        f"{','.join(DEFAULT_METHODS)}); variants tbptt@K (window K), "
        "es_d_rtrl@DECAY, hybrid@DECAY; an online method with +wK learns in windows of K "
        "steps (exact BPTT inside a window, traces across): d_rtrl+w4, es_d_rtrl@0.99+w2, "
        "+w1 = one step of exact backprop + traces",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="small and fast: hidden 32, 4 epochs, 512 training / 256 held-out "
        "sequences, cue_delay delay 40, T in 100,1000, 60 stream trials",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        help="write report.md and PNG plots (learning curves, gradient fidelity, "
        "memory and time vs T) into DIR",
    )
    p.add_argument("--hidden", type=int, help="hidden units of built-in models (default 64)")
    p.add_argument("--epochs", type=int, help="training epochs (default 10)")
    p.add_argument("--batch-size", type=int, help="minibatch size (default 32)")
    p.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate (default 0.01)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, data split, order")
    p.add_argument(
        "--train-subset", type=int, metavar="N", help="use the first N training sequences"
    )
    p.add_argument(
        "--test-subset", type=int, metavar="N", help="use the first N held-out sequences"
    )
    p.add_argument(
        "--seq-lens",
        type=_int_list,
        metavar="T1,T2,..",
        help="sequence lengths of the memory/time sweep (default 100,1000,3000,10000,30000,50000)",
    )
    p.add_argument(
        "--memory-budget",
        type=float,
        default=4096.0,
        metavar="MIB",
        help="peak resident memory (MiB) a measuring process may reach; a method "
        "whose step at some T would pass it is reported 'over budget' from "
        "that T on (default 4096)",
    )
    p.add_argument(
        "--decay",
        type=_decay,
        default=None,
        help="trace decay of ES-D-RTRL and hybrid io-dim traces, or 'auto' (default):"
        " max(0.9, 1 - 1/H) for the task's horizon H (0.99 for delay 100)",
    )
    task = p.add_argument_group("task settings (each task takes some of them)")
    task.add_argument(
        "--delay",
        type=int,
        help="cue_delay: distractor steps between cue and go (default 100, quick "
        "40); recall: how many steps back to recall",
    )
    task.add_argument("--seq-len", type=int, help="recall, dms: sequence length")
    task.add_argument(
        "--distractors", type=int, help="cue_delay: distractor noise channels (default 4)"
    )
    task.add_argument("--cues", type=int, help="cue_delay: number of cues (default 4)")
    task.add_argument(
        "--n-train",
        type=int,
        help="cue_delay, recall, dms: generated training sequences (default 1024)",
    )
    task.add_argument(
        "--n-test",
        type=int,
        help="cue_delay, recall, dms: generated held-out sequences (default 256)",
    )
    tb = p.add_argument_group("truncated BPTT")
    tb.add_argument(
        "--tbptt-window",
        type=int,
        default=10,
        metavar="K",
        help="window of the tbptt method (default 10)",
    )
    tb.add_argument(
        "--tbptt-update",
        choices=("window", "sequence"),
        default="window",
        help="one Adam step per window that holds a loss (default, as PyTorch users "
        "write it) or one per sequence (the windows' gradients summed)",
    )
    st = p.add_argument_group("stream mode")
    st.add_argument(
        "--stream",
        action="store_true",
        help="instead of epochs: learn on --batch-size streams of back-to-back "
        "cue_delay trials without resets, an Adam step every --stream-every "
        "steps; accuracy over time (BPTT cannot do this)",
    )
    st.add_argument(
        "--stream-every",
        type=int,
        default=10,
        metavar="N",
        help="time steps between optimizer steps in --stream (default 10; TBPTT's window there)",
    )
    st.add_argument(
        "--stream-trials", type=int, metavar="N", help="trials per stream (default 200, quick 60)"
    )
    p.add_argument("--dtype", default="float32", help="float32 (default) or float64")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: small recurrent steps only lose "
        "time to thread hand-offs, and JAX runs its own thread pool)",
    )
    p.add_argument(
        "--no-memory",
        action="store_true",
        help="skip the peak-memory measurements (one fresh process per method)",
    )
    p.add_argument(
        "--no-sweep",
        action="store_true",
        help="skip the time and memory vs sequence length measurements",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    return p


def config_from_args(args: argparse.Namespace):
    from .config import CompareConfig

    preset = QUICK if args.quick else DEFAULTS
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else preset[name]
    delay = args.delay if args.delay is not None or args.task != "cue_delay" else preset["delay"]
    model = args.model or ("multiscale" if args.task == "cue_delay" else "gru")
    return CompareConfig(
        model=model,
        task=args.task,
        methods=tuple(args.methods),
        hidden=pick("hidden"),
        epochs=pick("epochs"),
        batch_size=pick("batch_size"),
        lr=args.lr,
        seed=args.seed,
        train_subset=pick("train_subset"),
        test_subset=pick("test_subset"),
        seq_lens=tuple(pick("seq_lens")),
        decay=args.decay,
        dtype=args.dtype,
        measure_memory=not args.no_memory,
        sweep=not args.no_sweep,
        progress=not args.no_progress,
        threads=args.threads,
        delay=delay,
        seq_len=args.seq_len,
        distractors=args.distractors,
        cues=args.cues,
        n_train=args.n_train,
        n_test=args.n_test,
        tbptt_window=args.tbptt_window,
        tbptt_update=args.tbptt_update,
        memory_budget=args.memory_budget,
        stream=args.stream,
        stream_every=args.stream_every,
        stream_trials=pick("stream_trials"),
    ).checked()


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    import warnings

    # etrace_bridge.learner builds the loss tensor from a read-only numpy view: harmless, noisy
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    from .report import print_report, write_report
    from .runs import run_comparison

    cfg = config_from_args(args)
    import time

    if args.out:
        check_out_dir(args.out)  # before training: a report that cannot be written is lost
    start = time.perf_counter()
    log = lambda msg: print(
        f"[{PROG}] {msg} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True
    )
    result = run_comparison(cfg, log=log)
    print_report(result)
    if args.out:
        path = write_report(result, args.out, argv)
        print(f"report written to {path}")
    return 0


def check_out_dir(out: str) -> None:
    """Create `out` if needed and check that files can be written there (UsageError if not)."""
    import os
    import tempfile

    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise UsageError(
            f"--out {out}: cannot write there ({reason}); choose a writable directory"
        ) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status (0 ok, 1 failure, 2 bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as done:  # --help
            return int(done.code or 0)
        return run(args, argv)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if debug:
            raise
        return _report_error(err)


def _report_error(err: Exception) -> int:
    from .config import CompareError, one_line

    if isinstance(err, (UsageError, CompareError)):
        print(f"{PROG}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(f"{PROG}: error: {one_line(err)} (rerun with --debug for the traceback)", file=sys.stderr)
    return 1
