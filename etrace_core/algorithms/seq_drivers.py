"""braintrace's sequence drivers ``etrace_grad`` / ``etrace_evolve`` on a learner.

Both scan a user step over time-major sequences. ``etrace_grad`` sums, over the steps, the
gradient of ``mask[t] * step_fn(*seq[t])`` w.r.t. the learner's parameters (each step's
gradient is the online gradient of that step, since ``step_fn`` calls the learner once), then
divides by ``max(sum(mask), 1)`` for ``reduction='mean'``. One step at a time only: windows
(``chunk_size >= 2``) are etrace's ``run_online(..., window=k)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import brainstate
import jax
import jax.numpy as jnp

from etrace_core.compiler.errors import NotSupportedError
from etrace_core.executor.data import MultiStepData, SingleStepData

__all__ = ["SequenceDriverMixin"]

_REDUCTIONS = ("mean", "sum")
_LOSS_OUTPUTS = ("per_step", "masked", "scalar")


def _length(sequences) -> int:
    if not sequences:
        raise ValueError("give at least one time-major sequence (leading axis T)")
    for s in sequences:
        if isinstance(s, (SingleStepData, MultiStepData)):
            raise TypeError(
                "pass the sequences' arrays, not SingleStepData/MultiStepData: wrap inside "
                "step_fn instead"
            )
    lengths = {int(jnp.shape(leaf)[0]) for leaf in jax.tree.leaves(sequences)}
    if len(lengths) != 1 or 0 in lengths:
        raise ValueError(f"the sequences must share one non-zero leading length T, got {lengths}")
    return lengths.pop()


def _one_step_only(chunk_size) -> None:
    if chunk_size is None or (isinstance(chunk_size, int) and chunk_size == 1):
        return
    raise NotSupportedError(
        f"chunk_size={chunk_size!r}: windows are not implemented in etrace's etrace_grad / "
        "etrace_evolve; use etrace_core.run_online(algo, loss_fn, xs, ys, window=k) with "
        "vjp_method='multi-step', or chunk_size=None"
    )


class SequenceDriverMixin:
    """``etrace_grad`` and ``etrace_evolve`` for a learner callable one step at a time that
    has ``param_states`` (an ETraceAlgorithm, or its per-sample ``ETraceVmap``)."""

    def etrace_grad(
        self,
        *sequences: Any,
        step_fn: Callable,
        mask: Any = None,
        chunk_size: Optional[int] = None,
        weights: Any = None,
        reduction: str = "mean",
        loss_output: str = "per_step",
        has_aux: bool = False,
        return_value: bool = False,
    ) -> Any:
        """Online gradient of ``sum_t mask[t] * step_fn(*seq[t])`` (``/ max(sum mask, 1)`` for
        ``reduction='mean'``) w.r.t. `weights` (default: the learner's parameters).

        Returns ``grads``, ``(grads, losses)``, ``(grads, aux)`` or ``(grads, losses, aux)``;
        ``losses`` per ``loss_output``: the (T,) losses, the masked ones, or the objective.
        """
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        if loss_output not in _LOSS_OUTPUTS:
            raise ValueError(f"loss_output must be one of {_LOSS_OUTPUTS}, got {loss_output!r}")
        _one_step_only(chunk_size)
        length = _length(sequences)
        dtype = jnp.result_type(float)
        mask = jnp.ones((length,), dtype) if mask is None else jnp.asarray(mask, dtype)
        if mask.shape != (length,):
            raise ValueError(f"mask must have shape ({length},), got {mask.shape}")
        weights = self.param_states if weights is None else weights

        def objective(slices, w):
            result = step_fn(*slices)
            loss, aux = result if has_aux else (result, None)
            if jnp.ndim(loss) != 0:
                raise ValueError(
                    f"step_fn must return a scalar loss, got shape {jnp.shape(loss)}: reduce "
                    "over the batch and feature axes inside step_fn"
                )
            return w * loss, (loss, aux)

        grad_fn = brainstate.transform.grad(objective, weights, has_aux=True)

        def body(total, xs_t):
            grads, (loss, aux) = grad_fn(*xs_t)
            return jax.tree.map(jnp.add, total, grads), (loss, aux)

        zeros = jax.tree.map(jnp.zeros_like, {k: v.value for k, v in weights.items()})
        total, (losses, aux) = brainstate.transform.scan(body, zeros, (sequences, mask))
        denom = jnp.maximum(jnp.sum(mask), 1.0)
        if reduction == "mean":
            total = jax.tree.map(lambda g: g / denom, total)
        if not return_value:
            return (total, aux) if has_aux else total
        masked = losses * mask
        if loss_output == "per_step":
            value = losses
        elif loss_output == "masked":
            value = masked
        else:
            value = jnp.sum(masked) / (denom if reduction == "mean" else 1.0)
        return (total, value, aux) if has_aux else (total, value)

    def etrace_evolve(
        self,
        *sequences: Any,
        step_fn: Optional[Callable] = None,
        chunk_size: Optional[int] = None,
        return_outputs: bool = False,
    ) -> Any:
        """Advance the states and traces over the sequences (``step_fn(*seq[t])``, default
        the learner itself), no gradient; the stacked outputs if `return_outputs`."""
        _one_step_only(chunk_size)
        _length(sequences)
        call = self if step_fn is None else step_fn

        def body(*slices):
            out = call(*slices)
            return out if return_outputs else None

        outs = brainstate.transform.for_loop(body, *sequences)
        return outs if return_outputs else None
