"""Named losses, in torch and in JAX with the same semantics (one definition of each name).

`IGNORE_INDEX` (-100, torch's convention) marks class targets that carry no loss, e.g. every
step but the last of a sequence-classification task.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F

__all__ = ["IGNORE_INDEX", "LOSS_NAMES", "resolve_loss"]

IGNORE_INDEX = -100
LOSS_NAMES = ("mse", "cross_entropy")


def _torch_mse(output, target):
    return F.mse_loss(output, target.to(output.dtype))


def _torch_cross_entropy(output, target):
    logits = output.reshape(-1, output.shape[-1])
    if target.is_floating_point():  # class probabilities shaped like the output
        return F.cross_entropy(logits, target.reshape(logits.shape).to(logits.dtype))
    labels = target.reshape(-1).long()
    valid = labels != IGNORE_INDEX
    per_item = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
    return per_item.sum() / valid.sum().clamp(min=1).to(per_item.dtype)


def _jax_mse(output, target):
    import jax.numpy as jnp

    return jnp.mean((output - target.astype(output.dtype)) ** 2)


def _jax_cross_entropy(output, target):
    import jax
    import jax.numpy as jnp

    logits = output.reshape(-1, output.shape[-1])
    if jnp.issubdtype(target.dtype, jnp.floating):  # class probabilities shaped like the output
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.sum(target.reshape(logits.shape).astype(logp.dtype) * logp, -1))
    labels = target.reshape(-1).astype(jnp.int32)
    valid = labels != IGNORE_INDEX
    safe = jnp.where(valid, labels, 0)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, safe[:, None], axis=-1)[:, 0]
    total = jnp.sum(jnp.where(valid, nll, 0.0))
    return total / jnp.maximum(jnp.sum(valid), 1).astype(total.dtype)


_LOSSES = {
    "torch": {"mse": _torch_mse, "cross_entropy": _torch_cross_entropy},
    "jax": {"mse": _jax_mse, "cross_entropy": _jax_cross_entropy},
}


def resolve_loss(loss: str | Callable, *, backend: str = "torch") -> Callable:
    """Return `loss(output_t, target_t) -> scalar` for a name or pass a callable through.

    'mse': mean squared error over all elements. 'cross_entropy': `output` logits
    `(B, C)` (or `(B, ..., C)`), integer targets `(B,)` (or `(B, ...)`); the mean over
    entries whose target is not IGNORE_INDEX (-100), and 0 when a step has none, so
    per-step losses on targets padded with -100 need no special casing; or float class
    probabilities shaped like the output (the mean over entries, as torch). Targets are
    validated by `etrace_bridge.targets.check_targets`.
    backend='jax' returns the JAX implementation with the same semantics.
    """
    if backend not in _LOSSES:
        raise ValueError(f"unknown backend {backend!r}; expected 'torch' or 'jax'")
    if callable(loss):
        return loss
    if isinstance(loss, str) and loss in _LOSSES[backend]:
        return _LOSSES[backend][loss]
    raise ValueError(
        f"unknown loss {loss!r}; expected a callable or one of {', '.join(LOSS_NAMES)}"
    )
