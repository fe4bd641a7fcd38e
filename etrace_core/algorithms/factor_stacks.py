"""io-dim gradient factors stacked over a chunk of steps and contracted in one GEMM per output
side (the sequence driver's inner loop).

Connection c's ES-D-RTRL gradient over a chunk is ``sum_t A_c(t)^T B_o(t)`` (``GradFactors``:
A the input trace (N, I), B the de-biased output signal (N, O) of its output-side owner o).
Connections that share an output side (``shared_outputs``: ``x @ W_in + s @ W_rec`` feeding
one hidden state) contract their input factors side by side, ``[A_1 | A_2]^T B``: one GEMM
with the summed input width instead of one GEMM per weight, each reading B again.

The input factors are stacked transposed, (I_total, K, N), one step written per call: the GEMM
then reads the stack as a plain (I_total, K N) matrix. A stack scanned out step-major,
(K, N, I), is contracted over its leading axes, and XLA:CPU copies it into that transposed
layout before its GEMM, every chunk. (LIF benchmark model, 4 chunks of 25 steps: the copies
and per-weight GEMMs took ~1.2 ms against ~0.8 ms for one GEMM on a transposed stack, timed
alone; in the whole sequence program the gain is smaller, ~2%, as each step writes its
factors transposed.)
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jax import lax

from . import online


class FactorGroup(NamedTuple):
    """The io-dim connections whose input factors are stacked together against one B."""

    owner: int  # the connection holding the output side (the key of B in GradFactors.outputs)
    members: tuple[int, ...]  # connections, in plan order; their input factors side by side
    widths: tuple[int, ...]  # each member's input width I (+1 with a bias)
    rows: int  # N: leading (batch) positions of one step's factor
    dtype: object  # the stack's dtype (the members' input traces')


def factor_groups(plan, traces, skip=frozenset()) -> tuple[FactorGroup, ...]:
    """The io-dim connections of `plan` grouped by output-side owner, sized from `traces`;
    connections of the relations in `skip` are left out (contracted elsewhere)."""
    members: dict[int, list[int]] = {}
    for c, conn in enumerate(plan.connections):
        if plan.kinds[conn.rel] == "io" and conn.rel not in skip:
            members.setdefault(online.output_side_owner(plan, c), []).append(c)
    groups = []
    for owner, cs in members.items():
        xs = [traces[online.trace_key(plan.connections[c])]["x"] for c in cs]
        widths = tuple(int(x.shape[-1]) for x in xs)
        rows = int(xs[0].size // widths[0])
        groups.append(FactorGroup(owner, tuple(cs), widths, rows, jnp.result_type(*xs)))
    return tuple(groups)


def init_stacks(groups, K: int) -> list:
    """Zero stacks, one (I_total, K, N) per group."""
    return [jnp.zeros((sum(g.widths), K, g.rows), g.dtype) for g in groups]


def write_step(groups, stacks, inputs: dict, t) -> list:
    """Stacks with step `t`'s input factors (``GradFactors.inputs``) written, transposed."""
    out = []
    zero = jnp.zeros((), jnp.int32)
    for g, stack in zip(groups, stacks):
        # each member into its own rows, in place: a concatenation of the members first is one
        # more array written per step (XLA:CPU does not fuse it into the update)
        for c, lo in zip(g.members, np.cumsum((0,) + g.widths[:-1])):
            A = inputs[c].astype(stack.dtype).T[:, None, :]
            stack = lax.dynamic_update_slice(stack, A, (jnp.int32(lo), t, zero))
        out.append(stack)
    return out


def contract(groups, stacks, outputs: dict) -> dict[int, object]:
    """{connection: its canonical gradient (I, O) summed over the chunk}, from the stacks and
    the output factors B stacked step-major, (K, N, O) per owner."""
    grads = {}
    for g, stack in zip(groups, stacks):
        B = outputs[g.owner]
        B = B.reshape((-1, B.shape[-1]))
        A = stack.reshape((stack.shape[0], -1))
        M = jnp.matmul(A, B)
        for c, lo, hi in zip(g.members, np.cumsum((0,) + g.widths[:-1]), np.cumsum(g.widths)):
            grads[c] = M if len(g.members) == 1 else M[int(lo) : int(hi)]
    return grads


__all__ = ["FactorGroup", "factor_groups", "init_stacks", "write_step", "contract"]
