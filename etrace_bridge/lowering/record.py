"""One record per supported op: how it lowers, which argument is a weight, what it refuses."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple, Optional


class OpRecord(NamedTuple):
    """How one ATen overload lowers to JAX.

    `fn(*args, **kwargs)` computes the op on JAX arrays. `weight` is the argument position (or
    positions, tried in order) where a torch parameter may come in, itself or through a chain
    of view ops (`param_views.ParamView`). For such an argument, `param_fn(view, position)` is
    asked once, at lowering time, for a function with `fn`'s signature that takes the
    parameter ITSELF at `position` and routes it through an `etrace_core` ETP op, so the online
    compiler traces it; it returns None where it cannot (then `fn` runs on the view).
    `check(node)` returns why this particular use cannot be lowered (an error message), or
    None; it runs before any tracing.
    """

    fn: Callable
    weight: Optional[int | tuple[int, ...]] = None
    param_fn: Optional[Callable] = None
    check: Optional[Callable] = None


def plain(fns: Mapping) -> dict:
    """Records for ops with no weight argument and nothing to refuse."""
    return {target: OpRecord(fn) for target, fn in fns.items()}


def weight_positions(record: OpRecord) -> tuple[int, ...]:
    """The argument positions where `record` may take a parameter."""
    if record.weight is None or record.param_fn is None:
        return ()
    return (record.weight,) if isinstance(record.weight, int) else tuple(record.weight)
