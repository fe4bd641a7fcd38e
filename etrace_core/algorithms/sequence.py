"""The sequence driver: T online steps in one jitted scan (over chunks of steps), gradients
summed over time."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from etrace_core.compiler.errors import NotSupportedError
from etrace_core.executor.step import jacobian_step, vjp_step

from . import factor_stacks, online
from .base import ETraceAlgorithm, _advance
from .online import add_grads
from .windows import check_window, drive_windows


class OnlineResult(NamedTuple):
    loss: Any  # summed loss over the T steps
    grads: dict[tuple, Any]  # parameter path -> summed online gradient
    outputs: Optional[Any]  # (T, ...) outputs when asked for


def run_online(
    algo: ETraceAlgorithm,
    loss_fn: Callable,
    xs,
    targets,
    *,
    return_outputs: bool = False,
    window: Optional[int] = None,
) -> OnlineResult:
    """Run `algo` over time-major inputs `xs` (an array or a tuple of step arguments, each with a
    leading time axis) against `targets`, with `loss_fn(output, target) -> scalar`.

    With ``vjp_method='multi-step'`` the sequence is processed in windows of `window` steps
    (the last one shorter when `window` does not divide T; None: one window of all T steps):
    exact BPTT inside each window, eligibility traces across windows (see `windows`). A
    single-step algorithm takes no `window`.

    The model's states and traces advance by T steps; parameters are not changed.
    """
    if not getattr(algo, "uses_trace_plan", True):
        raise NotSupportedError(
            f"run_online drives the eligibility traces of D-RTRL / ES-D-RTRL / hybrid; "
            f"{type(algo).__name__} carries its own state: step it with algo(x) (or "
            "MultiStepData windows), or algo.etrace_grad(..., step_fn=...)"
        )
    states, params, rest = algo._ready_values()
    if algo.executor.is_multi_step_vjp:
        window = None if window is None else check_window(window)
    elif window is not None:
        raise ValueError(
            f"window={window!r} needs an algorithm built with vjp_method='multi-step' "
            f"({type(algo).__name__} here uses 'single-step', one time step at a time)"
        )
    drivers = algo._drivers
    key = (loss_fn, return_outputs, window, algo.executor.is_multi_step_vjp)
    if key not in drivers:
        out_tree = algo.graph.module_info.out_tree
        if algo.executor.is_multi_step_vjp:
            drive = partial(
                drive_windows,
                algo._plan,
                algo.executor,
                out_tree,
                loss_fn,
                algo.check_finite,
                return_outputs,
                window,
            )
        else:
            drive = partial(
                _drive, algo._plan, out_tree, loss_fn, algo.check_finite, return_outputs
            )
        # the traces are donated: the call replaces them, so XLA may update them in place
        # instead of holding the old and the new copy (D-RTRL's trace is B x |theta|)
        drivers[key] = jax.jit(drive, donate_argnums=(2,))
    args = xs if isinstance(xs, tuple) else (xs,)
    loss, grads, outs, rest, etrace = drivers[key](params, rest, algo.etrace.value, args, targets)
    written = algo.graph.module_info.written_paths
    algo._write({p: v for p, v in rest.items() if p in written}, etrace, states)
    return OnlineResult(loss, grads, outs)


def _drive(
    plan, out_tree, loss_fn, check_finite, return_outputs, params, rest, etrace, args, targets
):
    spec = plan.spec

    def step(carry, inp):
        rest, etrace, gsum, msum, lsum = carry
        args_t, y_t = inp
        flat = jax.tree.leaves(args_t)
        values = {**rest, **params}
        jac = jacobian_step(spec, flat, values)
        vjp = vjp_step(spec, flat, values)
        old, etrace = etrace, _advance(plan, check_finite, etrace, jac)
        out = jax.tree.unflatten(out_tree, jac.outputs)
        loss, g_out = jax.value_and_grad(loss_fn)(out, y_t)
        dparams, dh, _ = vjp.vjp_fn(jax.tree.leaves(g_out))
        # trace gradients stay in canonical (I[+1], O) space inside the scan and are mapped to
        # the weights' layouts once at the end (io_to_params is linear): no per-step transposed
        # or sliced accumulation into the weights. io-dim gradients (outer products A^T B) are
        # not even contracted here: their factors are stacked over a chunk of steps and
        # contracted in one GEMM per chunk and output side (see `chunk`, `factor_stacks`),
        # instead of a small GEMM plus an (I, O) accumulation every step.
        deltas = online.partial_hidden_grads(plan, dh, jac.Ms)
        factors, ms = online.trace_grad_parts(plan, etrace["traces"], etrace["count"], deltas)
        if vjp.escape_fn is not None:
            esc = online.partial_hidden_grads(plan, vjp.escape_fn(jax.tree.leaves(g_out)), None)
            ms = _add_canonical(
                ms, online.trace_grads_canonical(plan, old["traces"], old["count"], esc)
            )
        gsum = jax.tree.map(lambda a, b: a + b.astype(a.dtype), gsum, dparams)
        msum = dict(msum)
        msum.update({k: msum[k] + m.astype(msum[k].dtype) for k, m in ms.items()})
        carry = (rest_after(rest, jac), etrace, gsum, msum, lsum + loss)
        return carry, (factors, out if return_outputs else None)

    def rest_after(rest, jac):
        rest = dict(rest)
        rest.update({p: v for p, v in jac.new_values.items() if p in rest})
        return rest

    def stacked_step(carry, inp):
        # the input factors go into transposed stacks (see factor_stacks), the output factors
        # are stacked by the scan
        carry, stacks, t = carry
        carry, (factors, out) = step(carry, inp)
        stacks = factor_stacks.write_step(groups, stacks, factors.inputs, t)
        direct_in = {c: A for c, A in factors.inputs.items() if plan.connections[c].rel in direct}
        return (carry, stacks, t + 1), (factors.outputs, direct_in, out)

    def chunk(carry, inp):
        # the stacks travel from chunk to chunk: every chunk overwrites all of their K steps, so
        # they are allocated (zeroed) once, not per chunk
        carry, stacks = carry
        (carry, stacks, _), (outputs, direct_inputs, outs) = jax.lax.scan(
            stacked_step, (carry, stacks, jnp.zeros((), jnp.int32)), inp
        )
        rest, etrace, gsum, msum, lsum = carry
        msum, gsum = dict(msum), dict(gsum)
        for c, A in direct_inputs.items():  # contracted in the weights' layouts (one step)
            k = plan.connections[c].rel
            B = outputs[online.output_side_owner(plan, c)]
            for p, g in online.factor_grads(plan, params, k, A, B).items():
                gsum[p] = gsum[p] + g.astype(gsum[p].dtype)
        for c, M in factor_stacks.contract(groups, stacks, outputs).items():
            k = plan.connections[c].rel
            msum[k] = msum[k] + M.astype(msum[k].dtype)
        return ((rest, etrace, gsum, msum, lsum), stacks), outs

    T = jax.tree.leaves((args, targets))[0].shape[0]
    K = chunk_length(T, plan, etrace)
    # one step (a streaming step): gradients straight in the weights' layouts from the factors.
    # For chunks of several steps the factors are stacked by the scan and the canonical sum,
    # mapped once at the end, measured faster (T = 20, 32: -8 to -10%; T = 1: +4 to 5%)
    direct = online.direct_relations(plan) if T == 1 else frozenset()
    zero = jax.tree.map(jnp.zeros_like, params)
    msum0 = {k: m for k, m in _canonical_zeros(plan, etrace).items() if k not in direct}
    lsum0 = jnp.zeros((), jnp.result_type(float))
    groups = factor_stacks.factor_groups(plan, etrace["traces"], skip=direct)
    carry = ((rest, etrace, zero, msum0, lsum0), factor_stacks.init_stacks(groups, K))
    if K == T:  # one chunk: no outer loop (a smaller program to compile)
        ((rest, etrace, gsum, msum, loss), _), outs = chunk(carry, (args, targets))
    else:
        chunked = jax.tree.map(lambda a: a.reshape((T // K, K) + a.shape[1:]), (args, targets))
        ((rest, etrace, gsum, msum, loss), _), outs = jax.lax.scan(chunk, carry, chunked)
        outs = jax.tree.map(lambda a: a.reshape((T,) + a.shape[2:]), outs)
    grads = add_grads(gsum, online.canonical_to_params(plan, params, msum))
    return loss, grads, outs, rest, etrace


CHUNK_MAX = 32  # steps whose io-dim gradient factors are contracted together
CHUNK_BYTES = 16 * 2**20  # at most this much memory for the stacked factors


def chunk_length(T: int, plan, etrace) -> int:
    """The largest divisor of T that is <= CHUNK_MAX and keeps a chunk's stacked io-dim factors
    (N x (I + O) per connection and step) under CHUNK_BYTES: memory stays constant in T, and
    one scan body is compiled (no remainder chunk). A prime T gets chunks of one step."""
    per_step = 0
    for c, conn in enumerate(plan.connections):
        if plan.kinds[conn.rel] != "io":
            continue
        tr = etrace["traces"][online.trace_key(conn)]
        per_step += tr["x"].size * tr["x"].dtype.itemsize
        if "f" in tr:  # the factor B of an output side is stacked once, by its owner
            per_step += tr["f"].size // tr["f"].shape[-1] * tr["f"].dtype.itemsize
    cap = CHUNK_MAX if per_step == 0 else max(1, min(CHUNK_MAX, CHUNK_BYTES // per_step))
    return max(k for k in range(1, cap + 1) if T % k == 0) if T > 0 else 1


def _add_canonical(a, b):
    out = dict(a)
    for k, m in b.items():
        out[k] = out[k] + m if k in out else m
    return out


def _canonical_zeros(plan, etrace):
    """Zeros shaped like each relation's canonical trace gradient (the scan's accumulator)."""
    groups = plan.spec.graph.hidden_groups
    dtype = jnp.result_type(*jax.tree.leaves(etrace["traces"])) if etrace["traces"] else float
    deltas = [jax.ShapeDtypeStruct((g.size, g.num_state), dtype) for g in groups]
    shapes = jax.eval_shape(
        lambda tr, c, d: online.trace_grads_canonical(plan, tr, c, d),
        etrace["traces"],
        etrace["count"],
        deltas,
    )
    return {k: jnp.zeros(s.shape, s.dtype) for k, s in shapes.items()}


__all__ = ["OnlineResult", "run_online", "online"]
