"""Targets of the named losses, validated as torch validates them (before any loss is computed).

Used by `OnlineLearner` (JAX losses) and `bptt_gradients` (torch losses), so both refuse the same
targets with the same message instead of a silently wrong loss (a JAX gather wraps or clamps an
out-of-range label; a float label would be truncated to a class).

- 'cross_entropy': class indices of an integer dtype, shaped like the output without its class
  axis, each in [0, C) or `IGNORE_INDEX` (-100); or class probabilities (floating point)
  shaped like the output, as `torch.nn.functional.cross_entropy` accepts.
- 'mse': shaped like the output; a shape that only broadcasts to it warns with torch's warning,
  one that does not broadcast is an error.
"""

from __future__ import annotations

import warnings

import numpy as np

from etrace_bridge.errors import TargetError
from etrace_bridge.losses import IGNORE_INDEX

__all__ = ["check_targets", "TargetError"]


def _size(shape) -> str:
    return f"torch.Size([{', '.join(str(int(d)) for d in shape)}])"


def check_targets(loss, output_shape, target, *, leading: int = 0) -> None:
    """Refuse (or, for broadcasting MSE targets, warn about) `target` for `loss(output, target)`.

    `output_shape` is one step's output shape; `target` may carry `leading` extra axes in front
    (the time axis of a sequence). Callables (user losses) are not checked here.
    """
    if not isinstance(loss, str) or target is None or output_shape is None:
        return
    shape, out = tuple(np.shape(target)[leading:]), tuple(output_shape)
    if loss == "cross_entropy":
        _check_classes(out, np.asarray(target), shape)
    elif loss == "mse":
        _check_mse(out, shape)


def _check_classes(out: tuple, target: np.ndarray, shape: tuple) -> None:
    if not out:
        raise TargetError("cross_entropy needs outputs with a class axis (B, C), got a scalar")
    if np.issubdtype(target.dtype, np.floating):
        if shape == out:
            return  # class probabilities, as torch accepts them
        raise TargetError(
            f"cross_entropy: class-index targets must have an integer dtype (torch.long), got "
            f"{target.dtype} of shape {shape}; a float label would be silently truncated to a "
            f"class. Give integer labels shaped {out[:-1]}, or class probabilities shaped like "
            f"the output {out}"
        )
    if not np.issubdtype(target.dtype, np.integer):
        raise TargetError(
            f"cross_entropy: targets must be integer class indices or float class "
            f"probabilities, got {target.dtype}"
        )
    if shape != out[:-1]:
        raise TargetError(
            f"cross_entropy: expected class-index targets of shape {out[:-1]} for outputs of "
            f"shape {out} (C = {out[-1]} classes on the last axis), got {shape}"
        )
    classes = out[-1]
    bad = (target != IGNORE_INDEX) & ((target < 0) | (target >= classes))
    if bad.any():
        value = int(target[bad].flat[0])
        raise IndexError(
            f"Target {value} is out of bounds: cross_entropy over {classes} classes "
            f"takes labels 0..{classes - 1}, or {IGNORE_INDEX} (ignore_index) for "
            "an entry without loss"
        )


def _check_mse(out: tuple, shape: tuple) -> None:
    if shape == out:
        return
    try:
        np.broadcast_shapes(shape, out)
    except ValueError:
        raise TargetError(
            f"mse: target shape {shape} does not match (or broadcast to) the output shape {out}"
        ) from None
    warnings.warn(
        f"Using a target size ({_size(shape)}) that is different to the input size "
        f"({_size(out)}). This will likely lead to incorrect results due to "
        "broadcasting. Please ensure they have the same size.",
        UserWarning,
        stacklevel=4,
    )
