"""Tables (terminal and markdown), PNG plots and `report.md` for a `ComparisonResult`."""

from __future__ import annotations

import datetime
import importlib.metadata
import math
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .config import is_online, method_base, method_option, method_window
from .results import ComparisonResult

__all__ = [
    "Table",
    "summary_table",
    "fidelity_table",
    "memory_sweep_table",
    "memory_cost_table",
    "time_sweep_table",
    "stream_table",
    "options_table",
    "all_tables",
    "format_text",
    "format_markdown",
    "print_report",
    "write_report",
    "PLOTS",
    "STREAM_PLOTS",
]

PLOTS = ("learning_curves.png", "gradient_fidelity.png", "memory_vs_T.png", "time_vs_T.png")
STREAM_PLOTS = ("accuracy_over_time.png",)
COLORS = {
    "bptt": "#222222",
    "tbptt": "#9467bd",
    "d_rtrl": "#1f77b4",
    "es_d_rtrl": "#d62728",
    "hybrid": "#2ca02c",
}
LABELS = {
    "bptt": "BPTT",
    "tbptt": "TBPTT",
    "d_rtrl": "D-RTRL",
    "es_d_rtrl": "ES-D-RTRL",
    "hybrid": "hybrid",
}
# Distinct markers and decreasing widths keep identical curves (e.g. hybrid = ES-D-RTRL) visible.
MARKERS = {"bptt": "o", "tbptt": "v", "d_rtrl": "s", "es_d_rtrl": "^", "hybrid": "x"}
WIDTHS = {"bptt": 2.0, "tbptt": 2.0, "d_rtrl": 2.0, "es_d_rtrl": 2.6, "hybrid": 1.2}


def _label(result: ComparisonResult, method: str) -> str:
    """'TBPTT(K=10)', 'ES-D-RTRL (decay 0.99)', 'D-RTRL', ... for a method or variant."""
    base = method_base(method)
    name = LABELS.get(base, method)
    if base == "tbptt":  # in --stream its window is the update interval
        option = method_option(method)
        window = (
            result.config.stream_every
            if result.stream
            else (int(option) if option else result.config.tbptt_window)
        )
        return f"{name}(K={window})"
    window = method_window(method)
    if window is not None:
        name = f"{name} + window {window}"
    if method in result.decays:
        return f"{name} (decay {result.decays[method]:.3g})"
    return name


class Table(NamedTuple):
    title: str
    header: tuple[str, ...]
    rows: list[tuple[str, ...]]
    note: str = ""


# ----------------------------------------------------------------------------- numbers


def _num(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _pct(value: float) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:.1f}%"


def _mb(value: float) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.0f}"


def _seconds(value: float) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


# ----------------------------------------------------------------------------- tables


def summary_table(result: ComparisonResult) -> Table:
    rows = []
    for method, run in result.runs.items():
        mem = result.memory.get(method)
        final = run.final
        rows.append(
            (
                _label(result, method),
                _pct(final.train_acc),
                _pct(final.test_acc),
                _num(final.train_loss),
                _num(final.test_loss),
                _seconds(run.seconds_per_epoch),
                _seconds(run.setup_seconds),
                _mb(mem.task_peak_mb) if mem else "-",
            )
        )
    header = (
        "method",
        "train acc",
        "test acc",
        "train loss",
        "test loss",
        "s/epoch",
        "setup s",
        "peak RSS MB",
    )
    loss = (
        "mean squared error"
        if result.task["kind"] == "regression_every_step"
        else "mean cross-entropy per labelled step"
    )
    note = (
        f"After {result.config.epochs} epoch(s) of {result.n_batches} minibatches of "
        f"{result.batch_size}; loss = {loss}. setup = conversion + first compiled run. "
        "peak RSS = a fresh process training one minibatch."
    )
    return Table("Learning summary", header, rows, note)


