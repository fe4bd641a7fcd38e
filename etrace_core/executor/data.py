"""Input markers: one time step, or k time steps stacked on a leading axis."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax


class SingleStepData(NamedTuple):
    """An input for one time step (also what unmarked inputs are)."""

    data: Any


class MultiStepData(NamedTuple):
    """An input for k time steps, stacked on the leading axis."""

    data: Any


def is_multi_step(args) -> bool:
    return any(isinstance(a, MultiStepData) for a in args)


def unwrap(args) -> tuple:
    return tuple(a.data if isinstance(a, (SingleStepData, MultiStepData)) else a for a in args)


def num_steps(args) -> int:
    lengths = {jax.tree.leaves(a.data)[0].shape[0] for a in args if isinstance(a, MultiStepData)}
    if len(lengths) != 1:
        raise ValueError(
            f"MultiStepData inputs must share the number of steps, got {sorted(lengths)}"
        )
    return lengths.pop()


def step_slice(args, t) -> tuple:
    """The inputs of step `t` (MultiStepData indexed, everything else as is)."""
    return tuple(
        jax.tree.map(lambda v: v[t], a.data)
        if isinstance(a, MultiStepData)
        else (a.data if isinstance(a, SingleStepData) else a)
        for a in args
    )


def single_step_example(args) -> tuple:
    """The inputs of the first step, for compiling the one-step graph."""
    return step_slice(args, 0) if is_multi_step(args) else unwrap(args)


def split_for_scan(args):
    """(per-step xs, a function rebuilding one step's args from a slice of xs)."""
    seq = [a.data for a in args if isinstance(a, MultiStepData)]
    kinds = [isinstance(a, MultiStepData) for a in args]
    fixed = [
        None if k else (a.data if isinstance(a, SingleStepData) else a) for a, k in zip(args, kinds)
    ]

    def rebuild(xs_t):
        it = iter(xs_t)
        return tuple(next(it) if k else f for k, f in zip(kinds, fixed))

    return seq, rebuild
