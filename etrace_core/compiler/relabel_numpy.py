"""NumPy versions of the common relabelling ops, for replaying them on arrays of element ids.

The compiler learns where elements go through slices, reshapes, transposes, broadcasts and
concatenations by replaying each op on arrays of ids (`positions`, `origins`). Replaying through
JAX compiles one XLA program per op, parameters and shapes (tens of milliseconds each on CPU, the
larger part of `compile_graph` for a small model); these NumPy equivalents do the same index
arithmetic without compiling. An op, parameter or operand they do not cover returns None, and
the caller replays it through JAX as before. Each follows the primitive's documented semantics
(`dynamic_slice` clamps its start indices into range, as `lax.dynamic_slice` does);
tests/core/test_relabel_numpy.py checks them against the JAX primitives.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["replay"]


def replay(name: str, params: dict, operands: Sequence[np.ndarray]) -> list[np.ndarray] | None:
    """The outputs of primitive `name` on NumPy `operands`, or None when not covered here."""
    fn = _OPS.get(name)
    if fn is None:
        return None
    try:
        out = fn(params, [np.asarray(x) for x in operands])
    except _NotCovered:
        return None
    return out if isinstance(out, list) else [out]


class _NotCovered(Exception):
    """A parameter combination these versions leave to JAX."""


def _only(params: dict, known: set[str]) -> None:
    """Refuse parameters that change the result and are not handled here (e.g. a future one)."""
    for k, v in params.items():
        if k not in known and v is not None:
            raise _NotCovered(k)


def _slice(params, ops):
    _only(params, {"start_indices", "limit_indices", "strides"})
    (x,) = ops
    strides = params.get("strides") or (1,) * x.ndim
    index = tuple(
        slice(int(s), int(e), int(st))
        for s, e, st in zip(params["start_indices"], params["limit_indices"], strides)
    )
    return x[index]


def _dynamic_slice(params, ops):
    _only(params, {"slice_sizes"})
    x, *starts = ops
    sizes = tuple(int(s) for s in params["slice_sizes"])
    if len(starts) != x.ndim or any(np.ndim(s) != 0 for s in starts):
        raise _NotCovered("start indices")
    index = []
    for start, size, dim in zip(starts, sizes, x.shape):
        begin = min(max(int(start), 0), dim - size)  # clamped into range, as lax.dynamic_slice
        index.append(slice(begin, begin + size))
    return x[tuple(index)]


def _reshape(params, ops):
    _only(params, {"new_sizes", "dimensions", "sharding"})
    if params.get("dimensions") is not None:
        raise _NotCovered("dimensions")
    (x,) = ops
    return x.reshape(tuple(int(s) for s in params["new_sizes"]))


def _transpose(params, ops):
    _only(params, {"permutation"})
    (x,) = ops
    return np.transpose(x, tuple(int(p) for p in params["permutation"]))


def _squeeze(params, ops):
    _only(params, {"dimensions"})
    (x,) = ops
    return np.squeeze(x, axis=tuple(int(d) for d in params["dimensions"]))


def _broadcast_in_dim(params, ops):
    _only(params, {"shape", "broadcast_dimensions", "sharding"})
    (x,) = ops
    shape = tuple(int(s) for s in params["shape"])
    dims = tuple(int(d) for d in params["broadcast_dimensions"])
    expanded = [1] * len(shape)
    for axis, d in enumerate(dims):
        expanded[d] = x.shape[axis]
    return np.broadcast_to(x.reshape(expanded), shape).copy()


def _concatenate(params, ops):
    _only(params, {"dimension"})
    return np.concatenate(ops, axis=int(params["dimension"]))


def _rev(params, ops):
    _only(params, {"dimensions"})
    (x,) = ops
    return np.flip(x, axis=tuple(int(d) for d in params["dimensions"])).copy()


def _split(params, ops):
    _only(params, {"sizes", "axis"})
    (x,) = ops
    bounds = np.cumsum([int(s) for s in params["sizes"]])[:-1]
    return list(np.split(x, bounds, axis=int(params["axis"])))


_OPS: dict[str, Callable] = {
    "slice": _slice,
    "dynamic_slice": _dynamic_slice,
    "reshape": _reshape,
    "transpose": _transpose,
    "squeeze": _squeeze,
    "broadcast_in_dim": _broadcast_in_dim,
    "concatenate": _concatenate,
    "rev": _rev,
    "split": _split,
}
