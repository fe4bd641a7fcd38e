"""A captured `torch.autograd.Function` as a `jax.custom_vjp`: its forward and its backward.

The forward and backward graphs come from `etrace_bridge.autograd_functions` (exported steps);
`lower_fn` lowers each to JAX. Arguments that get no gradient from the Function's backward
(None) get zeros, integer arguments a float0 zero, as JAX expects.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["function_vjp"]


def function_vjp(captured, lower_fn: Callable) -> Callable:
    """`fn(*tensor_args)` running the Function's forward, differentiated by its backward."""
    forward = lower_fn(captured.forward)
    backward = lower_fn(captured.backward)
    call = captured.call

    def run_forward(xs):
        (outs, saved, attrs), _ = forward({}, {}, tuple(xs))
        return tuple(outs), tuple(saved), tuple(attrs)

    def pack(outs):
        return tuple(outs) if call.tuple_out else outs[0]

    @jax.custom_vjp
    def fn(*xs):
        return pack(run_forward(xs)[0])

    def fn_fwd(*xs):
        outs, saved, attrs = run_forward(xs)
        return pack(outs), (saved, attrs, xs)

    def fn_bwd(res, cts):
        saved, attrs, xs = res
        cts = tuple(cts) if call.tuple_out else (cts,)
        cts = tuple(jnp.zeros(jnp.shape(c), jnp.float32) if _is_float0(c) else c for c in cts)
        grads, _ = backward({}, {}, (*saved, *attrs, *cts))
        grads = tuple(grads) if isinstance(grads, (tuple, list)) else (grads,)
        by_pos = dict(zip(captured.grad_pos, grads))
        result = []
        for i, x in enumerate(xs):
            if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
                result.append(np.zeros(jnp.shape(x), dtype=jax.dtypes.float0))
            elif i in by_pos and by_pos[i] is not None:
                g = jnp.asarray(by_pos[i], dtype=jnp.result_type(x))
                result.append(jnp.broadcast_to(g, jnp.shape(x)) if g.shape != jnp.shape(x) else g)
            else:
                result.append(jnp.zeros_like(x))
        return tuple(result)

    fn.defvjp(fn_fwd, fn_bwd)
    return fn


def _is_float0(c) -> bool:
    return getattr(c, "dtype", None) == jax.dtypes.float0
