"""Activation lookup by name, so layers accept ``activation='tanh'`` or any callable."""

from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = ["get_activation"]

_ACTIVATIONS = {
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "sigmoid": jax.nn.sigmoid,
    "softplus": jax.nn.softplus,
    "identity": lambda x: x,
}


def get_activation(activation: str | Callable) -> Callable:
    """The element-wise function named by ``activation`` (or ``activation`` itself if callable)."""
    if callable(activation):
        return activation
    try:
        return _ACTIVATIONS[activation]
    except KeyError:
        raise ValueError(
            f"unknown activation {activation!r}; use one of {sorted(_ACTIVATIONS)} or a callable"
        ) from None
