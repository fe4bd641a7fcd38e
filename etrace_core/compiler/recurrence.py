"""Where a hidden group's recurrence leaves the per-unit Jacobian D (recurrent weights, mixing).

D holds, per unit, the derivative of h^t w.r.t. the same unit's h^{t-1} along element-wise
paths. A path from h^{t-1} to h^t through a position-mixing op (a recurrent weight, a norm, a
reduction) is not in D, so every trace of that group drops it: the gradients are approximate.
"""

from __future__ import annotations

from jax.extend import core as jcore

from .module_info import ModuleInfo
from .positions import propagate, reachable


def recurrence_notes(minfo: ModuleInfo, groups, made_at, static) -> dict[int, str]:
    """{group index: note} for groups whose h^t depends on h^{t-1} through a mixing op.

    `made_at[path]` is the variable where hidden state `path` is produced; paths are followed
    from every hidden input up to (not through) those variables.
    """
    jaxpr = minfo.jaxpr
    param_of = {v: p for p, v in minfo.param_invars.items()}
    stop = frozenset(made_at.values())
    made_of = {g.index: {made_at[p] for p in g.hidden_paths} for g in groups}
    found: dict[int, list] = {}
    for g in groups:
        for src in g.hidden_invars:
            for eqn in propagate(jaxpr, src, static, stop=stop).blocked:
                after = reachable(jaxpr, eqn.outvars, stop=stop)
                for h in groups:
                    if after & made_of[h.index]:
                        found.setdefault(h.index, [])
                        if _describe(eqn, param_of) not in found[h.index]:
                            found[h.index].append(_describe(eqn, param_of))
    return {
        i: (
            f"hidden group {i}'s recurrence also runs through {', '.join(ops)}, which the "
            "per-unit Jacobian D leaves out (recurrent weight or position-mixing op): the "
            "trace drops that path through time"
        )
        for i, ops in found.items()
    }


def _describe(eqn, param_of) -> str:
    weights = [
        param_of[v] for v in eqn.invars if not isinstance(v, jcore.Literal) and v in param_of
    ]
    return eqn.primitive.name + (f" (weight {weights[0]})" if weights else "")


__all__ = ["recurrence_notes"]
