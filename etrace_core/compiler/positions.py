"""Where each element of a source variable lands, through element-wise and relabelling ops.

A position map of a variable `v` with respect to a source `s` is an int array over the flat
positions of `s`: entry `p` is the flat position of `v` that element `p` of `s` reaches, `NONE`
if it reaches no element of `v`, or `MANY` if it reaches several (broadcast, duplication, or two
different positions through two paths).
"""

from __future__ import annotations

import functools
import heapq
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from etrace_core.ops import is_etp_primitive

from . import relabel_numpy
from .jaxpr_tools import RELABEL, bind_eqn, is_elementwise_eqn, read_var

NONE, MANY = -1, -2


class Propagation(NamedTuple):
    """The result of pushing one source through a jaxpr."""

    maps: dict[jcore.Var, np.ndarray]  # var -> position map (for every var reached)
    blocked: list[jcore.JaxprEqn]  # eqns that consume a reached var but mix positions


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
            env.update(
                {v: o for v, o in zip(eqn.outvars, outs) if not isinstance(v, jcore.DropVar)}
            )
    return env


def propagate(
    jaxpr: jcore.Jaxpr, source: jcore.Var, static: dict, stop=frozenset(), index: dict | None = None
) -> Propagation:
    """Push `source` forward through element-wise and relabelling equations.

    Variables in `stop` get a map but are not pushed further. Only the equations that read a
    reached variable are visited (in program order), so a source that stays local costs little;
    pass `index = consumer_index(jaxpr)` when pushing many sources through one jaxpr.
    """
    index = consumer_index(jaxpr) if index is None else index
    size = int(np.prod(source.aval.shape, dtype=int))
    maps = {source: np.arange(size)}
    blocked = []
    queue, queued = [], set()

    def enqueue(var):
        for k, eqn in index.get(var, ()):
            if k not in queued:
                queued.add(k)
                heapq.heappush(queue, (k, eqn))  # each k once: eqns never compared

    enqueue(source)
    while queue:
        _, eqn = heapq.heappop(queue)
        if not any(
            not isinstance(v, jcore.Literal) and v in maps and v not in stop for v in eqn.invars
        ):
            continue
        out = _push(eqn, maps, static)
        if out is None:
            blocked.append(eqn)
            continue
        for v, m in zip(eqn.outvars, out):
            if not isinstance(v, jcore.DropVar) and np.any(m != NONE):
                maps[v] = m  # a value holding none of the source's elements is not followed
                if v not in stop:
                    enqueue(v)
    return Propagation(maps, blocked)


def consumer_index(jaxpr: jcore.Jaxpr) -> dict:
    """var -> ((position, equation), ...) of the equations that read it, in program order."""
    users: dict = {}
    for k, eqn in enumerate(jaxpr.eqns):
        for v in eqn.invars:
            if not isinstance(v, jcore.Literal):
                entries = users.setdefault(v, [])
                if not entries or entries[-1][0] != k:
                    entries.append((k, eqn))
    return users


def is_admissible(eqn, static) -> bool:
    """Whether positions survive `eqn`: element-wise, or a relabelling with static indices."""
    if is_etp_primitive(eqn.primitive):
        return False
    if is_elementwise_eqn(eqn):
        return True
    if eqn.primitive.name not in RELABEL:
        return False
    return all(
        _operand_role(eqn, i) != "index" or isinstance(v, jcore.Literal) or v in static
        for i, v in enumerate(eqn.invars)
    )


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


def relabel_table(eqn, static):
    """For each output of a relabelling equation: `((operand index, target), ...)`, `target[p]`
    the flat output position of element `p` of that operand (NONE / MANY); None when the
    positions are not static (dynamic indices) or the op cannot be replayed."""
    spec = []
    for i, v in enumerate(eqn.invars):
        role = _operand_role(eqn, i)
        if role == "index":
            value = v.val if isinstance(v, jcore.Literal) else static.get(v)
            if value is None:
                return None  # dynamic indices: positions are not known at compile time
            value = np.asarray(value)
            spec.append(("index", value.shape, value.dtype.str, value.tobytes()))
        else:
            spec.append((role, tuple(v.aval.shape), None, None))
    try:
        return _relabel_targets(eqn.primitive, _frozen(dict(eqn.params)), tuple(spec))
    except _Unhashable:
        return _replay(eqn.primitive, dict(eqn.params), tuple(spec))


