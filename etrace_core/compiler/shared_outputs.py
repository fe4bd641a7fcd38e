"""Relations whose outputs reach the hidden states through one sum: they share dh/dy.

When the outputs of two ETP ops are only ever added together (``I = x @ W_in + s @ W_rec``),
the cotangent reaching each output is the cotangent of their sum, exactly: an ``add`` whose
operand has the output's shape passes the cotangent through unchanged. Their output-side
Jacobians ``df = dh/dy`` are then the same values, and so is everything an io-dim (ES-D-RTRL)
trace builds from them alone. This pass finds such sets; the algorithms keep one output-side
trace per set.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
from jax.extend import core as jcore

from etrace_core.ops import rule_for

SUM_PRIMITIVES = frozenset(["add", "add_any"])


def shared_output_sets(jaxpr, relations: Sequence) -> tuple[tuple[int, ...], ...]:
    """Sets (of >= 2 relation indices, ascending) whose outputs share their cotangent.

    Two relations share when their outputs, followed through single uses by same-shaped
    ``add`` operands, end at the same variable, and they reach the same hidden groups through
    the same unit maps with the same canonical output layout (so ``df`` is the same array).
    """
    uses: Counter = Counter()
    consumer = {}
    for eqn in jaxpr.eqns:
        for v in eqn.invars:
            if not isinstance(v, jcore.Literal):
                uses[v] += 1
                consumer[v] = eqn
    for v in jaxpr.outvars:
        if not isinstance(v, jcore.Literal):
            uses[v] += 1

    buckets: dict = {}
    for k, rel in enumerate(relations):
        buckets.setdefault(_sum_root(rel.y, uses, consumer), []).append(k)
    sets = []
    for members in buckets.values():
        while len(members) > 1:
            lead, rest = members[0], members[1:]
            same = [k for k in rest if _same_output_side(relations[lead], relations[k])]
            if same:
                sets.append((lead, *same))
            members = [k for k in rest if k not in same]
    return tuple(sorted(sets))


def _sum_root(v, uses, consumer):
    """The variable `v`'s cotangent equals: follow single uses as a same-shaped add operand."""
    while uses[v] == 1 and v in consumer:
        eqn = consumer[v]
        out = eqn.outvars[0]
        if eqn.primitive.name not in SUM_PRIMITIVES or not _same_aval(v, out):
            break
        v = out
    return v


def _same_aval(a, b) -> bool:
    return tuple(a.aval.shape) == tuple(b.aval.shape) and a.aval.dtype == b.aval.dtype


def _same_output_side(a, b) -> bool:
    """Same primitive, output aval, hidden groups, unit maps and canonical output layout."""
    if a.primitive is not b.primitive or not _same_aval(a.y, b.y):
        return False
    if tuple(g.index for g in a.hidden_groups) != tuple(g.index for g in b.hidden_groups):
        return False
    if not all(np.array_equal(ma, mb) for ma, mb in zip(a.y_to_hidden, b.y_to_hidden)):
        return False
    rule = rule_for(a.primitive)
    probe = np.arange(int(np.prod(a.y.aval.shape)), dtype=np.float64).reshape(a.y.aval.shape)
    ya, yb = np.asarray(rule.y_canon(a.params, probe)), np.asarray(rule.y_canon(b.params, probe))
    return ya.shape == yb.shape and bool(np.array_equal(ya, yb))


__all__ = ["shared_output_sets"]