def fidelity_table(result: ComparisonResult) -> Table:
    methods = list(result.fidelity)
    if not methods:
        return Table(
            "Gradient fidelity vs BPTT at initialisation", ("",), [], "no online method selected"
        )
    header = ("parameter", "shape") + tuple(
        f"{_label(result, m)} {what}" for m in methods for what in ("cos", "rel.err")
    )
    first = result.fidelity[methods[0]]
    rows = []
    for i, row in enumerate(first.rows):
        cells = [row.name, "x".join(map(str, row.shape)) or "scalar"]
        for m in methods:
            r = result.fidelity[m].rows[i]
            cells += [f"{r.cosine:.6f}", f"{r.rel_error:.2e}"]
        rows.append(tuple(cells))
    rows.append(
        ("min cos / max err", "")
        + tuple(
            c
            for m in methods
            for c in (
                f"{result.fidelity[m].min_cosine:.6f}",
                f"{result.fidelity[m].worst_rel_error:.2e}",
            )
        )
    )
    return Table(
        "Gradient fidelity vs BPTT at initialisation",
        header,
        rows,
        "Cosine similarity and relative error ||g - g_bptt|| / ||g_bptt|| of each online "
        "gradient, same weights, same first minibatch.",
    )


def _cell(result: ComparisonResult, method: str, T: int, values: dict, fmt) -> str:
    """A sweep cell: the value, 'over budget' where the method stopped at the memory budget."""
    if T in values and math.isfinite(values[T]):
        return fmt(values[T])
    prof = result.memory.get(method)
    if prof is not None and prof.over_budget_from is not None and T >= prof.over_budget_from:
        return "over budget"
    return "n/a"


def memory_series(result: ComparisonResult, field: str = "peak_mb") -> dict[str, dict[int, float]]:
    return {
        m: {p.seq_len: getattr(p, field) for p in prof.sweep} for m, prof in result.memory.items()
    }


def time_series(result: ComparisonResult, scale: float = 1.0) -> dict[str, dict[int, float]]:
    return {
        m: {p.seq_len: scale * p.step_seconds for p in points}
        for m, points in result.timing.items()
    }


def memory_sweep_table(result: ComparisonResult) -> Table:
    note = (
        "Peak resident memory (MiB) of the whole process during one training step over T "
        f"synthetic steps, batch {result.batch_size}, one fresh process per method, T "
        "ascending, the kernel's high-water mark reset before each T; in parentheses what the "
        "step added to the process's resident memory just before it (for online methods this "
        "includes compiling the step for that T). 'over budget': the step would pass "
        f"--memory-budget {result.config.memory_budget:.0f} MiB and was not run."
    )
    if any(not m.hwm_reset for m in result.memory.values()):
        note += " The high-water mark could not be reset here: values are cumulative peaks."
    lens = result.config.seq_lens
    rows = []
    for method, prof in result.memory.items():
        points = {p.seq_len: p for p in prof.sweep}
        rows.append(
            (_label(result, method),)
            + tuple(
                f"{_mb(points[T].peak_mb)} (+{_mb(points[T].step_mb)})"
                if T in points
                else _cell(result, method, T, {}, _mb)
                for T in lens
            )
        )
    return Table(
        "Peak memory vs sequence length", ("method",) + tuple(f"T={T}" for T in lens), rows, note
    )


