"""dh^t/dtheta at fixed h^{t-1}: the per-step input of the parameter traces, by forward mode.

For each hidden group reached by a traced parameter, the step is evaluated as a function of the
parameters (h^{t-1} and inputs fixed; other groups' h^t held fixed where they are made, so a
parameter's effect through another group's new state is left to that group) and pushed forward
with one tangent per element-wise parameter (all ones: each hidden element depends on one of
its elements, so the JVP gives that derivative) and one one-hot tangent per element of a dense
parameter, all in one vmapped JVP.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jax.extend import core as jcore

from etrace_core.compiler.jaxpr_tools import CUSTOM_CALLS, _bind_raw, _positionwise_call, read_var

Path = tuple


def param_jacobians(spec, args_flat, values: dict[Path, Any]) -> list[list[Any]]:
    """Per param trace, per reached group: (U, S) (element-wise) or (U, S, |theta|) (dense)."""
    graph = spec.graph
    minfo = graph.module_info
    traces = spec.param_traces
    made_of: dict[int, list] = {}
    for v, slots in spec.hidden_slot.items():
        for g, s in slots:
            made_of.setdefault(g, {})[s] = v
    out: list[list[Any]] = [[None] * len(r.hidden_groups) for r in traces]
    for group in graph.hidden_groups:
        users = [
            (k, r)
            for k, r in enumerate(traces)
            if group.index in [g.index for g in r.hidden_groups]
        ]
        if not users:
            continue
        own = [made_of[group.index][s] for s in range(group.num_state)]
        others = {v for v in spec.hidden_slot if v not in own}
        paths = [r.path for _, r in users]

        def f(thetas, own=own, others=others, paths=paths):
            vals = dict(values)
            vals.update(zip(paths, thetas))
            env = dict(zip(minfo.jaxpr.constvars, minfo.closed_jaxpr.consts))
            env.update(
                zip(minfo.jaxpr.invars, list(args_flat) + [vals[p] for p in minfo.state_paths])
            )
            for eqn in minfo.jaxpr.eqns:
                outs = _forward_bind(eqn, [read_var(env, v) for v in eqn.invars])
                for v, o in zip(eqn.outvars, outs):
                    if not isinstance(v, jcore.DropVar):
                        env[v] = lax.stop_gradient(o) if v in others else o
            return [jnp.reshape(env[v], group.varshape) for v in own]

        primals = [values[p] for p in paths]
        blocks, sizes = [], []
        for j, (_, r) in enumerate(users):
            theta = primals[j]
            n = 1 if r.kind == "elementwise" else int(theta.size)
            seed = (
                jnp.ones((1,) + theta.shape, theta.dtype)
                if r.kind == "elementwise"
                else jnp.eye(n, dtype=theta.dtype).reshape((n,) + theta.shape)
            )
            blocks.append(
                [
                    seed if i == j else jnp.zeros((n,) + p.shape, p.dtype)
                    for i, p in enumerate(primals)
                ]
            )
            sizes.append(n)
        tangents = [jnp.concatenate([b[i] for b in blocks]) for i in range(len(primals))]
        jvps = jax.vmap(lambda t: jax.jvp(f, (primals,), (t,))[1])(tangents)
        stacked = jnp.stack([j.reshape(j.shape[0], -1) for j in jvps], axis=-1)  # (T, U, S)
        offset = 0
        for (k, r), n in zip(users, sizes):
            block = stacked[offset : offset + n]
            offset += n
            slot = [g.index for g in r.hidden_groups].index(group.index)
            out[k][slot] = block[0] if r.kind == "elementwise" else jnp.moveaxis(block, 0, -1)
    return out


def _forward_bind(eqn, invals) -> list:
    """Evaluate one equation so that forward mode goes through it: loops as JAX's own (their
    JVP exists), custom-VJP calls (surrogate spikes) through their reverse rule."""
    if eqn.primitive.name in CUSTOM_CALLS and eqn.primitive.name != "custom_jvp_call":
        return _custom_vjp_as_jvp(eqn, invals)
    return _bind_raw(eqn, invals)


def _custom_vjp_as_jvp(eqn, invals) -> list:
    """A custom-VJP call (no forward mode in JAX) with a JVP built from its VJP. For a
    position-wise call (a surrogate spike) the Jacobian of each output w.r.t. each same-shaped
    operand is diagonal: one VJP with a ones cotangent per output gives it."""
    positionwise = _positionwise_call(eqn)

    @jax.custom_jvp
    def call(*args):
        return tuple(_bind_raw(eqn, args))

    def call_jvp(primals, tangents):
        outs, vjp = jax.vjp(call_raw, *primals)
        tan_out = []
        for k, o in enumerate(outs):
            cts = tuple(
                jnp.ones_like(x) if i == k else jnp.zeros_like(x) for i, x in enumerate(outs)
            )
            grads = vjp(cts)
            t = jnp.zeros_like(o)
            for p, g, dt in zip(primals, grads, tangents):
                if (
                    isinstance(dt, SymbolicZero)
                    or g is None
                    or not jnp.issubdtype(jnp.result_type(p), jnp.inexact)
                ):
                    continue
                if not positionwise or jnp.shape(p) != jnp.shape(o):
                    name = eqn.params.get("name", eqn.primitive.name)
                    raise NotImplementedError(
                        f"a parameter trace needs the forward derivative of {name}, a custom-VJP "
                        "function that is not position-wise; give it a custom_jvp rule"
                    )
                t = t + (g * dt).astype(o.dtype)
            tan_out.append(t)
        return tuple(outs), tuple(tan_out)

    def call_raw(*args):
        return tuple(_bind_raw(eqn, args))

    call.defjvp(call_jvp, symbolic_zeros=True)
    return list(call(*invals))


__all__ = ["param_jacobians"]
