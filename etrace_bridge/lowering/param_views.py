"""Views of parameters, and matmuls that use a parameter through such a view.

torch writes one matmul many ways (`x @ W.T`, `torch.matmul`, `F.linear`, `einsum`, `addmm`,
`bmm`, the parameter on either side, a slice of it): after export the graph shows the
parameter placeholder, a chain of view ops (`t`, `permute`, `view`, `slice`, `unsqueeze`,
`expand`, ...) and then `mm`/`bmm`/`linear`/`addmm`. `find_param_views` follows those chains
once, before tracing, by running the view ops on an index tensor: each view is known as the
flat parameter element at each of its positions. `matrix_use` then recognises a view that is a
2-D parameter used as a matrix (transposed or not, rows/columns selected, broadcast over a
batch of matmuls), so the op can run as ONE `etrace_core.ops.matmul` on the parameter itself
(inputs scattered into the selected rows, outputs gathered from the selected columns): the
online compiler then traces the parameter like any `Linear` weight.
"""

from __future__ import annotations

import operator
from typing import NamedTuple, Optional

import jax.numpy as jnp
import numpy as np
import torch

from etrace_core import ops as etp

__all__ = ["ParamView", "MatrixUse", "find_param_views", "matrix_use"]

aten = torch.ops.aten

# Ops that only move or select a tensor's elements (or copy them unchanged).
VIEW_OPS = frozenset(
    {
        aten.t.default,
        aten.permute.default,
        aten.transpose.int,
        aten.view.default,
        aten._unsafe_view.default,
        aten.reshape.default,
        aten.slice.Tensor,
        aten.select.int,
        aten.narrow.default,
        aten.unsqueeze.default,
        aten.squeeze.default,
        aten.squeeze.dim,
        aten.squeeze.dims,
        aten.expand.default,
        aten.clone.default,
        aten.alias.default,
        aten.detach.default,
        aten.lift_fresh_copy.default,
        aten.split.Tensor,
        aten.split_with_sizes.default,
        aten.chunk.default,
        aten.unbind.int,
    }
)


class ParamView(NamedTuple):
    """A graph value that is a view of the parameter placeholder `param`.

    `index` has the view's shape; each entry is the flat index of the parameter element there.
    """

    param: str
    index: np.ndarray
    param_shape: tuple


class MatrixUse(NamedTuple):
    """A 2-D parameter P used as the matrix M of `y = x @ M` (M: (k, o)).

    `layout` is 'io' (M[i, o] = P[in_sel[i], out_sel[o]]) or 'oi' (M[i, o] =
    P[out_sel[o], in_sel[i]]); a selection is None where it is the whole axis in order.
    `in_size` / `out_size` are the parameter's full input/output sizes.
    """

    layout: str
    in_sel: Optional[np.ndarray]
    in_size: int
    out_sel: Optional[np.ndarray]
    out_size: int

    def apply(self, x, w, b=None):
        """`x @ M (+ b)` as one ETP matmul on the whole parameter `w` (a bias of shape (o,)
        is folded into the op, any other is added after)."""
        if self.in_sel is not None:
            full = jnp.zeros(jnp.shape(x)[:-1] + (self.in_size,), jnp.result_type(x))
            x = full.at[..., self.in_sel].add(x)
        fold = self.out_sel is None and b is not None and jnp.shape(b) == (self.out_size,)
        y = etp.matmul(x, w, b if fold else None, w_layout=self.layout)
        if self.out_sel is not None:
            y = y[..., self.out_sel]
        return y if b is None or fold else y + b


def find_param_views(nodes, param_names) -> dict[str, ParamView]:
    """{node name: ParamView} for parameter placeholders and the view chains built on them."""
    views: dict[str, ParamView] = {}
    pieces: dict[str, list] = {}  # split/chunk/unbind results, taken apart by getitem
    for node in nodes:
        if (
            node.op == "call_function"
            and node.target is operator.getitem
            and isinstance(node.args[0], torch.fx.Node)
            and node.args[0].name in pieces
        ):
            views[node.name] = pieces[node.args[0].name][node.args[1]]
            continue
        if node.op == "placeholder" and node.name in param_names:
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and val.ndim >= 1:
                shape = tuple(int(d) for d in val.shape)
                views[node.name] = ParamView(
                    node.name, np.arange(int(np.prod(shape))).reshape(shape), shape
                )
        elif node.op == "call_function" and node.target in VIEW_OPS and node.args:
            src = node.args[0]
            if not isinstance(src, torch.fx.Node) or src.name not in views:
                continue
            view = views[src.name]
            rest = _static_args(node, view)
            if rest is None:
                continue  # a size known only at run time: not a static view
            try:
                index = node.target(torch.from_numpy(view.index), *rest, **node.kwargs)
            except Exception:
                continue
            if isinstance(index, torch.Tensor):
                views[node.name] = view._replace(index=index.numpy().copy())
            elif isinstance(index, (list, tuple)):
                pieces[node.name] = [view._replace(index=i.numpy().copy()) for i in index]
    return views


def _static_args(node, view: ParamView):
    """The op's arguments after its input, or None if one is known only at run time. An
    `expand` to a symbolic (batch) size is kept as size 1 where the input has size 1: the
    elements repeat along that axis, so the index map is the same for any size."""
    rest = node.args[1:]
    if node.target is aten.expand.default and node.args[1:2]:
        sizes = list(node.args[1])
        lead = len(sizes) - view.index.ndim
        sizes = [
            1
            if isinstance(s, torch.fx.Node) and (i < lead or view.index.shape[i - lead] == 1)
            else s
            for i, s in enumerate(sizes)
        ]
        rest = (sizes,) + tuple(node.args[2:])
    found = []
    torch.fx.node.map_arg((rest, node.kwargs), found.append)
    return None if found else rest


def matrix_use(view: ParamView, transpose: bool = False) -> Optional[MatrixUse]:
    """How `view` (last two axes (k, o); `transpose`: (o, k)) uses a 2-D parameter as a matrix.

    Leading axes must repeat one matrix (a broadcast over a batch of matmuls). None when the
    view is not such a use (a 3-D parameter, a reshape that scrambles rows, a diagonal, ...).
    """
    if len(view.param_shape) != 2 or view.index.ndim < 2:
        return None
    index = np.swapaxes(view.index, -1, -2) if transpose else view.index
    mats = index.reshape((-1,) + index.shape[-2:])
    m = mats[0]
    if not np.all(mats == m) or m.size == 0:
        return None
    rows, cols = np.divmod(m, view.param_shape[1])
    n_rows, n_cols = view.param_shape
    if np.all(rows == rows[:, :1]) and np.all(cols == cols[:1, :]):
        return _use("io", rows[:, 0], n_rows, cols[0, :], n_cols)
    if np.all(rows == rows[:1, :]) and np.all(cols == cols[:, :1]):
        return _use("oi", cols[:, 0], n_cols, rows[0, :], n_rows)
    return None


def _use(layout, in_sel, in_size, out_sel, out_size) -> MatrixUse:
    def sel(s, size):
        return None if len(s) == size and np.array_equal(s, np.arange(size)) else s

    return MatrixUse(layout, sel(in_sel, in_size), in_size, sel(out_sel, out_size), out_size)