def _push_relabel(eqn, maps, static):
    """Where the carried operands' elements land, from the op's (cached) relabelling table."""
    targets = relabel_table(eqn, static)
    if targets is None:
        return None
    results = []
    for per_operand in targets:
        merged = None
        for i, target in per_operand:
            v = eqn.invars[i]
            if isinstance(v, jcore.Literal) or v not in maps:
                continue
            src = maps[v]
            m = np.where(src >= 0, target[np.clip(src, 0, None)], src)
            merged = m if merged is None else merge(merged, m)
        results.append(merged)
    return results


class _Unhashable(Exception):
    """An equation parameter with no hashable stand-in: the op is replayed without the cache."""


def _frozen(value):
    """A hashable stand-in for equation parameters (tagged tuples for dicts, lists, arrays)."""
    if isinstance(value, dict):
        return ("dict", tuple((k, _frozen(v)) for k, v in sorted(value.items())))
    if type(value) in (list, tuple):  # not NamedTuples (GatherDimensionNumbers): kept whole
        return ("seq", tuple(_frozen(v) for v in value))
    if isinstance(value, np.ndarray):
        return ("array", value.shape, value.dtype.str, value.tobytes())
    try:
        hash(value)
    except TypeError:
        raise _Unhashable from None
    return ("value", value)


@functools.lru_cache(maxsize=8192)
def _relabel_targets(primitive, frozen_params, spec):
    """For each output of a relabelling op: `((operand index, target), ...)`, where `target[p]`
    is the flat output position element `p` of that data operand lands in (NONE / MANY).

    The op is replayed once on arrays of element ids (every data operand gets its own id range),
    so the table depends only on the op, its parameters and its operand shapes: cached, and
    shared by every source pushed through the same op.
    """
    return _replay(primitive, _thawed(frozen_params), spec)


def _thawed(frozen):
    kind, *rest = frozen
    if kind == "dict":
        return {k: _thawed(v) for k, v in rest[0]}
    if kind == "seq":
        return tuple(_thawed(v) for v in rest[0])
    if kind == "array":
        shape, dtype, data = rest
        return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape)
    return rest[0]


def _replay(primitive, params, spec):
    ids, offsets, offset = [], {}, 0
    for i, (role, shape, dtype, data) in enumerate(spec):
        if role == "fill":
            ids.append(np.int32(NONE))
        elif role == "index":
            ids.append(np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape))
        else:
            size = int(np.prod(shape, dtype=int))
            ids.append(np.arange(offset, offset + size, dtype=np.int32).reshape(shape))
            offsets[i] = (offset, size)
            offset += size
    params = dict(params)
    if primitive.name == "gather":
        params["fill_value"] = NONE
    outs = relabel_numpy.replay(primitive.name, params, ids)
    if outs is None:  # not covered by the NumPy versions: the JAX op itself (one compile)
        try:
            outs = primitive.bind(*[jnp.asarray(x) for x in ids], **params)
        except Exception:  # noqa: BLE001 - an op we cannot replay on ids is treated as mixing
            return None
        outs = list(outs) if primitive.multiple_results else [outs]
    tables = []
    for out_ids in outs:
        flat = np.asarray(out_ids).reshape(-1)
        per_operand = []
        for i, (start, size) in offsets.items():
            where = np.nonzero((flat >= start) & (flat < start + size))[0]
            local = flat[where] - start
            target = np.full(size, NONE)
            target[local] = where
            target[np.bincount(local, minlength=size) > 1] = MANY
            target.setflags(write=False)
            per_operand.append((i, target))
        tables.append(tuple(per_operand))
    return tuple(tables)


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
        if any(
            not isinstance(v, jcore.Literal) and v in seen and v not in stop for v in eqn.invars
        ):
            seen.update(v for v in eqn.outvars if not isinstance(v, jcore.DropVar))
    return seen


__all__ = [
    "NONE",
    "MANY",
    "Propagation",
    "merge",
    "propagate",
    "consumer_index",
    "relabel_table",
    "static_values",
    "consumers",
    "reachable",
    "is_admissible",
]
