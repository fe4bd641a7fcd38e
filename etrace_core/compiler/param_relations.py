"""Parameter traces for parameters that reach hidden states without an ETP relation.

A `ParamState` that is not the weight/bias of a traced ETP op but whose value reaches hidden
states in the step (a per-unit decay, a shared time constant, a bias added after a matmul, a
norm gain, a conv kernel whose output is mixed by a dense layer) gets a parameter-dimension
trace of its own, dh^t/dtheta, carried with the group's per-unit Jacobian D:

- *element-wise*: each hidden element depends on at most one element of the parameter (found
  from origin maps, no annotation needed): one number per hidden element;
- *dense*: otherwise, the full dh/dtheta (hidden size x |theta|), if that fits the budget
  `dense_trace_budget` (elements of the trace, batch included); above it the parameter keeps
  its same-step gradient, labelled approximate with the size that would trace it.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from etrace_core.ops import is_etp_primitive

from .hidden_groups import HiddenGroup
from .jaxpr_tools import CUSTOM_CALLS, _positionwise_call
from .module_info import ModuleInfo, Path
from .origins import merge_origins, origins
from .perturbation import production_point
from .positions import MANY, NONE, propagate, reachable, static_values
from .recurrence import recurrence_notes
from .relations import UntracedUse, _groups_feeding_memory

DEFAULT_DENSE_TRACE_BUDGET = 1 << 22  # elements of one dense trace (32 MiB in float64)


class ParamTraceRelation(NamedTuple):
    """A parameter traced outside ETP ops, and the hidden groups its trace follows.

    `unit_to_param[k]` (element-wise traces) is an int array of `hidden_groups[k].size`
    entries: the flat parameter element each hidden unit depends on (-1: none). Dense traces
    hold the full Jacobian (`None` there).
    """

    path: Path
    kind: str  # 'elementwise' or 'dense'
    var: Any  # the parameter's input variable in the jaxpr
    hidden_groups: tuple[HiddenGroup, ...]
    unit_to_param: tuple[Optional[np.ndarray], ...]
    trace_size: int  # elements of the trace, batch included
    approximations: tuple[str, ...]
    mixing: str  # dense: the op that mixes positions

    @property
    def param_size(self) -> int:
        return int(np.prod(self.var.aval.shape, dtype=int))

    def trace_bytes(self) -> int:
        return self.trace_size * jnp.dtype(self.var.aval.dtype).itemsize


def made_at_vars(minfo: ModuleInfo, groups, static) -> dict[Path, Any]:
    """{hidden path: the variable where the step produces it} (see perturbation)."""
    outvars = minfo.state_outvars
    return {p: production_point(minfo, outvars[p], static) for g in groups for p in g.hidden_paths}


class ParamTraces(NamedTuple):
    """What `find_param_trace_relations` decides for the parameters outside clean relations."""

    traced: tuple[ParamTraceRelation, ...]
    over_budget: tuple[UntracedUse, ...]  # feed hidden states; dense trace above the budget
    replaced: frozenset  # weight paths whose ETP relations the traces replace
    also_used: tuple[tuple[Path, str], ...] = ()  # (weight path, note): relation weights that
    #                                        also reach hidden states through other, untraced uses


def find_param_trace_relations(
    minfo: ModuleInfo,
    hid_path_to_group: dict[Path, HiddenGroup],
    relations,
    budget: int = DEFAULT_DENSE_TRACE_BUDGET,
) -> ParamTraces:
    """Trace every float parameter that reaches a hidden state and is not the weight or bias of
    an exact ETP relation. A relation whose output also reaches the hidden state through a
    position-mixing op (a norm after the matmul) drops that path; its weight gets a dense trace
    instead when it fits the budget (the relation is then `replaced`)."""
    groups = sorted({g.index: g for g in hid_path_to_group.values()}.items())
    groups = [g for _, g in groups]
    if not groups:
        return ParamTraces((), (), frozenset())
    jaxpr = minfo.jaxpr
    static = static_values(minfo.closed_jaxpr)
    made_at = made_at_vars(minfo, groups, static)
    stop = frozenset(made_at.values())
    rec_notes = recurrence_notes(minfo, groups, made_at, static)
    memory_notes = _memory_notes(minfo, groups)
    mixed = _mixed_relation_weights(jaxpr, relations, static, stop)
    found, skipped = {}, []
    for path, var in minfo.param_invars.items():
        if not jnp.issubdtype(var.aval.dtype, jnp.inexact):
            continue
        reached = reachable(jaxpr, [var], stop=stop)
        hit = [g for g in groups if any(made_at[p] in reached for p in g.hidden_paths)]
        if not hit:
            continue
        blocker = _forward_blocker(jaxpr, reached)
        if blocker is not None:
            skipped.append(
                UntracedUse(
                    path,
                    (
                        f"approximate: same-step gradient: its value reaches hidden group(s) "
                        f"{[g.index for g in hit]} through the custom-VJP function {blocker}, "
                        "whose forward derivative is not known for it (not position-wise, or the "
                        "parameter "
                        "enters broadcast); a custom_jvp rule would let it be traced"
                    ),
                )
            )
            continue
        orig = origins(jaxpr, var, static, stop=stop)
        units = [_unit_origins(orig.maps, g, made_at) for g in hit]
        notes = [rec_notes[g.index] for g in hit if g.index in rec_notes]
        notes += [memory_notes[g.index] for g in hit if g.index in memory_notes]
        size_p = int(np.prod(var.aval.shape, dtype=int))
        if all(not np.any(u == MANY) for u in units):
            size = sum(g.size * g.num_state for g in hit)
            found[path] = ParamTraceRelation(
                path, "elementwise", var, tuple(hit), tuple(units), size, tuple(notes), ""
            )
            continue
        mixing = _first_mixer(jaxpr, var, orig.mixers, hit, made_at, stop, static)
        size = sum(g.size * g.num_state for g in hit) * size_p
        if size > budget:
            skipped.append(
                UntracedUse(
                    path,
                    (
                        f"approximate: same-step gradient: its value reaches hidden group(s) "
                        f"{[g.index for g in hit]} through {mixing}, which mixes positions; a "
                        "dense "
                        f"trace dh/dtheta would hold {size} elements (dense_trace_budget={budget}; "
                        f"raise it to at least {size} to trace this parameter)"
                    ),
                )
            )
            continue
        found[path] = ParamTraceRelation(
            path, "dense", var, tuple(hit), (None,) * len(hit), size, tuple(notes), mixing
        )
    replaced = frozenset(p for p in mixed if p in found)
    clean = {
        p
        for r in relations
        if r.weight_path not in replaced
        for p in (r.weight_path, r.bias_path)
        if p is not None
    }
    traced = tuple(r for p, r in found.items() if p not in clean)
    over = tuple(u for u in skipped if u.path not in clean)
    kept = [r for r in relations if r.weight_path not in replaced]
    return ParamTraces(traced, over, replaced, _other_uses(minfo, kept, stop))


def _forward_blocker(jaxpr, reached) -> Optional[str]:
    """The name of a custom-VJP call that forward mode cannot cross for a value in `reached`
    (see executor.param_jacobian: position-wise calls with same-shaped operands only)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name not in CUSTOM_CALLS or eqn.primitive.name == "custom_jvp_call":
            continue
        shapes = {tuple(v.aval.shape) for v in eqn.outvars}
        for v in eqn.invars:
            if (
                isinstance(v, jcore.Literal)
                or v not in reached
                or not jnp.issubdtype(v.aval.dtype, jnp.inexact)
            ):
                continue
            if not _positionwise_call(eqn) or {tuple(v.aval.shape)} != shapes:
                return str(eqn.params.get("name", eqn.primitive.name))
    return None