def memory_cost_table(result: ComparisonResult) -> Table:
    """Fixed runtime cost vs per-step growth (least-squares line through each method's peaks)
    and the T where BPTT's memory passes each other method's."""
    from .results import crossover, memory_fit

    reference = result.memory.get("bptt")
    rows = []
    for method, prof in result.memory.items():
        fit = memory_fit(prof)
        cross = "-"
        if reference is not None and is_online(method) and not prof.error:
            c = crossover(reference, prof)
            fitted = (
                f"~{c.fitted_T:,.0f}" if math.isfinite(c.fitted_T) and c.fitted_T > 0 else "none"
            )
            measured = (
                ""
                if c.between is None
                else f" (measured: between T={c.between[0]:,} and {c.between[1]:,})"
                if c.between[0] != c.between[1]
                else f" (measured: already at T={c.between[0]:,})"
            )
            cross = fitted + measured
        stop = (
            f"over budget from T={prof.over_budget_from:,}"
            if prof.over_budget_from is not None
            else ""
        )
        rows.append(
            (
                _label(result, method),
                _mb(fit.fixed_mb),
                _num(fit.per_step_kb, 2),
                cross,
                stop or "-",
            )
        )
    note = (
        "Least-squares line peak MiB = fixed + per-step x T through the measured points: "
        "'fixed' is the runtime's cost before any time step (for online methods mostly the "
        "JAX runtime), 'KiB/step' what each further time step adds. BPTT passes a method's "
        "memory at T = (fixed_method - fixed_BPTT) / (growth_BPTT - growth_method), and "
        "between the two measured T where its measured peak first exceeds the method's. "
        "Every method holds the T-step input batch itself "
        f"({result.task['n_in'] * result.batch_size * 4 / 1024:.2f} KiB/step in float32); "
        "TBPTT's memory is bounded by its window like the online methods'."
    )
    return Table(
        "Memory: fixed cost, growth per step, crossover with BPTT",
        ("method", "fixed MiB", "KiB/step", "BPTT passes it at T", "budget"),
        rows,
        note,
    )


def time_sweep_table(result: ComparisonResult) -> Table:
    lens = result.config.seq_lens
    series = time_series(result)
    rows = [
        (_label(result, m),) + tuple(_cell(result, m, T, series.get(m, {}), _seconds) for T in lens)
        for m in result.memory or series
    ]
    return Table(
        "Time per training step vs sequence length",
        ("method",) + tuple(f"T={T}" for T in lens),
        rows,
        "Seconds for one warm training step (forward, gradients, Adam) over T synthetic "
        f"steps, batch {result.batch_size}, measured in each method's memory process "
        "(two run side by side, sharing the cores).",
    )


