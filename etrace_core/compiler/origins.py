"""Origin maps: for every element of a variable, the one element of a source it depends on.

The inverse view of `positions`: an origin map of a variable `v` w.r.t. a source `s` is an int
array shaped like `v`; entry `q` is the flat position of the single element of `s` that element
`q` of `v` depends on, `NONE` if it depends on no element of `s`, or `MANY` if it may depend on
several. Element-wise ops merge their operands' origins position by position, relabelling ops
(and broadcasts) move origins with the elements, any other op marks its outputs `MANY`.
A parameter whose origin map at a hidden state has no `MANY` acts element-wise: each hidden
element depends on one parameter element, so its trace needs one number per hidden element.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from etrace_core.ops import etp_elemwise_p, etp_matmul_p, is_etp_primitive

from . import relabel_numpy
from .jaxpr_tools import RELABEL, is_elementwise_eqn
from .positions import MANY, NONE, _operand_role


class Origins(NamedTuple):
    maps: dict[jcore.Var, np.ndarray]  # var -> origin map (shaped like the var)
    mixers: list[jcore.JaxprEqn]  # eqns that made MANY out of single origins


def merge_origins(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Origins of an element depending on both operands' elements."""
    out = np.where(a == NONE, b, a)
    clash = (a != NONE) & (b != NONE) & (a != b)
    return np.where(clash, MANY, out)


def origins(jaxpr: jcore.Jaxpr, source: jcore.Var, static: dict, stop=frozenset()) -> Origins:
    """Push the origins of `source`'s elements forward; vars in `stop` are not pushed further."""
    shape = tuple(source.aval.shape)
    maps = {source: np.arange(int(np.prod(shape, dtype=int))).reshape(shape)}
    mixers = []
    for eqn in jaxpr.eqns:
        carried = [
            v
            for v in eqn.invars
            if not isinstance(v, jcore.Literal) and v in maps and v not in stop
        ]
        if not carried:
            continue
        outs = _push(eqn, maps, stop, static)
        if outs is None:
            outs = [np.full(_shape(v), MANY) for v in eqn.outvars]
            if not any(np.any(maps[v] == MANY) for v in carried):
                mixers.append(eqn)
        for v, m in zip(eqn.outvars, outs):
            if not isinstance(v, jcore.DropVar) and np.any(m != NONE):
                maps[v] = m
    return Origins(maps, mixers)


def _shape(v):
    return tuple(getattr(v.aval, "shape", ()))


def _get(v, maps, stop):
    if isinstance(v, jcore.Literal) or v not in maps or v in stop:
        return np.full(_shape(v), NONE)
    return maps[v]


def _push(eqn, maps, stop, static):
    prim = eqn.primitive
    if prim is etp_elemwise_p:
        out = _shape(eqn.outvars[0])
        return [np.broadcast_to(_get(eqn.invars[0], maps, stop), out)]
    if prim is etp_matmul_p:
        x, w = eqn.invars[0], eqn.invars[1]
        if any(np.any(_get(v, maps, stop) != NONE) for v in (x, w)):
            return None
        b = _get(eqn.invars[2], maps, stop)  # only the bias carries the source: y = c + b
        return [np.broadcast_to(b.reshape(-1), _shape(eqn.outvars[0]))]  # (flattened bias)
    if is_etp_primitive(prim):
        return None
    if is_elementwise_eqn(eqn):
        results = []
        for outvar in eqn.outvars:
            shape, merged = _shape(outvar), np.full(_shape(outvar), NONE)
            for v in eqn.invars:
                m = _get(v, maps, stop)
                if m.shape != shape:  # rank-0 or size-1 axes spread over the output
                    try:
                        m = np.broadcast_to(m, shape)
                    except ValueError:
                        return None
                merged = merge_origins(merged, m)
            results.append(merged)
        return results
    if prim.name in RELABEL:
        return _replay(eqn, maps, stop, static)
    return None


def _replay(eqn, maps, stop, static):
    """Run the relabelling op on the origin arrays themselves."""
    operands = []
    for i, v in enumerate(eqn.invars):
        role = _operand_role(eqn, i)
        if role == "fill":
            operands.append(np.int32(NONE))
        elif role == "index":
            value = v.val if isinstance(v, jcore.Literal) else static.get(v)
            if value is None:
                return None
            operands.append(value)
        else:
            operands.append(np.asarray(_get(v, maps, stop), np.int32))
    params = dict(eqn.params)
    if eqn.primitive.name == "gather":
        params["fill_value"] = NONE
    outs = relabel_numpy.replay(eqn.primitive.name, params, operands)
    if outs is not None:
        return outs
    try:  # not covered by the NumPy versions: the JAX op itself (one compile)
        outs = eqn.primitive.bind(*[jnp.asarray(x) for x in operands], **params)
    except Exception:  # noqa: BLE001 - an op we cannot replay on origins is treated as mixing
        return None
    outs = list(outs) if eqn.primitive.multiple_results else [outs]
    return [np.asarray(o) for o in outs]


__all__ = ["Origins", "origins", "merge_origins"]
