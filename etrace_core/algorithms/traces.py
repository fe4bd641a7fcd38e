"""Trace rules for one relation->group connection, in the canonical matmul form Y = X @ W.

Shapes: X is L + (I,), df is L + (O, S), D (gathered at the outputs) S x S nested blocks
D_y[s][s'] of shape L + (O,), dL/dh (gathered) L + (O, S). A rule returns the canonical
gradient M of shape (I, O).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jax import lax

from etrace_core.executor.step import stack_blocks


class Connection(NamedTuple):
    """Relation `rel` reaching hidden group `group` (its `slot`-th group) with unit map `unit`."""

    rel: int
    slot: int
    group: int
    unit: np.ndarray  # canonical output positions -> flat hidden unit (-1: none)
    identity: bool  # unit map is the identity (no gather needed)
    group_size: int
    tile: int = 0  # k > 0: the map is k copies of the units along the last axis (`tiling`)


def tiling(unit: np.ndarray, group_size: int) -> int:
    """k when the unit map is the group's units repeated k times along its last axis, as for
    the fused gates of a GRU/LSTM (``unit[l, j * H + h] = l * H + h``, ``H`` units per leading
    index ``l``): the gather is then a concatenation. 0 for any other map. Checked exactly (plan
    time, on the static map)."""
    if unit.ndim == 0 or unit.size == 0:
        return 0
    lead = unit.shape[:-1]
    n_lead = int(np.prod(lead))
    if group_size % n_lead:
        return 0
    H = group_size // n_lead
    if H == 0 or unit.shape[-1] % H:
        return 0
    k = unit.shape[-1] // H
    copies = np.broadcast_to(np.arange(group_size).reshape(lead + (1, H)), lead + (k, H))
    return k if np.array_equal(unit.reshape(lead + (k, H)), copies) else 0


def gather_units(conn: Connection, per_unit):
    """Pick, for each canonical output position, the row of `per_unit` (group size, ...)."""
    if conn.identity:
        return per_unit.reshape(conn.unit.shape + per_unit.shape[1:])
    if conn.tile:  # a regular repetition: k copies side by side, no index table
        # (concatenated, not broadcast: XLA fuses the broadcast's (k, H) indexing into every
        # consumer, measured slower than the gather; the concatenation is faster than both)
        lead = conn.unit.shape[:-1]
        units = per_unit.reshape(lead + (conn.unit.shape[-1] // conn.tile,) + per_unit.shape[1:])
        return jnp.concatenate([units] * conn.tile, axis=len(lead))
    padded = jnp.concatenate([per_unit, jnp.zeros((1,) + per_unit.shape[1:], per_unit.dtype)])
    index = np.where(conn.unit < 0, conn.group_size, conn.unit)
    return padded[index]


GRAD_STATIC_MAX = 256  # up to this many leading indices the gradient's slabs are sliced statically
GRAD_GROUP = 16  # leading (batch) indices whose trace slabs one fusion of the D-RTRL gradient reads


class ParamDimTrace:
    """D-RTRL: eps[l, i, o, s] = sum_s' D[o, s, s'] eps[l, i, o, s'] + df[l, o, s] X[l, i]."""

    kind = "param"

    @staticmethod
    def init(X_shape, y_shape_with_states, dtype):
        *lead, I = X_shape
        *_, O, S = y_shape_with_states
        return {"eps": jnp.zeros(tuple(lead) + (I, O, S), dtype)}

    @staticmethod
    def update(trace, X, df, D_y, decay):
        # The contraction over t (S is small: 1, 2, ...) unrolled into element-wise products and
        # sums, which XLA fuses into one pass over the trace. As an einsum it is a dot_general
        # batched over (..., o), emitted in (..., o, i, s) order plus a transposed copy of the
        # whole trace every step; as a reduction over a size-S axis, a slow reduce loop.
        eps = trace["eps"]
        S = eps.shape[-1]
        D_y = stack_blocks(D_y)  # L + (O, S, S)
        prop = sum(D_y[..., None, :, :, t] * eps[..., :, :, None, t] for t in range(S))
        return {"eps": prop + X[..., :, None, None] * df[..., None, :, :]}

    @staticmethod
    def grad(trace, delta_y, count, decay):
        # sum over the leading axes L of sum_s eps * delta, as element-wise sums over groups of
        # GRAD_GROUP leading indices: each group is one fusion that reads GRAD_GROUP contiguous
        # (I, O, S) slabs of the trace side by side and adds into an (I, O) accumulator, so the
        # trace is read once and the accumulator once per group (one slab at a time read and
        # wrote the accumulator per slab: more traffic than the trace itself; the product
        # eps * delta over all of L followed by a sum would be a trace-sized temporary; an
        # einsum, a transposed copy; a reduction over L, a strided reduce loop).
        eps = trace["eps"]
        I, O, S = eps.shape[-3:]
        e = eps.reshape((-1, I, O, S))
        d = delta_y.reshape((-1, O, S)).astype(eps.dtype)
        N, k = e.shape[0], GRAD_GROUP

        def group(es, ds):
            return sum(es[j][..., s] * ds[j][None, :, s] for j in range(len(es)) for s in range(S))

        acc = jnp.zeros((I, O), eps.dtype)
        if N <= GRAD_STATIC_MAX:  # static slabs: plain offsets, no per-element index math
            for n in range(0, N, k):
                acc = acc + group(e[n : n + k], d[n : n + k])
            return acc
        full = N // k

        def add_group(n, acc):
            # one dynamic slab per index (a slice of k slabs would be copied out first)
            idx = [n * k + j for j in range(k)]
            es = [lax.dynamic_index_in_dim(e, i, keepdims=False) for i in idx]
            ds = [lax.dynamic_index_in_dim(d, i, keepdims=False) for i in idx]
            return acc + group(es, ds)

        acc = lax.fori_loop(0, full, add_group, acc)
        if N - full * k:
            acc = acc + group(e[full * k :], d[full * k :])
        return acc

    @staticmethod
    def size(trace) -> int:
        return int(trace["eps"].size)


class IODimTrace:
    """ES-D-RTRL / pp-prop: eps_x = a eps_x + X; eps_f = a D eps_f + (1 - a) df;
    gradient = outer(eps_x, dL/dh * eps_f) / (1 - a^t), t = time steps seen."""

    kind = "io"

    @staticmethod
    def init(X_shape, y_shape_with_states, dtype):
        return {
            "x": jnp.zeros(tuple(X_shape), dtype),
            "f": jnp.zeros(tuple(y_shape_with_states), dtype),
        }

    @staticmethod
    def update(trace, X, df, D_y, decay):
        # sum_t D[s][t] f[..., t] per state s, unrolled over the (small) state axis so that it
        # fuses with the rest of the update (see ParamDimTrace.update) and reads the blocks of
        # D where they are computed (no stacked D is written)
        f_old = trace["f"]
        S = f_old.shape[-1]
        f = [sum(D_y[s][t] * f_old[..., t] for t in range(S)) for s in range(S)]
        f = jnp.stack([decay * f[s] + (1 - decay) * df[..., s] for s in range(S)], axis=-1)
        return {"x": decay * trace["x"] + X, "f": f}

    @staticmethod
    def update_input(trace, X, decay):
        """The input side alone, for a trace whose output side another connection holds."""
        return {"x": decay * trace["x"] + X}

    @staticmethod
    def output_signal(trace, delta_y):
        """sum_s dL/dh_s * eps_f[s], L + (O,): the output side of the gradient (shareable).
        `delta_y`: L + (O, S), or the sequence of its S slices L + (O,)."""
        f = trace["f"]
        return sum(
            delta_y[s] * f[..., s]
            if isinstance(delta_y, (list, tuple))
            else delta_y[..., s] * f[..., s]
            for s in range(f.shape[-1])
        )

    @staticmethod
    def grad(trace, delta_y, count, decay, signal=None):
        """`signal`: ``output_signal(trace, delta_y)`` when already computed (shared)."""
        scale = _debias(count, decay)
        w = IODimTrace.output_signal(trace, delta_y) if signal is None else signal
        g = jnp.einsum("...i,...o->io", trace["x"], w)
        return g * scale.astype(g.dtype)

    @staticmethod
    def input_factor(trace):
        """A of grad = A^T B: the input trace as (N, I)."""
        x = trace["x"]
        return x.reshape((-1, x.shape[-1]))

    @staticmethod
    def output_factor(signal, count, decay):
        """B of grad = A^T B: the de-biased output signal as (N, O). The sequence driver stacks
        A and B over a chunk of steps and contracts them in one GEMM."""
        scale = _debias(count, decay)
        return (signal * scale.astype(signal.dtype)).reshape((-1, signal.shape[-1]))

    @staticmethod
    def size(trace) -> int:
        return int(sum(v.size for v in trace.values()))


def _debias(count, decay):
    """1 / (1 - a^t) after t > 0 time steps (0 before any)."""
    correction = 1.0 - decay**count
    return jnp.where(count > 0, 1.0 / jnp.where(correction == 0, 1.0, correction), 0.0)


TRACE_KINDS = {"param": ParamDimTrace, "io": IODimTrace}
