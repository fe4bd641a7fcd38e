"""The sequence driver: T online steps in one jitted lax.scan, gradients summed over time."""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Dict, NamedTuple, Optional

import jax
import jax.numpy as jnp

from etrace_core.executor.step import jacobian_step, vjp_step

from . import online
from .base import ETraceAlgorithm, _advance
from .online import add_grads


class OnlineResult(NamedTuple):
    loss: Any                      # summed loss over the T steps
    grads: Dict[tuple, Any]        # parameter path -> summed online gradient
    outputs: Optional[Any]         # (T, ...) outputs when asked for


def run_online(algo: ETraceAlgorithm, loss_fn: Callable, xs, targets, *,
               return_outputs: bool = False) -> OnlineResult:
    """Run `algo` over time-major inputs `xs` (an array or a tuple of step arguments, each with a
    leading time axis) against `targets`, with `loss_fn(output, target) -> scalar`.

    The model's states and traces advance by T steps; parameters are not changed.
    """
    states = algo._check_ready()
    if algo.executor.is_multi_step_vjp:
        raise ValueError("run_online steps one time step at a time; for windows of exact BPTT "
                         "call the algorithm on MultiStepData under brainstate.transform.grad")
    params, rest = algo._split_values(states)
    drivers = algo._drivers
    key = (loss_fn, return_outputs)
    if key not in drivers:
        # the traces are donated: the call replaces them, so XLA may update them in place
        # instead of holding the old and the new copy (D-RTRL's trace is B x |theta|)
        drivers[key] = jax.jit(partial(_drive, algo._plan, algo.graph.module_info.out_tree,
                                       loss_fn, algo.check_finite, return_outputs),
                               donate_argnums=(2,))
    args = xs if isinstance(xs, tuple) else (xs,)
    loss, grads, outs, rest, etrace = drivers[key](params, rest, algo.etrace.value, args, targets)
    algo._write({p: v for p, v in rest.items() if p in algo.graph.module_info.written_paths},
                etrace, states)
    return OnlineResult(loss, grads, outs)


def _drive(plan, out_tree, loss_fn, check_finite, return_outputs, params, rest, etrace, args,
           targets):
    spec = plan.spec

    def body(carry, inp):
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
        # or sliced accumulation into the weights
        deltas = online.partial_hidden_grads(plan, dh, jac.Ms)
        ms = online.trace_grads_canonical(plan, etrace["traces"], etrace["count"], deltas)
        if vjp.escape_fn is not None:
            esc = online.partial_hidden_grads(plan, vjp.escape_fn(jax.tree.leaves(g_out)), None)
            ms = _add_canonical(ms, online.trace_grads_canonical(plan, old["traces"],
                                                                 old["count"], esc))
        gsum = jax.tree.map(lambda a, b: a + b.astype(a.dtype), gsum, dparams)
        msum = {k: msum[k] + m.astype(msum[k].dtype) for k, m in ms.items()}
        rest = dict(rest)
        rest.update({p: v for p, v in jac.new_values.items() if p in rest})
        return (rest, etrace, gsum, msum, lsum + loss), (out if return_outputs else None)

    zero = jax.tree.map(jnp.zeros_like, params)
    msum0 = _canonical_zeros(plan, etrace)
    lsum0 = jnp.zeros((), jnp.result_type(float))
    (rest, etrace, gsum, msum, loss), outs = jax.lax.scan(
        body, (rest, etrace, zero, msum0, lsum0), (args, targets))
    grads = add_grads(gsum, online.canonical_to_params(plan, params, msum))
    return loss, grads, outs, rest, etrace


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
    shapes = jax.eval_shape(lambda tr, c, d: online.trace_grads_canonical(plan, tr, c, d),
                            etrace["traces"], etrace["count"], deltas)
    return {k: jnp.zeros(s.shape, s.dtype) for k, s in shapes.items()}


__all__ = ["OnlineResult", "run_online", "online"]
