"""Text and picture summaries of a compiled ETraceGraph."""

from __future__ import annotations

import brainstate

from etrace_core.compiler.graph import ETraceGraph
from etrace_core.compiler.relations import analyse_relations


def untraced_weights(
    graph: ETraceGraph, param_traces=(), over_budget=()
) -> list[tuple[tuple, str]]:
    """(path, reason) for every parameter that has no online-traced use; the reason starts with
    'approximate:' when the parameter feeds hidden states (its same-step gradient then drops
    the paths through time), and is an exact same-step gradient otherwise (readouts)."""
    minfo = graph.module_info
    traced = {p for r in graph.hidden_param_op_relations for p in (r.weight_path, r.bias_path) if p}
    traced |= {r.path for r in param_traces}
    _, uses = analyse_relations(minfo, graph.hid_path_to_group)
    reasons = {u.path: u.reason for u in over_budget}
    for use in uses:
        if use.path not in traced:
            reasons.setdefault(use.path, _readout_reason(use.reason))
    return sorted(reasons.items())


def _readout_reason(reason: str) -> str:
    if reason.startswith("used through"):  # a plain op: say why that is exact here
        return reason.replace(
            ": same-step gradient",
            "; it reaches no hidden state (a memoryless readout): exact same-step gradient",
        )
    return reason


def dynamic_states(graph: ETraceGraph) -> list[tuple]:
    """Short-term states written by the step that are not hidden states."""
    minfo = graph.module_info
    hidden = set(graph.hid_path_to_group)
    return [
        p
        for p in minfo.written_paths
        if p not in hidden and isinstance(minfo.state_of(p), brainstate.ShortTermState)
    ]


def graph_summary(graph: ETraceGraph, param_traces=(), over_budget=()) -> str:
    rule = "=" * 100
    lines = [rule, "Hidden groups:"]
    for g in graph.hidden_groups:
        lines.append(
            f"  Group {g.index}: {list(g.hidden_paths)}  "
            f"(num_state={g.num_state}, varshape={g.varshape})"
        )
    if not graph.hidden_groups:
        lines.append("  (none: the model keeps no HiddenState; it trains as a feed-forward model)")
    dyn = dynamic_states(graph)
    if dyn:
        lines += ["", "Dynamic (non-hidden) states:"]
        lines += [f"  Dynamic state {i}: {p}" for i, p in enumerate(dyn)]
    if graph.hidden_param_op_relations:
        lines += ["", "Online-traced weights (weight -> hidden groups, through the ETP op):"]
        for i, r in enumerate(graph.hidden_param_op_relations):
            groups = [g.index for g in r.hidden_groups]
            bias = f" + bias {r.bias_path}" if r.bias_path else ""
            lines.append(
                f"  Weight {i}: {r.weight_path}{bias} via {r.primitive.name} -> {_target(groups)}"
            )
            lines += [f"      approximate: {note}" for note in r.approximations]
    lines += _param_trace_lines(param_traces)
    untraced = untraced_weights(graph, param_traces, over_budget)
    exact = [(p, r) for p, r in untraced if not r.startswith("approximate:")]
    approx = [(p, r) for p, r in untraced if r.startswith("approximate:")]
    if approx:
        lines += [
            "",
            "Weights not online-traced, approximate (same-step gradient of a weight "
            "that feeds hidden states):",
        ]
        lines += [f"  {p}: {reason}" for p, reason in approx]
    if exact:
        lines += ["", "Weights not online-traced (they get their exact same-step gradient):"]
        lines += [f"  {p}: {reason}" for p, reason in exact]
    lines.append(rule)
    return "\n".join(lines)


def _target(groups) -> str:
    return f"hidden group {groups[0]}" if len(groups) == 1 else f"hidden groups {groups}"


