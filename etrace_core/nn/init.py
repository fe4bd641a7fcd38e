"""Initialisers for weights and hidden states.

An initialiser is any callable ``init(shape) -> array`` (braintools' initialisers, e.g.
``braintools.init.KaimingNormal()``, are called this way); the result is cast to the layer's
dtype (a brainunit Quantity keeps its unit). The built-in ones also take an optional dtype and
draw from ``brainstate.random``; layers that receive a ``key`` run them under
``brainstate.random.seed_context(key)``, so a given key always gives the same weights.
"""

import math
from collections.abc import Callable, Sequence
from typing import Optional

import brainstate
import jax
import jax.numpy as jnp

__all__ = [
    "Initializer",
    "default_dtype",
    "resolve_dtype",
    "zeros",
    "constant",
    "uniform",
    "normal",
    "fan_in_uniform",
    "make_param",
    "split_key",
    "state_zeros",
    "DEFAULT",
    "feature_size",
    "init_value",
    "decay_factor",
]


class _Default:
    """Marks an initialiser argument left at the layer's default (``None`` means "none")."""

    def __repr__(self):
        return "DEFAULT"


DEFAULT = _Default()


def decay_factor(dt, tau):
    """``exp(-dt / tau)`` as a plain float (or array). ``tau`` and ``dt`` may carry time units
    (brainunit): with a unit-carrying ``tau`` and ``dt=None`` the step is brainstate's
    ``environ.get_dt()``; the ratio must be dimensionless."""
    import brainunit as u

    if dt is None:
        dt = brainstate.environ.get_dt() if isinstance(tau, u.Quantity) else 1.0
    ratio = u.maybe_decimal(dt / tau)
    if isinstance(ratio, u.Quantity):
        raise ValueError(f"dt / tau must be dimensionless, got dt={dt!r}, tau={tau!r}")
    ratio = jnp.asarray(ratio)
    return float(jnp.exp(-ratio)) if ratio.ndim == 0 else jnp.exp(-ratio)


def feature_size(size, what: str = "size") -> int:
    """The number of features of a layer size: an int, or a tuple whose last entry counts them
    (brainstate's ``in_size=(..., n)``)."""
    if isinstance(size, (tuple, list)):
        if not size:
            raise ValueError(f"{what} must be an int or a non-empty tuple, got {size!r}")
        size = size[-1]
    try:
        n = int(size)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be an int or a tuple of ints, got {size!r}") from None
    if n != size or n < 1:
        raise ValueError(f"{what} must be a positive int, got {size!r}")
    return n


def init_value(init, shape, dtype):
    """``init(shape)`` (or ``init`` itself when it is an array), cast to ``dtype``; a Quantity
    keeps its unit. Any callable taking the shape works (braintools' initialisers too)."""
    import brainunit as u

    value = init(tuple(shape)) if callable(init) else init
    if isinstance(value, u.Quantity):
        return u.Quantity(jnp.asarray(value.mantissa, dtype=dtype), unit=value.unit)
    return jnp.asarray(value, dtype=dtype)


Initializer = Callable[[tuple, jnp.dtype], jax.Array]
Key = None | int | jax.Array


def default_dtype():
    """The float dtype of new parameters and states: float64 when jax x64 is on, else float32."""
    return jnp.result_type(float)


def resolve_dtype(dtype=None):
    """``dtype``, or :func:`default_dtype` when it is None."""
    return default_dtype() if dtype is None else dtype


def zeros(shape, dtype=None) -> jax.Array:
    """All zeros."""
    return jnp.zeros(shape, resolve_dtype(dtype))


def constant(value: float) -> Initializer:
    """Every element equal to ``value``."""

    def init(shape, dtype=None):
        return jnp.full(shape, value, resolve_dtype(dtype))

    return init


def uniform(low: float, high: float) -> Initializer:
    """Independent draws from U(low, high)."""

    def init(shape, dtype=None):
        dtype = resolve_dtype(dtype)
        return jnp.asarray(brainstate.random.uniform(low, high, size=shape, dtype=dtype), dtype)

    return init


def normal(std: float = 1.0, mean: float = 0.0) -> Initializer:
    """Independent draws from N(mean, std^2)."""

    def init(shape, dtype=None):
        dtype = resolve_dtype(dtype)
        return jnp.asarray(mean + std * brainstate.random.normal(size=shape, dtype=dtype), dtype)

    return init


def fan_in_uniform(fan_in: int) -> Initializer:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): torch's default for Linear, Conv and RNN weights."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return uniform(-bound, bound)


def make_param(
    init: None | Initializer | jax.Array,
    shape: Sequence[int],
    dtype,
    key: Key = None,
    default: Optional[Initializer] = None,
) -> brainstate.ParamState:
    """A ``ParamState`` holding ``init(shape)`` cast to ``dtype`` (or the given array), checked
    for shape.

    ``init=None`` or ``DEFAULT`` uses ``default``.
    """
    shape = tuple(shape)
    if init is None or init is DEFAULT:
        init = default
    if key is None:
        value = init_value(init, shape, dtype)
    else:
        with brainstate.random.seed_context(key):
            value = init_value(init, shape, dtype)
    if value.shape != shape:
        raise ValueError(f"initial value has shape {value.shape}, expected {shape}")
    return brainstate.ParamState(value)


def split_key(key: Key, num: int) -> list:
    """``num`` independent keys derived from ``key``, or ``num`` Nones when ``key`` is None."""
    if key is None:
        return [None] * num
    if isinstance(key, int):
        key = jax.random.PRNGKey(key)
    return list(jax.random.split(key, num))


def state_zeros(varshape: Sequence[int], batch_size: Optional[int], dtype, init=None) -> jax.Array:
    """Zeros (or ``init(shape)``) of shape ``varshape``, or ``(batch_size,) + varshape`` when a
    batch size is given."""
    shape = tuple(varshape) if batch_size is None else (batch_size,) + tuple(varshape)
    if init is None or init is DEFAULT:
        return jnp.zeros(shape, dtype)
    return init_value(init, shape, dtype)
