"""Per-call checks of a learner's step: input shapes (a hint naming the actual mismatch) and
non-finite values (inputs, loss, gradients, eligibility traces).

Non-finite values warn once per learner; with `check_finite=True` they raise
`FloatingPointError` with a plain message on the Python side, after the compiled call (the
learner then undoes the step), instead of an error raised from inside the compiled program.
"""
from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

__all__ = ["input_shape_error", "FiniteGuard"]


def input_shape_error(compiled: list[tuple], given: list[tuple], *, sequence: bool) -> str | None:
    """Why inputs shaped `given` (with a leading time axis) do not fit the compiled step shapes
    `compiled`, or None when they fit. `sequence` is False for `step()` (no time axis given)."""
    call = "run() takes a sequence (T, B, ...)" if sequence else "step() takes one step (B, ...)"
    if len(given) != len(compiled):
        return (f"the step takes {len(compiled)} input tensor(s) but got {len(given)}; "
                "pass the inputs the model was converted with")
    for i, (want, shape) in enumerate(zip(compiled, given)):
        got = shape[1:]
        shown = shape if sequence else shape[1:]
        if len(got) != len(want):
            return (f"input {i} has shape {shown} but the model was converted for one step of "
                    f"rank {len(want)} shaped {want}: {call}")
        if want and got[0] != want[0] and got[1:] == want[1:]:
            return (f"input {i} has batch size {got[0]} but the learner was compiled for batch "
                    f"size {want[0]}; for another batch size call reset_state({got[0]}) first")
        if got[1:] != want[1:]:
            return (f"input {i} has per-sample shape {got[1:]} but the model was converted for "
                    f"{want[1:]} (step shape {want}, got {got}); convert with example inputs of "
                    "the shape you train on")
        if got != want:
            return f"input {i} has shape {got}; the learner was compiled for {want}"
    return None


@jax.jit
def _finite(tree):
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _named(tree_by_name: dict) -> list[str]:
    return [name for name, v in tree_by_name.items() if not bool(_finite(v))]


class FiniteGuard:
    """Warns once (or raises, `strict`) when a step saw or made a non-finite value."""

    def __init__(self, strict: bool):
        self.strict = strict
        self.warned = False

    def check(self, inputs, loss, grads: dict, traces) -> str | None:
        """A message naming the non-finite parts, or None. Traces only checked when strict."""
        parts = (inputs, loss, grads, traces) if self.strict else (inputs, loss, grads)
        if self.warned and not self.strict or bool(_finite(parts)):
            return None
        found = []
        if not bool(_finite(inputs)):
            found.append("the step's inputs")
        if not bool(_finite(loss)):
            found.append("the loss")
        bad = _named({".".join(p): g for p, g in grads.items()})
        if bad:
            found.append("the gradients of " + ", ".join(f"`{n}`" for n in bad))
        if self.strict and not bool(_finite(traces)):
            found.append("the eligibility traces")
        return ("non-finite values (inf or nan) in " + "; ".join(found or ["the step"])
                + ". Check the inputs for inf/nan, lower the learning rate, or clip gradients")

    def report(self, message: str) -> None:
        """Raise (strict) or warn once per learner."""
        if self.strict:
            raise FloatingPointError(message + " (the step was undone: states, traces and "
                                     ".grad are as before it)")
        self.warned = True
        warnings.warn(message + " (warned once per learner; check_finite=True raises instead)",
                      RuntimeWarning, stacklevel=4)
