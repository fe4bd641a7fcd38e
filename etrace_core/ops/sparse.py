"""ETP sparse matmul ``y = x @ S(w) (+ b)``: ``w`` holds the stored (non-zero) values of a sparse
matrix with a fixed pattern, ``S`` places them in the dense ``(I, O)`` matrix.

It is the dense ``etp_matmul`` with ``S`` as its weight function, so the compiler and the
algorithms treat it like any traced dense weight: the trace lives in the dense ``(I, O)``
canonical space and ``io_to_params`` pulls the gradient back through ``S`` (a gather at the
pattern's positions), which is exact. The price is a trace the size of the dense matrix, not of
its ``nnz`` values.
"""

from __future__ import annotations

import brainunit as u
import jax.numpy as jnp
import numpy as np

from etrace_core.ops.elementwise import ElementFn
from etrace_core.ops.matmul import bind_matmul

__all__ = ["sparse_matmul", "SparsePattern", "pattern_of"]


class SparsePattern(ElementFn):
    """``w (nnz,) -> dense (I, O)``: ``fn(w)`` scattered (summed) at ``(rows, cols)``.

    Hashable by value (the pattern and ``fn``), so it can be a primitive parameter and equal
    patterns give equal equations.
    """

    __slots__ = ("rows", "cols", "shape", "elem_fn", "_key")

    def __init__(self, rows, cols, shape, elem_fn=None):
        self.rows = np.asarray(rows, dtype=np.int32)
        self.cols = np.asarray(cols, dtype=np.int32)
        self.shape = tuple(int(d) for d in shape)
        self.elem_fn = elem_fn
        self._key = (self.rows.tobytes(), self.cols.tobytes(), self.shape, id(elem_fn))
        super().__init__(self._dense)

    def _dense(self, w):
        v = w if self.elem_fn is None else self.elem_fn(w)
        return jnp.zeros(self.shape, v.dtype).at[self.rows, self.cols].add(v)

    def __eq__(self, other):
        return isinstance(other, SparsePattern) and other._key == self._key

    def __hash__(self):
        return hash(self._key)

    def __repr__(self):
        return f"sparse{self.shape}[nnz={self.rows.size}]"


def pattern_of(sparse_mat) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """``(rows, cols, shape)`` of the stored values of a brainunit/brainevent sparse matrix (in
    the order of its ``data``); CSR and CSC are read from their indices, other formats through
    ``with_data(1..nnz).todense()``."""
    for name in ("data", "shape", "with_data", "todense"):
        if not hasattr(sparse_mat, name):
            raise TypeError(
                "sparse_mat must be a sparse matrix with data, shape, with_data and todense "
                "(a brainevent.CSR/CSC or brainunit.sparse matrix), got "
                f"{type(sparse_mat).__name__!r}"
            )
    shape = tuple(int(d) for d in sparse_mat.shape)
    if len(shape) != 2:
        raise ValueError(f"sparse_matmul: the sparse matrix must be 2-D, got shape {shape}")
    nnz = int(np.size(u.get_mantissa(sparse_mat.data)))
    kind = type(sparse_mat).__name__.upper()
    if hasattr(sparse_mat, "indptr") and hasattr(sparse_mat, "indices") and kind in ("CSR", "CSC"):
        indptr = np.asarray(sparse_mat.indptr)
        major = np.repeat(np.arange(indptr.size - 1), np.diff(indptr))
        minor = np.asarray(sparse_mat.indices)
        rows, cols = (major, minor) if kind == "CSR" else (minor, major)
    else:
        if nnz >= 2**24:
            from etrace_core.compiler.errors import NotSupportedError  # (compiler imports ops)

            raise NotSupportedError(
                f"sparse_matmul: a {type(sparse_mat).__name__} with {nnz} stored values is "
                "only read through todense() up to 2**24 values; convert it to CSR"
            )
        data = u.get_mantissa(sparse_mat.data)
        ids = jnp.arange(1, nnz + 1).astype(data.dtype).reshape(np.shape(data))
        ids = np.asarray(u.get_mantissa(sparse_mat.with_data(ids).todense()))
        rows, cols = np.nonzero(ids)
        order = np.argsort(ids[rows, cols])
        rows, cols = rows[order], cols[order]
    if rows.size != nnz:
        raise ValueError(
            f"sparse_matmul: the pattern has {rows.size} positions for {nnz} stored values "
            "(repeated positions?); give a matrix with one value per position"
        )
    return rows, cols, shape


def sparse_matmul(x, weight, *, sparse_mat, bias=None, weight_fn=None, bias_fn=None):
    """``x @ sparse_mat.with_data(weight_fn(weight)) + bias``, with ``weight`` (the ``nnz``
    stored values, in ``sparse_mat.data``'s order) the trained, traced parameter.

    braintrace's signature. ``x`` is ``(..., I)`` (batched or not); ``bias`` is ``(O,)``.
    ``weight_fn`` acts element-wise on the stored values. ``bias_fn`` is not supported (apply
    it to the bias before the call: the bias then gets its exact gradient through autodiff).
    """
    if bias_fn is not None:
        from etrace_core.compiler.errors import NotSupportedError  # (compiler imports ops)

        raise NotSupportedError(
            "sparse_matmul(bias_fn=...) is not supported by etrace; pass bias=bias_fn(b)"
        )
    if weight_fn is not None and not callable(weight_fn):
        raise ValueError(f"sparse_matmul: weight_fn must be callable, got {weight_fn!r}")
    rows, cols, shape = pattern_of(sparse_mat)
    w_shape = tuple(np.shape(u.get_mantissa(weight)))
    if w_shape != (rows.size,):
        raise ValueError(
            f"sparse_matmul: weight must hold the {rows.size} stored values, shape "
            f"({rows.size},), got shape {w_shape}"
        )
    return bind_matmul(x, weight, bias, "io", SparsePattern(rows, cols, shape, weight_fn))
