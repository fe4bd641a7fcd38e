"""Initialisers for weights and hidden states.

An initialiser is a callable ``(shape, dtype) -> array``. The built-in ones draw from
``brainstate.random``; layers that receive a ``key`` run them under
``brainstate.random.seed_context(key)``, so a given key always gives the same weights.
"""
import math
from typing import Callable, Optional, Sequence, Union

import brainstate
import jax
import jax.numpy as jnp

__all__ = [
    'Initializer', 'default_dtype', 'resolve_dtype', 'zeros', 'constant', 'uniform', 'normal', 'fan_in_uniform',
    'make_param', 'split_key', 'state_zeros',
]

Initializer = Callable[[tuple, jnp.dtype], jax.Array]
Key = Union[None, int, jax.Array]


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


def make_param(init: Union[None, Initializer, jax.Array], shape: Sequence[int], dtype,
               key: Key = None, default: Optional[Initializer] = None) -> brainstate.ParamState:
    """A ``ParamState`` holding ``init(shape, dtype)`` (or the given array), checked for shape.

    ``init=None`` uses ``default``.
    """
    shape = tuple(shape)
    if init is None:
        init = default
    if callable(init):
        if key is None:
            value = init(shape, dtype)
        else:
            with brainstate.random.seed_context(key):
                value = init(shape, dtype)
    else:
        value = init
    value = jnp.asarray(value, dtype=dtype)
    if value.shape != shape:
        raise ValueError(f'initial value has shape {value.shape}, expected {shape}')
    return brainstate.ParamState(value)


def split_key(key: Key, num: int) -> list:
    """``num`` independent keys derived from ``key``, or ``num`` Nones when ``key`` is None."""
    if key is None:
        return [None] * num
    if isinstance(key, int):
        key = jax.random.PRNGKey(key)
    return list(jax.random.split(key, num))


def state_zeros(varshape: Sequence[int], batch_size: Optional[int], dtype) -> jax.Array:
    """Zeros of shape ``varshape``, or ``(batch_size,) + varshape`` when a batch size is given."""
    shape = tuple(varshape) if batch_size is None else (batch_size,) + tuple(varshape)
    return jnp.zeros(shape, dtype)
