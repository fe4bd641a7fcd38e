"""Jaxpr interpretation, primitive classes, and the flattening passes.

Passes are pure functions of a closed jaxpr: they re-trace an interpreter of it, so the result
is an ordinary closed jaxpr that JAX builds (no hand-made variables).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jcore

from etrace_core.ops import is_etp_primitive

try:  # source lines of equations: no public API; without it, refusals name no line
    from jax._src import source_info_util
except ImportError:  # pragma: no cover (a JAX without this module)
    source_info_util = None

# Primitives whose output element q depends only on element q of each same-shaped operand
# (rank-0 operands broadcast).
ELEMENTWISE = frozenset(
    """
abs acos acosh add and asin asinh atan atan2 atanh cbrt ceil clamp copy copy_p convert_element_type
cos cosh div eq erf erf_inv erfc exp exp2 expm1 floor ge gt imag integer_pow is_finite le lgamma
digamma log log1p logistic lt max min mul ne neg nextafter not or pow real reduce_precision rem
round rsqrt select_n sign sin sinh sqrt square stop_gradient sub tan tanh xor
""".split()
)
# Element-wise primitives of other libraries, by the name they bind: braintools' surrogate
# spike `heaviside_surrogate_gradient(x, dx) = [x >= 0]` (dx: the surrogate slope, same shape),
# the spike of every brainpy.state / braintools neuron.
ELEMENTWISE |= frozenset(["heaviside_surrogate_gradient"])

# Primitives that move elements without combining them (position relabelling).
RELABEL = frozenset(
    """
