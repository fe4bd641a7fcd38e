"""Canonicalise a step's control flow into one flat program: inline jit calls, if-convert conds,
and unroll the inner scans that use weights.

Every analysis of the compiler identifies weights, hidden states and ETP ops by variable in one
flat jaxpr; a weight inside a ``scan`` body is invisible to it. A scan of static length L whose
body uses a weight (an operand made from ParamStates alone, or an ETP op) is therefore replaced
by L copies of its body, carry threaded from one to the next, ``xs`` sliced per iteration and the
stacked ``ys`` rebuilt with ``stack``. The unrolled program computes the same values and the same
derivatives as the loop. Scans without weights stay loops (cheaper to compile, already
supported); weighted scans longer than the limit stay loops too and are refused afterwards by
``graph.check_opaque_ops``, by name.

Pure: a re-traced interpreter of the input jaxpr (as ``jaxpr_tools.flatten_jaxpr``), so the
result is an ordinary closed jaxpr that JAX builds.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jcore

from .jaxpr_tools import (
    INLINE_CALLS,
    bind_with_source,
    read_var,
    select_branch,
    sub_jaxpr,
    uses_etp,
)


def flatten_control_flow(
    closed: jcore.ClosedJaxpr, weight_mask: Sequence[bool], scan_unroll_limit: int
) -> jcore.ClosedJaxpr:
    """`closed` with jit calls inlined, conds if-converted and every scan of static length
    <= `scan_unroll_limit` that uses a weight unrolled (recursively: scans nested in an
    unrolled body are treated the same way). `weight_mask[i]`: invar i is a weight."""
    avals = [v.aval for v in closed.jaxpr.invars]
    if len(weight_mask) != len(avals):
        raise ValueError(f"weight_mask has {len(weight_mask)} entries for {len(avals)} inputs")
    limit = int(scan_unroll_limit)

    def run(*args):
        outs, _ = _eval(closed.jaxpr, closed.consts, args, list(weight_mask), limit)
        return outs

    return jax.make_jaxpr(run)(*[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals])


def unrolls(eqn: jcore.JaxprEqn, weighted_operands: bool, limit: int) -> bool:
    """Whether a scan equation is unrolled: it uses a weight and its length is within limit."""
    return (
        eqn.primitive.name == "scan"
        and (weighted_operands or uses_etp(eqn))
        and limit > 0
        and eqn.params["length"] <= limit
    )


def _eval(jaxpr, consts, args, taint_in, limit):
    """(outputs, whether each output is made from weights alone) of `jaxpr`, re-traced flat."""
    env, tainted = {}, set()
    for v, c in zip(jaxpr.constvars, consts):
        env[v] = c
    for v, a, t in zip(jaxpr.invars, args, taint_in):
        env[v] = a
        if t:
            tainted.add(v)
    neutral = set(jaxpr.constvars)
    for eqn in jaxpr.eqns:
        invals = [read_var(env, v) for v in eqn.invars]
        t_in = [not isinstance(v, jcore.Literal) and v in tainted for v in eqn.invars]
        only = all(weight_only(v, tainted, neutral) for v in eqn.invars)
        outs, t_out = _eval_eqn(eqn, invals, t_in, only, limit)
        for v, val, t in zip(eqn.outvars, outs, t_out):
            if isinstance(v, jcore.DropVar):
                continue
            env[v] = val
            if t:
                tainted.add(v)
    outvars = jaxpr.outvars
    taint_out = [not isinstance(v, jcore.Literal) and v in tainted for v in outvars]
    return [read_var(env, v) for v in outvars], taint_out


def weight_only(v, weights: set, neutral: set) -> bool:
    """`v` is a literal, a constant, or a value made from weights and constants alone."""
    return isinstance(v, jcore.Literal) or v in weights or v in neutral


def weight_values(jaxpr: jcore.Jaxpr, weights) -> set:
    """Variables of `jaxpr` made from the `weights` and constants alone (a weight, its
    transpose, a masked weight, ...): what counts as "a weight" entering a loop."""
    found, neutral = set(weights), set(jaxpr.constvars)
    for eqn in jaxpr.eqns:
        ins = [v for v in eqn.invars if not isinstance(v, jcore.Literal)]
        if any(v in found for v in ins) and all(weight_only(v, found, neutral) for v in ins):
            found.update(v for v in eqn.outvars if not isinstance(v, jcore.DropVar))
    return found


def _eval_eqn(eqn, invals, t_in, weights_only, limit):
    """One equation re-traced; `t_in`: which operands are weights. Calls, conds and unrolled
    scans follow each operand inside; another op's outputs are weights when its operands are
    weights and constants alone (a weight mixed with data gives a weight's result)."""
    name = eqn.primitive.name
    if name in INLINE_CALLS:
        sub = sub_jaxpr(eqn)
        return _eval(sub.jaxpr, sub.consts, invals, t_in, limit)
    if name == "cond":
        outs, taints = [], []
        for branch in eqn.params["branches"]:
            o, t = _eval(branch.jaxpr, branch.consts, invals[1:], t_in[1:], limit)
            outs.append(o)
            taints.append(t)
        t_out = [t_in[0] or any(col) for col in zip(*taints)]
        return select_branch(invals[0], outs), t_out
    if unrolls(eqn, any(t_in), limit):
        return _unroll_scan(eqn, invals, t_in, limit)
    return bind_with_source(eqn, invals), [weights_only and any(t_in)] * len(eqn.outvars)


def _unroll_scan(eqn, invals, t_in, limit):
    """The scan's outputs computed by `length` inlined copies of its body."""
    p = eqn.params
    n_consts, n_carry, length = p["num_consts"], p["num_carry"], p["length"]
    body = p["jaxpr"]
    consts, carry, xs = (
        list(invals[:n_consts]),
        list(invals[n_consts : n_consts + n_carry]),
        list(invals[n_consts + n_carry :]),
    )
    t_consts = list(t_in[:n_consts])
    t_carry = list(t_in[n_consts : n_consts + n_carry])
    t_xs = list(t_in[n_consts + n_carry :])
    order = range(length - 1, -1, -1) if p["reverse"] else range(length)
    steps = {}
    t_ys = None
    for i in order:
        x_i = [lax.index_in_dim(x, i, keepdims=False) for x in xs]
        outs, t = _eval(
            body.jaxpr, body.consts, consts + carry + x_i, t_consts + t_carry + t_xs, limit
        )
        carry, t_carry = outs[:n_carry], t[:n_carry]
        steps[i] = outs[n_carry:]
        t_y = t[n_carry:]
        t_ys = t_y if t_ys is None else [a or b for a, b in zip(t_ys, t_y)]
    if length == 0:  # no iteration: the initial carry and empty stacks
        ys = [jnp.zeros(v.aval.shape, v.aval.dtype) for v in eqn.outvars[n_carry:]]
        return list(carry) + ys, list(t_carry) + [False] * len(ys)
    ys = [jnp.stack(col) for col in zip(*(steps[i] for i in range(length)))]
    return list(carry) + ys, list(t_carry) + list(t_ys or [])
