"""Where each element of a source variable lands, through element-wise and relabelling ops.

A position map of a variable `v` with respect to a source `s` is an int array over the flat
positions of `s`: entry `p` is the flat position of `v` that element `p` of `s` reaches, `NONE`
if it reaches no element of `v`, or `MANY` if it reaches several (broadcast, duplication, or two
different positions through two paths).
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple

import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from etrace_core.ops import is_etp_primitive

from .jaxpr_tools import RELABEL, bind_eqn, is_elementwise_eqn, read_var

NONE, MANY = -1, -2


class Propagation(NamedTuple):
    """The result of pushing one source through a jaxpr."""
    maps: Dict[jcore.Var, np.ndarray]        # var -> position map (for every var reached)
    blocked: List[jcore.JaxprEqn]           # eqns that consume a reached var but mix positions


def merge(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Combine two maps of the same source into one variable."""
    out = np.where(a == NONE, b, a)
    clash = (a != NONE) & (b != NONE) & (a != b)
    return np.where(clash, MANY, out)


def static_values(closed: jcore.ClosedJaxpr) -> dict:
    """Values of every variable that depends on constants only (e.g. gather indices)."""
    jaxpr, env = closed.jaxpr, {}
    for v, c in zip(jaxpr.constvars, closed.consts):
        env[v] = c
    for eqn in jaxpr.eqns:
        if all(isinstance(v, jcore.Literal) or v in env for v in eqn.invars) and not eqn.effects:
            try:
                outs = bind_eqn(eqn, [read_var(env, v) for v in eqn.invars])
            except Exception:  # noqa: BLE001 - a non-evaluable const expr is simply not static
                continue
            env.update({v: o for v, o in zip(eqn.outvars, outs)
                        if not isinstance(v, jcore.DropVar)})
    return env


def propagate(jaxpr: jcore.Jaxpr, source: jcore.Var, static: dict, stop=frozenset()) -> Propagation:
    """Push `source` forward through element-wise and relabelling equations.

    Variables in `stop` get a map but are not pushed further.
    """
    size = int(np.prod(source.aval.shape, dtype=int))
    maps = {source: np.arange(size)}
    blocked = []
    for eqn in jaxpr.eqns:
        carried = [v for v in eqn.invars
                   if not isinstance(v, jcore.Literal) and v in maps and v not in stop]
        if not carried:
            continue
        out = _push(eqn, maps, static)
        if out is None:
            blocked.append(eqn)
            continue
        for v, m in zip(eqn.outvars, out):
            if not isinstance(v, jcore.DropVar) and np.any(m != NONE):
                maps[v] = m   # a value holding none of the source's elements is not followed
    return Propagation(maps, blocked)


def is_admissible(eqn, static) -> bool:
    """Whether positions survive `eqn`: element-wise, or a relabelling with static indices."""
    if is_etp_primitive(eqn.primitive):
        return False
    if is_elementwise_eqn(eqn):
        return True
    if eqn.primitive.name not in RELABEL:
        return False
    return all(_operand_role(eqn, i) != "index" or isinstance(v, jcore.Literal) or v in static
               for i, v in enumerate(eqn.invars))


def _push(eqn, maps, static):
    if is_etp_primitive(eqn.primitive):
        return None
    if is_elementwise_eqn(eqn):
        return _push_elementwise(eqn, maps)
    if eqn.primitive.name in RELABEL:
        return _push_relabel(eqn, maps, static)
    return None


def _push_elementwise(eqn, maps):
    results = []
    for outvar in eqn.outvars:
        out_shape = tuple(outvar.aval.shape)
        merged = None
        for v in eqn.invars:
            if isinstance(v, jcore.Literal) or v not in maps:
                continue
            m = maps[v]
            if tuple(v.aval.shape) != out_shape:
                # a rank-0 value spread over a larger output: every element it carried is copied
                m = np.where(m == NONE, NONE, MANY if int(np.prod(out_shape)) > 1 else 0)
            merged = m if merged is None else merge(merged, m)
        results.append(merged)
    return results


def _push_relabel(eqn, maps, static):
    """Run the relabelling op itself on arrays of element ids to learn where elements go."""
    ids, offsets, offset = [], {}, 0
    for i, v in enumerate(eqn.invars):
        role = _operand_role(eqn, i)
        if role == "fill":
            ids.append(jnp.int32(NONE))
        elif role == "index":
            value = v.val if isinstance(v, jcore.Literal) else static.get(v)
            if value is None:
                return None  # dynamic indices: positions are not known at compile time
            ids.append(value)
        elif not isinstance(v, jcore.Literal) and v in maps:
            size = int(np.prod(v.aval.shape, dtype=int))
            ids.append(jnp.arange(offset, offset + size, dtype=jnp.int32).reshape(v.aval.shape))
            offsets[i] = (offset, size)
            offset += size
        else:
            ids.append(jnp.full(v.aval.shape, NONE, jnp.int32))
    params = dict(eqn.params)
    if eqn.primitive.name == "gather":
        params["fill_value"] = NONE
    try:
        outs = eqn.primitive.bind(*ids, **params)
    except Exception:  # noqa: BLE001 - an op we cannot replay on ids is treated as mixing
        return None
    outs = list(outs) if eqn.primitive.multiple_results else [outs]
    results = []
    for out_ids in outs:
        flat = np.asarray(out_ids).reshape(-1)
        merged = None
        for i, (start, size) in offsets.items():
            where = np.nonzero((flat >= start) & (flat < start + size))[0]
            local = flat[where] - start
            target = np.full(size, NONE)
            target[local] = where
            counts = np.bincount(local, minlength=size)
            target[counts > 1] = MANY
            src = maps[eqn.invars[i]]
            m = np.where(src >= 0, target[np.clip(src, 0, None)], src)
            merged = m if merged is None else merge(merged, m)
        results.append(merged)
    return results


def _operand_role(eqn, i) -> str:
    """'data' (elements that move), 'index' (must be static), or 'fill' (padding value)."""
    name = eqn.primitive.name
    if name in ("gather", "dynamic_slice") and i > 0:
        return "index"
    if name == "pad" and i == 1:
        return "fill"
    return "data"


def consumers(jaxpr: jcore.Jaxpr) -> dict:
    """var -> list of equations that read it."""
    users = {}
    for eqn in jaxpr.eqns:
        for v in eqn.invars:
            if not isinstance(v, jcore.Literal):
                users.setdefault(v, []).append(eqn)
    return users


def reachable(jaxpr: jcore.Jaxpr, start_vars, stop=frozenset()) -> set:
    """Every variable that depends on any of `start_vars` (through any equation), not going
    through the variables in `stop` (they are reached but not followed)."""
    seen = set(v for v in start_vars if not isinstance(v, jcore.Literal))
    for eqn in jaxpr.eqns:
        if any(not isinstance(v, jcore.Literal) and v in seen and v not in stop
               for v in eqn.invars):
            seen.update(v for v in eqn.outvars if not isinstance(v, jcore.DropVar))
    return seen


__all__ = ["NONE", "MANY", "Propagation", "merge", "propagate", "static_values", "consumers",
           "reachable", "is_admissible"]
