"""Spike functions: a Heaviside step forward, a smooth surrogate derivative backward.

Both are ``jax.custom_jvp`` functions, so forward- and reverse-mode differentiation
(``jax.jvp``, ``jax.grad``, ``jax.jacobian``) all use the surrogate. The derivative is
element-wise, so a layer built on them keeps its per-neuron structure.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = ["heaviside", "spike_fn", "fast_sigmoid_spike", "sigmoid_surrogate"]


def heaviside(x):
    """``1`` where ``x > 0``, else ``0``, in ``x``'s float dtype."""
    x = jnp.asarray(x)
    return (x > 0).astype(
        x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.result_type(float)
    )


def _spike_with(surrogate_grad: Callable) -> Callable:
    """A Heaviside ``f(x, alpha)`` whose derivative in ``x`` is ``surrogate_grad(x, alpha)``."""

    @jax.custom_jvp
    def spike(x, alpha):
        return heaviside(x)

    @spike.defjvp
    def spike_jvp(primals, tangents):
        x, alpha = primals
        x_dot, _ = tangents
        y = heaviside(x)
        return y, (surrogate_grad(x, alpha) * x_dot).astype(y.dtype)

    return spike


def _fast_sigmoid_grad(x, alpha):
    return 1.0 / (alpha * jnp.abs(x) + 1.0) ** 2


def _sigmoid_grad(x, alpha):
    s = jax.nn.sigmoid(alpha * x)
    return alpha * s * (1.0 - s)


_fast_sigmoid_spike = _spike_with(_fast_sigmoid_grad)
_sigmoid_spike = _spike_with(_sigmoid_grad)


def spike_fn(x, alpha: float = 10.0):
    """Heaviside spike with the fast-sigmoid (SuperSpike) surrogate ``1 / (alpha*|x| + 1)^2``.

    ``x`` is the normalised distance to threshold, ``(V - thr) / thr``. The surrogate peaks at 1
    for ``x = 0``; ``alpha`` (default 10) sets its width: it halves at ``|x| = (sqrt(2)-1)/alpha``,
    about 4% of the threshold for the default.
    """
    return _fast_sigmoid_spike(jnp.asarray(x), alpha)


fast_sigmoid_spike = spike_fn


def sigmoid_surrogate(x, alpha: float = 4.0):
    """Heaviside spike whose derivative is that of ``sigmoid(alpha * x)`` (peak ``alpha / 4``)."""
    return _sigmoid_spike(jnp.asarray(x), alpha)
