"""Windows of exact BPTT inside online learning (``vjp_method='multi-step'``), as one program.

A sequence of T steps is cut into consecutive windows of K steps (the last one shorter when K
does not divide T). Each window contributes what ``algo(MultiStepData(window))`` under
``brainstate.transform.grad`` gives (the one semantics of multi-step windows,
``base._online_window``): the exact gradient of the window's losses with the hidden states at
the window's start held fixed (BPTT inside the window), plus dL/dh^{start} (exact, through the
whole window) times the eligibility traces at the window's start (the gradient carried in from
earlier windows). The traces advance step by step through the window as in single-step mode.

K = T is BPTT exactly. K = 1 is "one step of exact backprop + traces": each step's loss reaches
h^{t-1} through the full one-step Jacobian (every cross-unit and cross-layer path of that step),
and the traces at t-1 carry it further back; this equals the single-step algorithm where the
hidden-to-hidden Jacobian is the diagonal the traces use (D-RTRL on element-wise recurrences).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from etrace_core.executor import data
from etrace_core.executor.step import jacobian_step

from . import online
from .base import _advance


def check_window(window) -> int:
    """The window length as a positive int, or a clear error."""
    if isinstance(window, bool) or not hasattr(window, "__index__"):
        raise TypeError(f"window must be a positive integer (time steps), got {window!r}")
    k = int(window)
    if k < 1:
        raise ValueError(f"window must be at least 1 time step, got {k}")
    return k


def drive_windows(
    plan,
    executor,
    out_tree,
    loss_fn,
    check_finite,
    return_outputs,
    window,
    params,
    rest,
    etrace,
    args,
    targets,
):
    """(loss, grads, outputs, rest, etrace) of T steps in windows of `window` steps (None: one
    window of all T)."""
    T = jax.tree.leaves((args, targets))[0].shape[0]
    K = max(1, T if window is None else min(window, T))
    n_full, tail = divmod(T, K)

    def one(carry, inp):
        rest, etrace, gsum, lsum = carry
        args_w, ys_w = inp
        loss, grads, outs, rest, etrace = _window(
            plan, executor, out_tree, loss_fn, check_finite, params, rest, etrace, args_w, ys_w
        )
        gsum = jax.tree.map(lambda a, b: a + b.astype(a.dtype), gsum, grads)
        return (rest, etrace, gsum, lsum + loss), (outs if return_outputs else None)

    zero = jax.tree.map(jnp.zeros_like, params)
    carry = (rest, etrace, zero, jnp.zeros((), jnp.result_type(float)))
    pieces = []
    if n_full:
        head = jax.tree.map(
            lambda a: a[: n_full * K].reshape((n_full, K) + a.shape[1:]), (args, targets)
        )
        if n_full == 1:
            carry, outs = one(carry, jax.tree.map(lambda a: a[0], head))
            pieces.append(outs)
        else:
            carry, outs = jax.lax.scan(one, carry, head)
            pieces.append(
                None
                if outs is None
                else jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), outs)
            )
    if tail:  # the last, shorter window
        carry, outs = one(carry, jax.tree.map(lambda a: a[n_full * K :], (args, targets)))
        pieces.append(outs)
    rest, etrace, gsum, loss = carry
    outs = None
    if return_outputs and pieces:
        outs = jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *pieces)
    return loss, gsum, outs, rest, etrace


def _window(plan, executor, out_tree, loss_fn, check_finite, params, rest, etrace, args_w, ys_w):
    spec = plan.spec

    def fstep(carry, args_t):
        rest, etrace = carry
        jac = jacobian_step(spec, jax.tree.leaves(args_t), {**rest, **params})
        etrace = _advance(plan, check_finite, etrace, jac)
        rest = dict(rest)
        rest.update({p: v for p, v in jac.new_values.items() if p in rest})
        return (rest, etrace), jac.outputs

    (rest_end, etrace_end), flat_outs = jax.lax.scan(fstep, (rest, etrace), args_w)

    def window_loss(flat_outs):
        def body(total, item):
            out_t, y_t = item
            return total + loss_fn(jax.tree.unflatten(out_tree, out_t), y_t), None

        total, _ = jax.lax.scan(body, jnp.zeros((), jnp.result_type(float)), (flat_outs, ys_w))
        return total

    # jax.vjp, not grad: integer outputs (if any) get float0 cotangents instead of an error
    loss, pull = jax.vjp(window_loss, flat_outs)
    (g_outs,) = pull(jnp.ones_like(loss))
    window_args = tuple(data.MultiStepData(a) for a in args_w)
    residuals = executor.window_vjp(window_args, {**rest, **params})
    dparams, dh0, _ = residuals.vjp_fn(list(g_outs))
    deltas = online.partial_hidden_grads(plan, dh0, None)
    carried = online.trace_grads(plan, params, etrace["traces"], etrace["count"], deltas)
    grads = online.add_grads(dict(dparams), carried)
    outs = jax.tree.unflatten(out_tree, flat_outs)  # leaves stacked over the window
    return loss, grads, outs, rest_end, etrace_end