def _param_trace_lines(param_traces) -> list[str]:
    lines = []
    elem = [r for r in param_traces if r.kind == "elementwise"]
    dense = [r for r in param_traces if r.kind == "dense"]
    if elem:
        lines += [
            "",
            "Online-traced parameters, element-wise relations (one trace element per "
            "hidden element):",
        ]
        for r in elem:
            lines.append(
                f"  {r.path} ({r.param_size} elements) -> "
                f"{_target([g.index for g in r.hidden_groups])}: element-wise trace, "
                f"{r.trace_size} elements ({_mib(r.trace_bytes())})"
            )
            lines += [f"      approximate: {note}" for note in r.approximations]
    if dense:
        lines += [
            "",
            "Online-traced parameters, dense traces dh/dtheta (behind a position-mixing op):",
        ]
        for r in dense:
            lines.append(
                f"  {r.path} ({r.param_size} elements) via {r.mixing} -> "
                f"{_target([g.index for g in r.hidden_groups])}: dense trace, "
                f"{r.trace_size} elements, memory {_mib(r.trace_bytes())}"
            )
            lines += [f"      approximate: {note}" for note in r.approximations]
    return lines


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.3g} MiB"


def graph_to_dot(graph: ETraceGraph, param_traces=(), over_budget=()) -> str:
    """The graph in graphviz DOT: weights -> hidden groups, untraced weights dashed."""
    out = ["digraph etrace {", "  rankdir=LR;", "  node [fontname=Helvetica];"]
    for g in graph.hidden_groups:
        label = "\\n".join(".".join(p) for p in g.hidden_paths)
        out.append(
            f'  "group{g.index}" [shape=ellipse, style=filled, fillcolor="#cde4ff", '
            f'label="group {g.index}\\n{label}"];'
        )
    for i, r in enumerate(graph.hidden_param_op_relations):
        w = ".".join(r.weight_path)
        out.append(f'  "w{i}" [shape=box, label="{w}\\n{r.primitive.name}"];')
        for g in r.hidden_groups:
            out.append(f'  "w{i}" -> "group{g.index}";')
    for j, r in enumerate(param_traces):
        out.append(f'  "p{j}" [shape=box, label="{".".join(r.path)}\\n{r.kind} trace"];')
        for g in r.hidden_groups:
            out.append(f'  "p{j}" -> "group{g.index}";')
    for j, (p, reason) in enumerate(untraced_weights(graph, param_traces, over_budget)):
        out.append(f'  "u{j}" [shape=box, style=dashed, label="{".".join(p)}\\n(same-step)"];')
    out.append("}")
    return "\n".join(out)


def plot_graph(graph: ETraceGraph, filename: str, param_traces=(), over_budget=()) -> str:
    """Draw weights (left) and hidden groups (right) with matplotlib; returns the file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rels = [
        (f"{'.'.join(r.weight_path)} ({r.primitive.name})", r.hidden_groups)
        for r in graph.hidden_param_op_relations
    ]
    rels += [(f"{'.'.join(r.path)} ({r.kind} trace)", r.hidden_groups) for r in param_traces]
    untraced = untraced_weights(graph, param_traces, over_budget)
    groups = list(graph.hidden_groups)
    n_left = len(rels) + len(untraced)
    height = max(n_left, len(groups), 1)
    fig, ax = plt.subplots(figsize=(9, 0.6 * height + 1.5))
    ax.axis("off")

    def y_of(i, n):
        return height - (i + 0.5) * height / max(n, 1)

    for gi, g in enumerate(groups):
        ax.text(
            0.78,
            y_of(gi, len(groups)),
            f"group {g.index}\n" + "\n".join(".".join(p) for p in g.hidden_paths),
            ha="left",
            va="center",
            bbox=dict(boxstyle="round", fc="#cde4ff"),
        )
    for i, (label, reached) in enumerate(rels):
        y = y_of(i, n_left)
        ax.text(0.02, y, label, ha="left", va="center", bbox=dict(boxstyle="square", fc="white"))
        for g in reached:
            ax.annotate(
                "",
                xy=(0.77, y_of(groups.index(g), len(groups))),
                xytext=(0.45, y),
                arrowprops=dict(arrowstyle="->", color="#335"),
            )
    for j, (p, _) in enumerate(untraced):
        ax.text(
            0.02,
            y_of(len(rels) + j, n_left),
            f"{'.'.join(p)} (same-step)",
            ha="left",
            va="center",
            bbox=dict(boxstyle="square", fc="white", ls="--"),
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, height)
    ax.set_title("eligibility-trace graph: weights -> hidden groups")
    fig.savefig(filename, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return filename
