"""Per-call checks of a learner's step: input shapes (a hint naming the actual mismatch) and
non-finite values (inputs, loss, gradients, eligibility traces).

Non-finite values warn once per learner; with `check_finite=True` they raise
`FloatingPointError` with a plain message on the Python side, after the compiled call (the
learner then undoes the step), instead of an error raised from inside the compiled program.
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import torch

__all__ = ["input_shape_error", "FiniteGuard"]


def input_shape_error(compiled: list[tuple], given: list[tuple], *, sequence: bool) -> str | None:
    """Why inputs shaped `given` (with a leading time axis) do not fit the compiled step shapes
    `compiled`, or None when they fit. `sequence` is False for `step()` (no time axis given)."""
    call = "run() takes a sequence (T, B, ...)" if sequence else "step() takes one step (B, ...)"
    if len(given) != len(compiled):
        return (
            f"the step takes {len(compiled)} input tensor(s) but got {len(given)}; "
            "pass the inputs the model was converted with"
        )
    for i, (want, shape) in enumerate(zip(compiled, given)):
        got = shape[1:]
        shown = shape if sequence else shape[1:]
        if len(got) != len(want):
            return (
                f"input {i} has shape {shown} but the model was converted for one step of "
                f"rank {len(want)} shaped {want}: {call}"
            )
        if want and got[0] != want[0] and got[1:] == want[1:]:
            return (
                f"input {i} has batch size {got[0]} but the learner was compiled for batch "
                f"size {want[0]}; for another batch size call reset_state({got[0]}) first"
            )
        if got[1:] != want[1:]:
            return (
                f"input {i} has per-sample shape {got[1:]} but the model was converted for "
                f"{want[1:]} (step shape {want}, got {got}); convert with example inputs of "
                "the shape you train on"
            )
        if got != want:
            return f"input {i} has shape {got}; the learner was compiled for {want}"
    return None


@jax.jit
def _finite(tree):
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _floats(tensors) -> list[torch.Tensor]:
    return [t for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _sum(t: torch.Tensor) -> float:
    """The sum of `t`, in float32 at least (a sum in float32 costs a third of one in float64)."""
    return float(t.sum() if t.dtype in _WIDE else t.sum(dtype=torch.float32))


_WIDE = (torch.float32, torch.float64)


def _all_finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


class FiniteGuard:
    """Warns once (or raises, `strict`) when a step saw or made a non-finite value."""

    def __init__(self, strict: bool):
        self.strict = strict
        self.warned = False

    def check(self, inputs, loss: torch.Tensor, grads: dict, etrace) -> str | None:
        """A message naming the non-finite parts, or None. `inputs`: torch tensors; `grads`:
        `{path: torch gradient}`; `etrace` (JAX traces) is only checked when strict."""
        if self.warned and not self.strict:
            return None
        inputs = _floats(inputs)
        # fast path: one sum per tensor (inf/nan propagate; a finite sum that overflows only
        # costs the exact check below)
        tensors = _floats([loss, *inputs, *grads.values()])
        sums_ok = math.isfinite(sum(_sum(t) for t in tensors))
        traces_ok = not self.strict or bool(_finite(etrace))
        if sums_ok and traces_ok:
            return None
        found = []
        if not all(_all_finite(t) for t in inputs):
            found.append("the step's inputs")
        if not _all_finite(loss):
            found.append("the loss")
        bad = [".".join(p) for p, g in grads.items() if not _all_finite(g)]
        if bad:
            found.append("the gradients of " + ", ".join(f"`{n}`" for n in bad))
        if not traces_ok:
            found.append("the eligibility traces")
        if not found:
            return None
        return (
            "non-finite values (inf or nan) in "
            + "; ".join(found)
            + ". Check the inputs for inf/nan, lower the learning rate, or clip gradients"
        )

    def report(self, message: str) -> None:
        """Raise (strict) or warn once per learner."""
        if self.strict:
            raise FloatingPointError(
                message + " (the step was undone: states, traces and .grad are as before it)"
            )
        self.warned = True
        warnings.warn(
            message + " (warned once per learner; check_finite=True raises instead)",
            RuntimeWarning,
            stacklevel=4,
        )