def _other_uses(minfo, relations, stop):
    """Relation weights/biases that also reach a hidden state through an op that is not one of
    their traced relations: the trace misses that path."""
    jaxpr = minfo.jaxpr
    {v: p for p, v in minfo.param_invars.items()}
    traced_at = {}
    for r in relations:
        for p in (r.weight_path, r.bias_path):
            if p is not None:
                traced_at.setdefault(p, set()).add(id(r.eqn))
    notes = []
    for path, eqn_ids in traced_at.items():
        var = minfo.param_invars[path]
        for eqn in jaxpr.eqns:
            if id(eqn) in eqn_ids or not any(v is var for v in eqn.invars):
                continue
            if reachable(jaxpr, [v for v in eqn.outvars], stop=stop) & stop:
                notes.append(
                    (
                        path,
                        f"{path} is also used through {eqn.primitive.name}, which "
                        "reaches hidden states outside its traced relation; that "
                        "path is not in the trace",
                    )
                )
                break
    return tuple(notes)


def _mixed_relation_weights(jaxpr, relations, static, stop) -> set:
    """Weights of relations whose output also reaches a hidden state through a mixing op."""
    mixed = set()
    for r in relations:
        prop = propagate(jaxpr, r.y, static, stop=stop)
        if any(reachable(jaxpr, e.outvars, stop=stop) & stop for e in prop.blocked):
            mixed.add(r.weight_path)
    return mixed


def _unit_origins(maps, group, made_at) -> np.ndarray:
    """Per unit of the group: the parameter element all its states depend on (NONE/MANY)."""
    unit = np.full(group.size, NONE)
    for p in group.hidden_paths:
        m = maps.get(made_at[p])
        if m is None:
            continue
        m = np.asarray(m).reshape(-1)
        if m.size != group.size:
            return np.full(group.size, MANY)
        unit = merge_origins(unit, m)
    return unit


def _first_mixer(jaxpr, var, mixers, groups, made_at, stop, static) -> str:
    """The op that mixes the parameter's positions on its way to the groups; for the weight of
    an ETP op, also the op after it that keeps the ETP output from the hidden state."""
    targets = {made_at[p] for g in groups for p in g.hidden_paths}
    for eqn in mixers:
        if not reachable(jaxpr, eqn.outvars, stop=stop) & targets:
            continue
        name = eqn.primitive.name
        if is_etp_primitive(eqn.primitive) and var in eqn.invars:
            after = [
                e
                for e in propagate(jaxpr, eqn.outvars[0], static, stop=stop).blocked
                if reachable(jaxpr, e.outvars, stop=stop) & targets
            ]
            if after:
                name += f" then {after[0].primitive.name}"
        return name
    return mixers[0].primitive.name if mixers else "an op that mixes positions"


def _memory_notes(minfo, groups) -> dict[int, str]:
    return _groups_feeding_memory(minfo, {p: g for g in groups for p in g.hidden_paths})


__all__ = [
    "ParamTraceRelation",
    "ParamTraces",
    "find_param_trace_relations",
    "made_at_vars",
    "DEFAULT_DENSE_TRACE_BUDGET",
]