def stream_table(result: ComparisonResult) -> Table:
    rows = []
    for method, run in result.stream.items():
        if run.error or not run.curve:
            rows.append((_label(result, method), "-", "-", "-", run.error or "no data"))
            continue
        first, last = run.curve[0], run.curve[-1]
        tail = run.curve[-max(1, len(run.curve) // 4) :]
        rows.append(
            (
                _label(result, method),
                _pct(first.accuracy),
                _pct(last.accuracy),
                _pct(float(np.mean([p.accuracy for p in tail]))),
                _seconds(run.seconds),
            )
        )
    c = result.config
    return Table(
        "Stream: accuracy over time",
        ("method", "first bin", "last bin", "last quarter", "seconds"),
        rows,
        f"{result.batch_size} streams of {c.stream_trials} back-to-back cue-delay "
        f"trials (delay {c.delay}), no resets; an Adam step every {c.stream_every} steps "
        "(TBPTT: window = that interval). Accuracy of the prediction each go step made "
        "with the weights of that moment, in bins of trials.",
    )


def options_table(result: ComparisonResult) -> Table:
    """Per algorithm, the options that reduce the accuracy gap when it is an algorithm choice."""
    c, t = result.config, result.task
    horizon = t.get("horizon") or t["seq_len"]
    rows = [
        (
            "TBPTT",
            f"window K (here {c.tbptt_window}; --tbptt-window, tbptt@K)",
            f"gradients reach back K steps: K must reach past the horizon ({horizon} steps here) "
            "or the earliest input a target needs (the cue) is out of reach; its memory then grows "
            "like BPTT's up to K",
        ),
        (
            "D-RTRL",
            "none needed for element-wise models",
            "exact (= BPTT) when the recurrence is element-wise and the readout memoryless "
            "(multiscale, leaky, lif_direct); approximate with recurrent weights (gru, lstm)",
        ),
        (
            "ES-D-RTRL",
            f"trace decay (--decay, es_d_rtrl@DECAY; 'auto' = max(0.9, 1 - 1/H) = "
            f"{result.horizon_decay:.3g} here)",
            "the input/output traces forget with the decay: a decay of 0.9 remembers about 10 "
            "steps, too short for a long delay",
        ),
        (
            "hybrid",
            "trace decay of its io-dim traces, as ES-D-RTRL",
            "param-dim traces where cheap, io-dim elsewhere",
        ),
        (
            "all online",
            "window K (d_rtrl+wK, es_d_rtrl@DECAY+wK; OnlineLearner(window=K))",
            "exact BPTT inside windows of K steps, the traces carry the gradient across "
            "windows: K = T is BPTT, +w1 one step of exact backprop + traces; the memory of "
            "K steps of BPTT on top of the traces",
        ),
    ]
    return Table(
        "Options that narrow the gap to BPTT",
        ("algorithm", "option", "why"),
        rows,
        "Variants to measure side by side: --methods bptt,tbptt@10,tbptt@"
        f"{horizon + 1},d_rtrl,es_d_rtrl@0.9,es_d_rtrl,es_d_rtrl+w10",
    )


def all_tables(result: ComparisonResult) -> list[Table]:
    if result.stream:
        return [stream_table(result), options_table(result)]
    tables = [summary_table(result), fidelity_table(result)]
    if result.memory and result.config.sweep:
        tables += [memory_cost_table(result), memory_sweep_table(result)]
    if result.timing:
        tables.append(time_sweep_table(result))
    tables.append(options_table(result))
    return tables


def format_text(table: Table) -> str:
    """Aligned plain text: first column left, the others right-aligned."""
    if not table.rows:
        return f"{table.title}\n  ({table.note})"
    cells = [table.header, *table.rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(table.header))]
    fmt = lambda r: "  ".join(
        c.ljust(w) if i == 0 or (i == 1 and "shape" in table.header) else c.rjust(w)
        for i, (c, w) in enumerate(zip(r, widths))
    ).rstrip()
    lines = [table.title, fmt(table.header), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in table.rows]
    return "\n".join(lines)


def format_markdown(table: Table) -> str:
    if not table.rows:
        return f"### {table.title}\n\n{table.note}\n"
    align = ["---"] + ["---:"] * (len(table.header) - 1)
    if "shape" in table.header:
        align[1] = "---"
    lines = [
        f"### {table.title}",
        "",
        "| " + " | ".join(table.header) + " |",
        "|" + "|".join(align) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in table.rows]
    if table.note:
        lines += ["", table.note]
    return "\n".join(lines) + "\n"


def print_report(result: ComparisonResult, file=None) -> None:
    file = file or sys.stdout
    print(file=file)
    for table in all_tables(result):
        print(format_text(table), file=file)
        print(file=file)
    for note in result.notes:
        print(f"note: {note}", file=file)
    print(f"total time {result.seconds:.1f} s", file=file)


# ----------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    return plt


def plot_learning_curves(result: ComparisonResult, path: Path) -> None:
    plt = _pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method, run in result.runs.items():
        epochs = [e.epoch for e in run.curve]
        base = method_base(method)
        style = dict(
            color=COLORS.get(base),
            marker=MARKERS.get(base, "o"),
            markersize=4,
            lw=WIDTHS.get(method_base(method), 1.5),
        )
        label = _label(result, method)
        ax_loss.plot(epochs, [e.test_loss for e in run.curve], label=f"{label} test", **style)
        ax_loss.plot(
            epochs,
            [e.train_loss for e in run.curve],
            ls="--",
            alpha=0.6,
            label=f"{label} train",
            **style,
        )
        ax_acc.plot(epochs, [e.test_acc for e in run.curve], label=f"{label} test", **style)
        ax_acc.plot(
            epochs,
            [e.train_acc for e in run.curve],
            ls="--",
            alpha=0.6,
            label=f"{label} train",
            **style,
        )
    ax_loss.set(xlabel="epoch", ylabel="loss (mean per labelled step)", title="Loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="Accuracy", ylim=(0, 1.02))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax_acc.legend(fontsize=8, ncol=2, loc="lower right")
    fig.suptitle(f"{result.model_spec} on {result.task['name']}: solid = held-out, dashed = train")
    _save(fig, path)


def plot_gradient_fidelity(result: ComparisonResult, path: Path) -> None:
    plt = _pyplot()
    methods = list(result.fidelity)
    fig, (ax_cos, ax_err) = plt.subplots(
        2, 1, figsize=(max(7, 1.1 * _n_params(result) + 3), 6.5), sharex=True
    )
    if not methods:
        ax_cos.text(0.5, 0.5, "no online method selected", ha="center", transform=ax_cos.transAxes)
        _save(fig, path)
        return
    names = [r.name for r in result.fidelity[methods[0]].rows]
    x = np.arange(len(names))
    width = 0.8 / len(methods)
    for k, method in enumerate(methods):
        rows = result.fidelity[method].rows
        offset = (k - (len(methods) - 1) / 2) * width
        kw = dict(width=width, color=COLORS.get(method_base(method)), label=_label(result, method))
        ax_cos.bar(x + offset, [r.cosine for r in rows], **kw)
        ax_err.bar(x + offset, [max(r.rel_error, 1e-12) for r in rows], **kw)
    low = min(0.0, min(r.cosine for m in methods for r in result.fidelity[m].rows))
    ax_cos.set(ylabel="cosine vs BPTT", ylim=(low, 1.05))
    fig.suptitle("Online gradient vs BPTT at initialisation (same weights, same minibatch)")
    ax_cos.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax_err.set(ylabel="relative error (log)", yscale="log")
    ax_err.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    for ax in (ax_cos, ax_err):
        ax.grid(axis="y", alpha=0.3)
    ax_cos.legend(
        fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(methods), frameon=False
    )
    _save(fig, path)


def _n_params(result: ComparisonResult) -> int:
    return max((len(r.rows) for r in result.fidelity.values()), default=1)


def _draw_series(
    ax, result: ComparisonResult, series: dict, ylabel: str, title: str, logy: bool, missing: str
) -> None:
    for method, values in series.items():
        points = sorted((T, v) for T, v in values.items() if math.isfinite(v))
        if points:
            base = method_base(method)
            ax.plot(
                *zip(*points),
                marker=MARKERS.get(base, "o"),
                color=COLORS.get(base),
                lw=WIDTHS.get(method_base(method), 1.5),
                label=_label(result, method),
            )
    if not any(series.values()):
        ax.text(0.5, 0.5, missing, ha="center", transform=ax.transAxes)
    ax.set(xscale="log", xlabel="sequence length T (log scale)", ylabel=ylabel, title=title)
    if logy:
        ax.set_yscale("log")
        from matplotlib.ticker import LogLocator, NullFormatter

        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(_plain_formatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(list(result.config.seq_lens), [str(t) for t in result.config.seq_lens])
    ax.xaxis.set_minor_locator(_null_locator())  # only the measured T values as x ticks
    ax.grid(alpha=0.3, which="both")
    if any(series.values()):
        ax.legend(fontsize=8)


def _plain_formatter():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _: f"{v:g}")


def _null_locator():
    from matplotlib.ticker import NullLocator

    return NullLocator()


def _short(t: int) -> str:
    return f"{t // 1000}k" if t >= 10000 and t % 1000 == 0 else f"{t:,}"


def plot_memory_vs_T(result: ComparisonResult, path: Path) -> None:
    """Left: peak RSS vs T with each method's fitted line (fixed + growth x T), the budget and
    BPTT's crossovers. Right: the two parts of the fit, per method."""
    from .results import crossover, memory_fit

    plt = _pyplot()
    fig, (ax, ax_fit) = plt.subplots(
        1, 2, figsize=(12, 4.4), gridspec_kw={"width_ratios": [1.6, 1]}
    )
    _draw_series(
        ax,
        result,
        memory_series(result, "peak_mb"),
        "peak resident memory (MiB)",
        "Peak RSS of the process during one update",
        logy=False,
        missing="not measured (--no-memory / --no-sweep)",
    )
    lens = np.geomspace(min(result.config.seq_lens), max(result.config.seq_lens), 60)
    fits = {m: memory_fit(p) for m, p in result.memory.items()}
    for method, fit in fits.items():
        if math.isfinite(fit.fixed_mb):
            ax.plot(
                lens,
                fit.fixed_mb + fit.per_step_kb / 1024 * lens,
                ls="--",
                lw=0.8,
                color=COLORS.get(method_base(method)),
                alpha=0.7,
            )
    top = max((p.peak_mb for prof in result.memory.values() for p in prof.sweep), default=0)
    if result.memory and result.config.memory_budget < 1.5 * max(top, 1):
        ax.axhline(result.config.memory_budget, color="grey", ls=":", lw=1)
        ax.text(
            lens[0],
            result.config.memory_budget,
            " --memory-budget",
            va="bottom",
            fontsize=8,
            color="grey",
        )
    reference = result.memory.get("bptt")
    for method, prof in result.memory.items():
        if reference is None or not is_online(method) or prof.error:
            continue
        c = crossover(reference, prof)
        if math.isfinite(c.fitted_T) and lens[0] <= c.fitted_T <= lens[-1]:
            ax.axvline(c.fitted_T, color=COLORS.get(method_base(method)), ls=":", lw=1)
            ax.text(
                c.fitted_T,
                ax.get_ylim()[1],
                f"{_label(result, method)}: T~{c.fitted_T:,.0f}",
                rotation=90,
                va="top",
                ha="right" if method_base(method) == "d_rtrl" else "left",
                fontsize=7,
                color=COLORS.get(method_base(method)),
            )
    ax.set_xticks(list(result.config.seq_lens), [_short(t) for t in result.config.seq_lens])
    names = [m for m, f in fits.items() if math.isfinite(f.fixed_mb)]
    y = np.arange(len(names))
    growth = [fits[m].per_step_kb for m in names]
    ax_fit.barh(y, growth, color=[COLORS.get(method_base(m)) for m in names])
    for i, m in enumerate(names):
        ax_fit.text(
            max(growth[i], 0),
            i,
            f" {growth[i]:.1f} KiB/step, fixed {fits[m].fixed_mb:.0f} MiB",
            va="center",
            fontsize=8,
        )
    ax_fit.set_yticks(y, [_label(result, m) for m in names], fontsize=8)
    ax_fit.invert_yaxis()
    ax_fit.set(
        xlabel="memory added per time step (KiB)", title="Fixed runtime cost vs growth per step"
    )
    ax_fit.set_xlim(0, 1.9 * max(growth + [1.0]))
    ax_fit.grid(axis="x", alpha=0.3)
    fig.suptitle(
        f"Memory vs sequence length: one update, batch {result.batch_size}, fresh "
        "process per method (dashed: fitted fixed + growth x T)"
    )
    _save(fig, path)


def plot_time_vs_T(result: ComparisonResult, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    _draw_series(
        ax,
        result,
        time_series(result, 1e3),
        "milliseconds per training step (log scale)",
        f"Time of one warm training step (batch {result.batch_size})",
        logy=True,
        missing="not measured (--no-sweep)",
    )
    _save(fig, path)


def plot_stream(result: ComparisonResult, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for method, run in result.stream.items():
        if run.curve:
            ax.plot(
                [p.trials for p in run.curve],
                [p.accuracy for p in run.curve],
                color=COLORS.get(method_base(method)),
                marker=MARKERS.get(method_base(method)),
                lw=WIDTHS.get(method_base(method), 1.5),
                label=_label(result, method),
            )
    chance = 1.0 / result.task["n_out"]
    ax.axhline(chance, color="grey", ls=":", lw=1, label=f"chance ({chance:.2f})")
    ax.set(
        xlabel="trials seen (per stream)",
        ylabel="accuracy at the go step",
        ylim=(0, 1.02),
        title=f"Learning on a stream: an Adam step every {result.config.stream_every} steps, "
        "no resets",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)


# ----------------------------------------------------------------------------- report.md


def _versions() -> str:
    names = ["etrace", "torch", "jax", "jaxlib", "brainstate", "numpy", "scikit-learn"]
    found = []
    for name in names:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return f"Python {platform.python_version()}, " + ", ".join(found)


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    ram = ""
    try:
        with open("/proc/meminfo") as f:
            kib = int(next(l for l in f if l.startswith("MemTotal")).split()[1])
        ram = f", {kib / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ""
    if hasattr(os, "getloadavg"):
        load = f"; load average {os.getloadavg()[0]:.1f} when the report was written"
    return f"{platform.platform()}; {cpu}; {cores} usable CPU core(s){ram}{load}"


def _config_lines(result: ComparisonResult) -> list[str]:
    c, t = result.config, result.task
    return [
        f"- model: `{result.model_spec}` ({result.model_class}, {result.n_params} parameters, "
        f"hidden {c.hidden} for built-in models), dtype {c.dtype}",
        f"- task: `{t['name']}` ({t['kind']}, T={t['seq_len']}, {t['n_in']} inputs, "
        f"{t['n_out']} outputs, {t['n_train']} train / {t['n_test']} held-out sequences"
        + (
            f", delay {c.delay}, dependency horizon {t.get('horizon')} steps, chance "
            f"{1 / t['n_out']:.2f}"
            if t["name"] == "cue_delay"
            else ""
        )
        + ")",
        f"- methods: {', '.join(_label(result, m) for m in c.methods)}; io-dim trace decay "
        + (
            f"{c.decay}"
            if c.decay is not None
            else f"'auto' = max(0.9, 1 - 1/horizon) = {result.horizon_decay:.3g}"
        )
        + f"; TBPTT: one Adam step per {c.tbptt_update}",
        (
            f"- stream: {result.batch_size} streams of {c.stream_trials} trials, Adam lr {c.lr} "
            f"every {c.stream_every} steps, seed {c.seed}; all methods start from the same initial "
            "weights and see the same streams"
            if result.stream
            else f"- training: {c.epochs} epoch(s), Adam lr {c.lr}, batch {result.batch_size} "
            f"({result.n_batches} minibatches/epoch), seed {c.seed}; all methods start from the "
            "same initial weights and see the same minibatches"
        ),
        f"- total run time: {result.seconds:.1f} s",
    ]


def markdown_report(result: ComparisonResult, argv: Sequence[str], plots: Sequence[str]) -> str:
    lines = [
        "# etrace-compare report",
        "",
        "```",
        "etrace-compare " + " ".join(_quote(a) for a in argv),
        "```",
        "",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- machine: {_machine()}",
        f"- versions: {_versions()}",
        *_config_lines(result),
        "",
    ]
    tables = all_tables(result)
    images = {
        "Learning summary": ["learning_curves.png"],
        "Gradient fidelity vs BPTT at initialisation": ["gradient_fidelity.png"],
        "Memory: fixed cost, growth per step, crossover with BPTT": ["memory_vs_T.png"],
        "Time per training step vs sequence length": ["time_vs_T.png"],
        "Stream: accuracy over time": ["accuracy_over_time.png"],
    }
    for table in tables:
        lines.append(format_markdown(table))
        for image in images.get(table.title, []):
            if image in plots:
                lines += [f"![{image[:-4]}]({image})", ""]
    if not result.memory and not result.stream:
        lines += ["Peak memory was not measured (`--no-memory`).", ""]
    if not result.timing and not result.stream:
        lines += ["Time vs T was not measured (`--no-memory` / `--no-sweep`).", ""]
    if result.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in result.notes] + [""]
    return "\n".join(lines)


def _quote(arg: str) -> str:
    return arg if arg and all(ch.isalnum() or ch in "-_.,/:=+" for ch in arg) else repr(arg)


def write_report(result: ComparisonResult, out_dir, argv: Sequence[str]) -> Path:
    """Write the PNG plots and report.md into `out_dir` (created); return report.md's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if result.stream:
        plotters = {"accuracy_over_time.png": plot_stream}
    else:
        plotters = {
            "learning_curves.png": plot_learning_curves,
            "gradient_fidelity.png": plot_gradient_fidelity,
        }
        if result.memory and result.config.sweep:  # no empty plots for what was not measured
            plotters["memory_vs_T.png"] = plot_memory_vs_T
        if result.timing:
            plotters["time_vs_T.png"] = plot_time_vs_T
    for name, plot in plotters.items():
        plot(result, out / name)
    path = out / "report.md"
    path.write_text(markdown_report(result, argv, list(plotters)))
    return path
