"""ETP element-wise weight op ``y = broadcast(fn(w), batch_shape + w.shape)`` as one primitive.

Used for weights that act per unit (time constants, gains): the weight enters through ``fn``
applied element by element. Canonical form: ``X = ones(batch_shape + (1,))`` (``I = 1``),
``Y = y.reshape(batch_shape + (w.size,))`` (``O = w.size``); ``io_to_params`` multiplies by
``fn'(w)``.
"""

import math

import brainunit as u
import jax
import jax.numpy as jnp
from jax.interpreters import ad, batching

from etrace_core.ops.primitive import primitive_from_reference

__all__ = ["element_wise", "etp_elemwise_p", "x_canon", "y_canon", "io_to_params"]


class ElementFn:
    """Hashable holder of an element-wise function, so it can be a primitive param."""

    __slots__ = ("fn", "__weakref__")

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, w):
        return self.fn(w)

    def __eq__(self, other):
        return isinstance(other, ElementFn) and other.fn is self.fn

    def __hash__(self):
        return hash(id(self.fn))

    def __repr__(self):
        return getattr(self.fn, "__name__", None) or type(self.fn).__name__


def _reference(w, *, fn, batch_shape, has_bias):
    """Plain jnp implementation; impl, abstract eval and lowering all derive from it."""
    return jnp.broadcast_to(fn(w), tuple(batch_shape) + w.shape)


etp_elemwise_p = primitive_from_reference("etp_elemwise", _reference)


def _jvp_w(dw, w, *, fn, batch_shape, has_bias):
    # jax.jvp of fn itself, so a custom_jvp fn keeps its own rule.
    _, dy = jax.jvp(fn, (w,), (dw,))
    return jnp.broadcast_to(dy, tuple(batch_shape) + w.shape)


ad.defjvp(etp_elemwise_p, _jvp_w)


def _batch(args, dims, **params):
    """vmap over w: the mapped axis becomes the first weight axis, right after batch_shape."""
    (w,), (dim,) = args, dims
    y = etp_elemwise_p.bind(jnp.moveaxis(w, dim, 0), **params)
    return y, len(params["batch_shape"])


batching.primitive_batchers[etp_elemwise_p] = _batch


_IDENTITY = ElementFn(lambda w: w)


def element_wise(fn, w=None, *, batch_shape=(), weight_fn=None):
    """``broadcast_to(fn(w), batch_shape + w.shape)`` with ``fn`` an element-wise JAX function.

    braintrace's form ``element_wise(weight, weight_fn=None)`` (weight first, identity when no
    ``weight_fn``) is accepted too. A brainunit Quantity weight keeps its unit: ``fn`` acts on
    the mantissa.
    """
    if w is None and not callable(fn):  # braintrace: element_wise(weight, weight_fn=...)
        fn, w = (weight_fn if weight_fn is not None else _IDENTITY.fn), fn
    elif weight_fn is not None:
        raise ValueError(
            "element_wise: give the function once (element_wise(fn, w) or "
            "element_wise(w, weight_fn=fn))"
        )
    if not callable(fn):
        raise ValueError(f"element_wise: fn must be callable, got {fn!r}")
    unit = w.unit if isinstance(w, u.Quantity) and not w.unit.is_unitless else None
    w = jnp.asarray(w.mantissa if isinstance(w, u.Quantity) else w)
    y = _element_wise(fn, w, batch_shape)
    return y if unit is None else u.Quantity(y, unit=unit)


def _element_wise(fn, w, batch_shape):
    try:
        batch_shape = tuple(int(d) for d in batch_shape)
    except TypeError:
        raise ValueError(
            f"element_wise: batch_shape must be a tuple of ints, got {batch_shape!r}"
        ) from None
    if any(d < 0 for d in batch_shape):
        raise ValueError(f"element_wise: batch_shape must be non-negative, got {batch_shape}")
    out = jax.eval_shape(fn, w)
    if getattr(out, "shape", None) != w.shape:
        raise ValueError(
            f"element_wise: fn must be element-wise: expected fn(w) of shape "
            f"{w.shape} (the shape of w), got {getattr(out, 'shape', out)}"
        )
    return etp_elemwise_p.bind(w, fn=ElementFn(fn), batch_shape=batch_shape, has_bias=False)


def x_canon(params, x, w):
    """``ones(batch_shape + (1,))``: the op has no input, so ``I = 1``; ``x`` is ignored."""
    return jnp.ones(tuple(params["batch_shape"]) + (1,), dtype=w.dtype)


def y_canon(params, y):
    """``y`` reshaped to ``batch_shape + (w.size,)``: one canonical column per weight element."""
    n = len(params["batch_shape"])
    return y.reshape(y.shape[:n] + (math.prod(y.shape[n:]),))


def io_to_params(params, w, M):
    """``(M[0].reshape(w.shape) * fn'(w), None)``, with ``fn'`` from ``jax.jvp`` of ``fn``."""
    if M.shape != (1, w.size):
        raise ValueError(
            f"element_wise.io_to_params: M must have shape (1, w.size) = "
            f"{(1, w.size)}, got {M.shape}"
        )
    _, slope = jax.jvp(params["fn"], (w,), (jnp.ones_like(w),))
    return M[0].reshape(w.shape) * slope, None
