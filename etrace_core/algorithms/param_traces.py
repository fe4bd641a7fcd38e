"""Traces of parameters that reach hidden states outside ETP ops (see compiler.param_relations).

Per reached group, with U hidden units (batch included) and S states per unit:

- element-wise: eps (U, S), eps^t = D^t eps^{t-1} + J^t, with J^t[u, s] = dh_s[u]/dtheta[k(u)]
  at fixed h^{t-1}; gradient: scatter-add of sum_s delta[u, s] eps[u, s] into theta[k(u)].
  Memory O(B * hidden size) whatever the parameter's size.
- dense: eps (U, S, |theta|), the same recursion with the full J^t = dh^t/dtheta; gradient
  sum_{u, s} delta[u, s] eps[u, s, :].

Both are D-RTRL traces: exact when the recurrence is element-wise (D is then the whole
hidden-to-hidden Jacobian). Every algorithm uses them for these (small) traces.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np


def trace_key(k: int, group: int) -> str:
    return f"param{k}_group{group}"


def grad_key(k: int) -> int:
    """Key of param trace k among the canonical gradients (relations use 0, 1, ...)."""
    return -1 - k


def trace_of_key(key: int) -> int:
    return -1 - key


def init(spec) -> dict[str, Any]:
    traces = {}
    for k, r in enumerate(spec.param_traces):
        dtype = r.var.aval.dtype
        for g in r.hidden_groups:
            shape = (g.size, g.num_state) + (() if r.kind == "elementwise" else (r.param_size,))
            traces[trace_key(k, g.index)] = jnp.zeros(shape, dtype)
    return traces


def update(spec, traces, Ds, Js) -> dict[str, Any]:
    new = {}
    for k, r in enumerate(spec.param_traces):
        for slot, g in enumerate(r.hidden_groups):
            key = trace_key(k, g.index)
            eps = traces[key]
            D = Ds[g.index].reshape((g.size, g.num_state, g.num_state))
            J = Js[k][slot].astype(eps.dtype)
            if r.kind == "elementwise":
                prop = sum(D[:, :, t] * eps[:, None, t] for t in range(g.num_state))
            else:
                prop = sum(D[:, :, t, None] * eps[:, None, t, :] for t in range(g.num_state))
            new[key] = prop + J
    return new


def grads(spec, traces, deltas) -> dict[int, Any]:
    """{grad_key(k): gradient of parameter k, in its own shape}."""
    out = {}
    for k, r in enumerate(spec.param_traces):
        shape = tuple(r.var.aval.shape)
        total = jnp.zeros(shape, r.var.aval.dtype)
        for slot, g in enumerate(r.hidden_groups):
            eps = traces[trace_key(k, g.index)]
            delta = deltas[g.index].astype(eps.dtype)  # (U, S)
            if r.kind == "elementwise":
                per_unit = jnp.sum(delta * eps, axis=-1)  # (U,)
                index = np.asarray(r.unit_to_param[slot])
                n = r.param_size
                seg = np.where(index < 0, n, index)  # units depending on none: dropped
                flat = jnp.zeros((n + 1,), eps.dtype).at[seg].add(per_unit)[:n]
                total = total + flat.reshape(shape)
            else:
                total = total + jnp.einsum("us,usn->n", delta, eps).reshape(shape)
        out[grad_key(k)] = total
    return out


__all__ = ["trace_key", "grad_key", "trace_of_key", "init", "update", "grads"]
