"""One record per supported op: how it lowers, which argument is a weight, what it refuses."""
from __future__ import annotations

from typing import Callable, Mapping, NamedTuple, Optional


class OpRecord(NamedTuple):
    """How one ATen overload lowers to JAX.

    `fn(*args, **kwargs)` computes the op on JAX arrays. Where `weight` is an argument position
    and that argument is a torch parameter, `param_fn` (same signature) is used instead: it routes
    the parameter through an `etrace_core` ETP op so the online compiler traces it. `check(node)`
    returns why this particular use cannot be lowered (an error message), or None; it runs
    before any tracing.
    """

    fn: Callable
    weight: Optional[int] = None
    param_fn: Optional[Callable] = None
    check: Optional[Callable] = None


def plain(fns: Mapping) -> dict:
    """Records for ops with no weight argument and nothing to refuse."""
    return {target: OpRecord(fn) for target, fn in fns.items()}