broadcast_in_dim concatenate dynamic_slice expand_dims gather pad reshape rev slice split squeeze
stack transpose
""".split()
)

INLINE_CALLS = frozenset(
    ["pjit", "jit", "closed_call", "core_call", "remat", "checkpoint", "custom_lin"]
)
CUSTOM_CALLS = frozenset(["custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"])
LOOPS = frozenset(["scan", "while"])

EqnRule = Callable[[jcore.JaxprEqn, list], list]


def bind_eqn(eqn: jcore.JaxprEqn, invals: Sequence) -> list:
    """Evaluate one equation as JAX would, returning a list of outputs.

    A `while` loop with float operands goes through `_while_with_vjp`: JAX cannot reverse-
    differentiate a while loop, and the interpreters built on this function (D, df, dL/dh) do.
    """
    if eqn.primitive.name == "while" and any(_is_float(v) for v in invals):
        return _while_with_vjp(eqn, invals)
    return _bind_raw(eqn, invals)


def _bind_raw(eqn: jcore.JaxprEqn, invals: Sequence) -> list:
    params = eqn.primitive.get_bind_params(eqn.params)
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _while_with_vjp(eqn: jcore.JaxprEqn, invals: Sequence) -> list:
    """The while loop's value, with a VJP assembled from forward-mode derivatives (JVPs).

    Position-wise loops (every output element depends on the same element of each operand) need
    one JVP per float operand: the Jacobian blocks are diagonal. Other loops get the full
    forward-mode Jacobian of each float operand (cost: that operand's size in JVPs).
    """
    floats = tuple(i for i, v in enumerate(invals) if _is_float(v))
    positionwise = _positionwise_call(eqn)

    @jax.custom_vjp
    def loop(*args):
        return tuple(_bind_raw(eqn, args))

    def fwd(*args):
        return loop(*args), args

    def bwd(args, cts):
        def outputs_of(i, a):
            return _bind_raw(eqn, [a if j == i else x for j, x in enumerate(args)])

        grads = [None] * len(args)  # None: no cotangent for integer operands
        float_out = [(k, ct) for k, ct in enumerate(cts) if _is_float(ct)]
        for i in floats:
            a = args[i]
            if positionwise:
                _, tans = jax.jvp(lambda a: outputs_of(i, a), (a,), (jnp.ones_like(a),))
                g = jnp.zeros_like(a)
                for k, ct in float_out:
                    if jnp.ndim(a) == 0:
                        g = g + jnp.sum(ct * tans[k]).astype(a.dtype)
                    elif jnp.shape(ct) == jnp.shape(a):
                        g = g + (ct * tans[k]).astype(a.dtype)
            else:
                jac = jax.jacfwd(lambda a: outputs_of(i, a))(a)
                g = jnp.zeros_like(a)
                for k, ct in float_out:
                    g = g + jnp.tensordot(ct, jac[k], axes=jnp.ndim(ct)).astype(a.dtype)
            grads[i] = g
        return tuple(grads)

    loop.defvjp(fwd, bwd)
    return list(loop(*invals))


def read_var(env: dict, v):
    return v.val if isinstance(v, jcore.Literal) else env[v]


def eval_jaxpr(
    jaxpr: jcore.Jaxpr,
    consts: Sequence,
    args: Sequence,
    rule: EqnRule | None = None,
    env: dict | None = None,
) -> list:
    """Evaluate `jaxpr`; `rule(eqn, invals)` may replace the evaluation of any equation.

    When `env` is given it receives every variable's value (used to read intermediates).
    """
    env = {} if env is None else env
    for v, c in zip(jaxpr.constvars, consts):
        env[v] = c
    for v, a in zip(jaxpr.invars, args):
        env[v] = a
    for eqn in jaxpr.eqns:
        invals = [read_var(env, v) for v in eqn.invars]
        outvals = rule(eqn, invals) if rule is not None else bind_eqn(eqn, invals)
        for v, val in zip(eqn.outvars, outvals):
            if not isinstance(v, jcore.DropVar):
                env[v] = val
    return [read_var(env, v) for v in jaxpr.outvars]


def sub_jaxpr(eqn: jcore.JaxprEqn) -> jcore.ClosedJaxpr:
    """The called jaxpr of a call-like equation, as a closed jaxpr."""
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        if key in eqn.params:
            j = eqn.params[key]
            return j if isinstance(j, jcore.ClosedJaxpr) else jcore.ClosedJaxpr(j, ())
    raise KeyError(f"no sub-jaxpr in {eqn.primitive.name}")


def _flatten_rule(eqn, invals):
    name = eqn.primitive.name
    if name in INLINE_CALLS:
        closed = sub_jaxpr(eqn)
        return eval_jaxpr(closed.jaxpr, closed.consts, invals, _flatten_rule)
    if name == "cond":
        return _cond_as_select(eqn, invals)
    return _bind_raw(eqn, invals)  # loops stay loops in the flat jaxpr


def _cond_as_select(eqn, invals):
    """Both branches evaluated, the result picked by `select_n` (same value, same derivatives)."""
    index, operands = invals[0], invals[1:]
    branches = eqn.params["branches"]
    outs = [eval_jaxpr(b.jaxpr, b.consts, operands, _flatten_rule) for b in branches]
    return select_branch(index, outs)


def select_branch(index, outs: Sequence[list]) -> list:
    """`outs[index]` (one output list per branch) as `select_n` ops, cond's index semantics."""
    if len(outs) == 1:
        return list(outs[0])
    # explicit int32 bounds: python-int bounds become int64 when x64 is switched on at run time
    index = lax.clamp(jnp.int32(0), jnp.asarray(index, jnp.int32), jnp.int32(len(outs) - 1))
    if len(outs) == 2:
        index = index.astype(bool)
    return [lax.select_n(_broadcast_pred(index, vals[0]), *vals) for vals in zip(*outs)]


def _broadcast_pred(pred, like):
    like = jnp.asarray(like)
    return jnp.broadcast_to(pred, like.shape) if like.ndim else pred


def flatten_jaxpr(closed: jcore.ClosedJaxpr) -> jcore.ClosedJaxpr:
    """Inline nested jit/pjit calls and rewrite `cond` as both branches + `select_n`."""
    avals = [v.aval for v in closed.jaxpr.invars]

    def run(*args):
        return eval_jaxpr(closed.jaxpr, closed.consts, args, _flatten_rule)

    return jax.make_jaxpr(run)(*[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals])


def all_eqns(jaxpr: jcore.Jaxpr):
    """Every equation of a jaxpr and of the jaxprs nested in it."""
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in _nested(eqn):
            yield from all_eqns(sub)


def _nested(eqn):
    for val in eqn.params.values():
        items = val if isinstance(val, (tuple, list)) else (val,)
        for item in items:
            if isinstance(item, jcore.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jcore.Jaxpr):
                yield item


def is_elementwise_eqn(eqn: jcore.JaxprEqn) -> bool:
    """True when every output element depends only on the same position of the inputs."""
    name = eqn.primitive.name
    if name in ELEMENTWISE:
        return True
    if name in CUSTOM_CALLS or name in LOOPS:
        return _positionwise_call(eqn)
    return False


def _positionwise_call(eqn) -> bool:
    shapes = {tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")}
    shapes |= {tuple(v.aval.shape) for v in eqn.invars if hasattr(v.aval, "shape")}
    shapes.discard(())
    if len(shapes) > 1:
        return False
    for sub in _nested(eqn):
        for inner in all_eqns(sub):
            n = inner.primitive.name
            if is_etp_primitive(inner.primitive):
                return False
            if n in INLINE_CALLS or n in CUSTOM_CALLS or n in LOOPS or n == "cond":
                continue
            if n not in ELEMENTWISE:
                return False
    return True


def inner_eqns(eqn: jcore.JaxprEqn):
    """Every equation of the jaxprs nested in `eqn` (a loop body, a custom call's function)."""
    for sub in _nested(eqn):
        yield from all_eqns(sub)


def uses_etp(eqn: jcore.JaxprEqn) -> bool:
    """True when an ETP op is hidden inside this (loop/custom-call) equation."""
    return any(is_etp_primitive(e.primitive) for e in inner_eqns(eqn))


def bind_with_source(eqn: jcore.JaxprEqn, invals: Sequence) -> list:
    """`_bind_raw`, the new equation keeping `eqn`'s source line (as jax's own eval_jaxpr):
    used by the canonicalising pass so refusals can name the model's line."""
    info = getattr(eqn, "source_info", None)
    context = getattr(source_info_util, "user_context", None)
    if info is None or context is None:
        return _bind_raw(eqn, invals)
    with context(info.traceback, name_stack=info.name_stack):
        return _bind_raw(eqn, invals)


def source_line(eqn: jcore.JaxprEqn) -> str:
    """'file:line (function)' of the model code that made `eqn` (the first frame outside jax,
    brainstate and etrace_core), or '' when JAX kept none."""
    frames = getattr(source_info_util, "user_frames", None)
    info = getattr(eqn, "source_info", None)
    if frames is None or info is None:
        return ""
    for frame in frames(info.traceback):
        name = frame.file_name.replace("\\", "/")
        if not any(f"/{lib}/" in name for lib in _LIBRARIES):
            return f"{frame.file_name}:{frame.start_line} ({frame.function_name})"
    return ""


_LIBRARIES = ("brainstate", "etrace_core", "jax", "jaxlib")


def stop_gradient_all(values: Sequence) -> list:
    return [lax.stop_gradient(v) if _is_float(v) else v for v in values]


def _is_float(v) -> bool:
    return jnp.issubdtype(jnp.result_type(v), jnp.inexact)
