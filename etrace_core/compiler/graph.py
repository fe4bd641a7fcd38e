"""ETraceGraph and the compile pipeline: module info -> hidden groups -> relations ->
perturbation."""

from __future__ import annotations

import builtins
import warnings
from collections.abc import Sequence
from typing import NamedTuple, Optional

from jax.extend import core as jcore

from etrace_core.ops import is_etp_primitive

from .control_flow import resolve_policy
from .errors import CompilationError, NotSupportedError
from .hidden_groups import HiddenGroup, find_hidden_groups_from_minfo
from .jaxpr_tools import CUSTOM_CALLS, LOOPS, inner_eqns, source_line
from .module_info import ModuleInfo, Path, extract_module_info
from .perturbation import HiddenPerturbation, add_hidden_perturbation_from_minfo
from .positions import reachable
from .relations import HiddenParamOpRelation, analyse_relations
from .unroll_scans import weight_values


class ETraceGraph(NamedTuple):
    """The compiled eligibility-trace graph of a one-step model."""

    module_info: ModuleInfo
    hidden_groups: Sequence[HiddenGroup]
    hid_path_to_group: builtins.dict[Path, HiddenGroup]
    hidden_param_op_relations: Sequence[HiddenParamOpRelation]
    hidden_perturb: Optional[HiddenPerturbation]

    def dict(self) -> dict:
        return self._asdict()


CompiledGraph = ETraceGraph


def compile_etrace_graph(
    model, *args, include_hidden_perturb: bool = True, control_flow=None
) -> ETraceGraph:
    """Compile `model` (a one-step brainstate module) called with `args` into an ETraceGraph.

    ``include_hidden_perturb=False`` leaves out the hidden perturbation (``hidden_perturb`` is
    None): enough to inspect the graph; the algorithms compile with it. ``control_flow``: a
    :class:`ControlFlowPolicy` (default ``ControlFlowPolicy()``), kept on ``module_info``."""
    minfo = extract_module_info(model, *args, control_flow=control_flow)
    check_opaque_ops(minfo)
    groups, by_path = find_hidden_groups_from_minfo(minfo)
    if not groups:
        warnings.warn(
            f"{type(model).__name__} has no HiddenState written by its step: there is nothing to "
            "carry over time, so online learning gives each step's ordinary gradient "
            "(a feed-forward model)",
            UserWarning,
            stacklevel=2,
        )
    relations, _ = analyse_relations(minfo, by_path)
    perturb = (
        add_hidden_perturbation_from_minfo(minfo) if groups and include_hidden_perturb else None
    )
    return ETraceGraph(minfo, tuple(groups), by_path, tuple(relations), perturb)


def check_opaque_ops(minfo: ModuleInfo) -> None:
    """Refuse what the compiler cannot follow inside the loops and custom calls left in the
    canonical program: weights or ETP ops inside them, and (``while_hidden='error'``) loops
    that feed hidden states. Every problem is reported at once."""
    policy = resolve_policy(minfo.control_flow)
    jaxpr = minfo.jaxpr
    weight_vars = weight_values(jaxpr, minfo.param_invars.values())
    weight_deps = {p: reachable(jaxpr, [v]) & weight_vars for p, v in minfo.param_invars.items()}
    feeds_hidden = set(minfo.hidden_outvars)
    loop_problems, call_problems = [], []
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name not in LOOPS and name not in CUSTOM_CALLS:
            continue
        ins = {v for v in eqn.invars if not isinstance(v, jcore.Literal)}
        weights = [p for p, deps in weight_deps.items() if ins & deps]
        etp = sorted({e.primitive.name for e in inner_eqns(eqn) if is_etp_primitive(e.primitive)})
        if name in CUSTOM_CALLS:
            if etp:
                call_problems.append(_custom_call_problem(name, weights, etp))
            continue
        if weights or etp:
            loop_problems.append(_loop_problem(eqn, weights, etp, policy))
        elif policy.while_hidden == "error" and reachable(jaxpr, eqn.outvars) & feeds_hidden:
            loop_problems.append(
                f"{_describe(eqn)} feeds a hidden state and ControlFlowPolicy(while_hidden="
                "'error') refuses loops that produce hidden states; use the default "
                "while_hidden='opaque-fwd' (the loop is kept whole, its derivatives come from "
                "forward-mode JVPs) or write the loop's steps out"
            )
    if loop_problems:
        raise NotSupportedError("\n".join(loop_problems))
    if call_problems:
        raise CompilationError("\n".join(call_problems))


def _describe(eqn) -> str:
    where = source_line(eqn)
    if eqn.primitive.name == "scan":
        what = f"a scan (lax.scan / for_loop) of length {eqn.params['length']}"
    else:
        what = f"a {eqn.primitive.name} loop"
    return f"{what}{f' at {where}' if where else ''}"


def _loop_problem(eqn, weights, etp, policy) -> str:
    ops = f"the ETP op(s) {etp}" if etp else "the weight's ops"
    named = f"weight(s) {weights}" if weights else "no ParamState (a constant weight)"
    head = f"{_describe(eqn)} uses {named}{' through ' + ', '.join(etp) if etp else ''}"
    if eqn.primitive.name == "scan":
        limit, length = policy.scan_unroll_limit, eqn.params["length"]
        why = (
            f"its length {length} is over ControlFlowPolicy.scan_unroll_limit={limit}"
            if limit > 0
            else f"unrolling is off (ControlFlowPolicy.scan_unroll_limit={limit})"
        )
        return (
            f"{head}: the compiler could not flatten {ops} out of the scan body: {why}, so it "
            "was not unrolled (etrace has no structured scan descent, whatever scan_descent "
            "says). "
            f"Fix: pass control_flow=ControlFlowPolicy(scan_unroll_limit={length}) to the "
            "algorithm (compile time grows with the length), or apply the weight outside the "
            "loop"
        )
    return (
        f"{head}: the compiler could not flatten {ops} out of the {eqn.primitive.name} body: a "
        "while loop has a data-dependent trip count, so it cannot be unrolled into the step "
        "and the weight's path to the hidden states cannot be followed. Fix: apply the weight "
        "outside the loop (the loop consuming only its result), or use a fixed-length "
        f"lax.scan / for_loop of at most scan_unroll_limit={policy.scan_unroll_limit} steps, "
        "which is unrolled"
    )


def _custom_call_problem(name, weights, etp) -> str:
    where = f" (weights {weights})" if weights else ""
    return (
        f"a {name} inside the step uses weights{where} through an ETP op ({', '.join(etp)}); "
        "the compiler cannot follow weights into a custom call. Move the weighted op out of it"
    )
