"""Complex-number ops: build/split complex tensors, conjugates, modulus, phase, polar form.

Arithmetic (`mul`, `add`, `exp`, `mm`, ...) on complex tensors needs nothing special: the
element-wise and linear-algebra families lower to jnp functions that take complex arrays.

`make_complex` builds `re + i im` from element-wise arithmetic (`convert_element_type`, `mul`,
`add`) rather than `lax.complex`, and `conj` likewise: the online compiler follows hidden
states and parameters through the primitives it knows to be element-wise, and `complex`/`conj`
are not among them (etrace_core.compiler.jaxpr_tools.ELEMENTWISE). For finite values the result
is bit for bit `lax.complex(re, im)`.
"""

from __future__ import annotations

import jax.numpy as jnp
import torch

from .record import plain

aten = torch.ops.aten


def make_complex(re, im):
    """`re + 1j * im` (complex64 for float32 parts, complex128 for float64)."""
    dtype = jnp.result_type(re, im, jnp.complex64)
    re, im = jnp.broadcast_arrays(jnp.asarray(re, dtype), jnp.asarray(im, dtype))
    return re + jnp.asarray(1j, dtype) * im


def conj(z):
    """The complex conjugate, from element-wise ops (see the module docstring)."""
    if not jnp.iscomplexobj(z):
        return z
    return make_complex(jnp.real(z), -jnp.imag(z))


def _view_as_real(z):
    return jnp.stack([jnp.real(z), jnp.imag(z)], axis=-1)


def _view_as_complex(x):
    if jnp.shape(x)[-1:] != (2,):
        raise ValueError(f"view_as_complex needs a last dimension of size 2, got {jnp.shape(x)}")
    return make_complex(x[..., 0], x[..., 1])


def _polar(r, theta):
    return make_complex(r * jnp.cos(theta), r * jnp.sin(theta))


def _complex_ops():
    return {
        aten.complex.default: make_complex,
        aten.view_as_real.default: _view_as_real,
        aten.view_as_complex.default: _view_as_complex,
        aten.real.default: lambda z: jnp.real(z),
        aten.imag.default: lambda z: jnp.imag(z),
        aten.conj.default: conj,
        aten._conj.default: conj,
        aten.conj_physical.default: conj,
        aten._conj_physical.default: conj,
        aten.resolve_conj.default: lambda z: z,
        aten.resolve_neg.default: lambda z: z,
        aten.angle.default: lambda z: jnp.angle(z),
        aten.polar.default: _polar,
    }


OPS = plain(_complex_ops())
