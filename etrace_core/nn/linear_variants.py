"""Linear-layer variants of braintrace's layer set: sign-constrained, weight-standardised, LoRA.

Each keeps its trained arrays as ParamStates used through :func:`etrace_core.ops.matmul`; the
constraint (sign, standardisation) is the op's ``weight_fn``, so the stored array itself is the
traced parameter and its gradient is pulled back through the constraint exactly.
"""

from typing import Optional

import brainstate
import brainunit as u
import jax.numpy as jnp

from etrace_core import ops

from .init import (
    DEFAULT,
    Initializer,
    Key,
    fan_in_uniform,
    feature_size,
    make_param,
    resolve_dtype,
    split_key,
)

__all__ = ["SignedWLinear", "ScaledWSLinear", "LoRA"]


class _SignedAbs:
    """``w -> |w| * sign`` (one object per layer, so the op's static parameter is stable)."""

    def __init__(self, sign):
        self.sign = sign

    def __call__(self, w):
        return jnp.abs(w) if self.sign is None else jnp.abs(w) * self.sign


class SignedWLinear(brainstate.nn.Module):
    """``y = x @ (|W| * w_sign)``: weights of fixed sign (Dale's law); ``w_sign`` broadcastable
    to ``(in, out)`` (None: all positive). ``weight`` holds ``W``; no bias."""

    def __init__(
        self,
        in_size,
        out_size,
        w_init: Optional[Initializer] = DEFAULT,
        w_sign=None,
        *,
        dtype=None,
        key: Key = None,
        name: Optional[str] = None,
    ):
        super().__init__(name=name)
        n_in, n_out = feature_size(in_size, "in_size"), feature_size(out_size, "out_size")
        # sizes as given (tuple: (..., features), as for Linear); the weight is (n_in, n_out)
        self.in_size = tuple(in_size) if isinstance(in_size, (tuple, list)) else (n_in,)
        self.out_size = tuple(out_size) if isinstance(out_size, (tuple, list)) else (n_out,)
        self.weight = make_param(
            w_init, (n_in, n_out), resolve_dtype(dtype), key, fan_in_uniform(n_in)
        )
        self.w_sign = (
            None if w_sign is None else jnp.broadcast_to(jnp.asarray(w_sign), (n_in, n_out))
        )
        self._fn = _SignedAbs(self.w_sign)

    def update(self, x):
        return ops.matmul(x, self.weight.value, weight_fn=self._fn)


class _Standardise:
    """Scaled weight standardisation over the input axis (``brainstate.nn.weight_standardization``
    without gain), then the optional mask."""

    def __init__(self, eps, mask):
        self.eps, self.mask = eps, mask

    def __call__(self, w):
        w = brainstate.nn.weight_standardization(w, self.eps, None)
        return w if self.mask is None else w * self.mask


class ScaledWSLinear(brainstate.nn.Module):
    """``y = (x @ ws(W) [* mask]) * gain + bias`` with ``ws`` scaled weight standardisation.

    ``weight`` is one ParamState holding a dict (brainstate's layout): ``'weight'`` is traced
    through the standardisation; ``'gain'`` (``ws_gain=True``, shape ``(1, out)``) and
    ``'bias'`` act after the op and get their same-step gradient.
    """

    def __init__(
        self,
        in_size,
        out_size,
        w_init: Optional[Initializer] = DEFAULT,
        b_init: Optional[Initializer] = DEFAULT,
        w_mask=None,
        ws_gain: bool = True,
        eps: float = 1e-4,
        *,
        dtype=None,
        key: Key = None,
        name: Optional[str] = None,
    ):
        super().__init__(name=name)
        n_in, n_out = feature_size(in_size, "in_size"), feature_size(out_size, "out_size")
        self.in_size, self.out_size = (n_in,), (n_out,)
        dtype = resolve_dtype(dtype)
        w_key, b_key = split_key(key, 2)
        params = {
            "weight": make_param(w_init, (n_in, n_out), dtype, w_key, fan_in_uniform(n_in)).value
        }
        if b_init is not None:
            params["bias"] = make_param(
                b_init, (n_out,), dtype, b_key, lambda s, d=None: jnp.zeros(s)
            ).value
        if ws_gain:
            params["gain"] = jnp.ones((1, n_out), dtype)
        self.weight = brainstate.ParamState(params)
        self.eps = eps
        self.w_mask = (
            None if w_mask is None else jnp.broadcast_to(jnp.asarray(w_mask), (n_in, n_out))
        )
        self._fn = _Standardise(eps, self.w_mask)

    def update(self, x):
        params = self.weight.value
        y = ops.matmul(x, params["weight"], weight_fn=self._fn)
        if "gain" in params:
            y = y * params["gain"]
        if "bias" in params:
            y = y + params["bias"]
        return y


class LoRA(brainstate.nn.Module):
    """Low-rank adapter ``y = (x @ A) @ B / rank [+ base_module(x)]``, ``A: (in, rank)``,
    ``B: (rank, out)``, both ``kernel_init`` (default U(-1/sqrt(fan_in), 1/sqrt(fan_in))).

    ``weight`` is one ParamState holding ``{'lora_a': A, 'lora_b': B}`` (braintrace's layout).
    One ETP ``lora_matmul`` (``etp_lora_mm``/``etp_lora_mv``): both factors are traced weights
    (see :mod:`etrace_core.ops.lora`). ``x`` may have any leading axes (folded into one batch
    axis around the op). A ``base_module`` that is not callable fails at the call.
    """

    def __init__(
        self,
        in_features: int,
        lora_rank: int,
        out_features: int,
        *,
        base_module: Optional[brainstate.nn.Module] = None,
        kernel_init: Optional[Initializer] = DEFAULT,
        in_size=None,
        dtype=None,
        key: Key = None,
        name: Optional[str] = None,
    ):
        super().__init__(name=name)
        self.in_features, self.out_features, self.lora_rank = in_features, out_features, lora_rank
        self.in_size = (
            (in_features,)
            if in_size is None
            else tuple(in_size if isinstance(in_size, (tuple, list)) else (in_size,))
        )
        self.out_size = (out_features,)
        dtype = resolve_dtype(dtype)
        a_key, b_key = split_key(key, 2)
        self.weight = brainstate.ParamState(
            {
                "lora_a": make_param(
                    kernel_init, (in_features, lora_rank), dtype, a_key, fan_in_uniform(in_features)
                ).value,
                "lora_b": make_param(
                    kernel_init, (lora_rank, out_features), dtype, b_key, fan_in_uniform(lora_rank)
                ).value,
            }
        )
        self.base_module = base_module

    def update(self, x):
        p = self.weight.value
        shape = u.math.shape(x)
        flat = x if len(shape) <= 2 else u.math.reshape(x, (-1, shape[-1]))
        y = ops.lora_matmul(flat, p["lora_a"], p["lora_b"], alpha=1.0 / self.lora_rank)
        if len(shape) > 2:
            y = u.math.reshape(y, tuple(shape[:-1]) + (self.out_features,))
        if self.base_module is not None:
            if not callable(self.base_module):
                raise ValueError(
                    "LoRA: base_module must be callable (a module or a function of x), got "
                    f"{self.base_module!r} of type {type(self.base_module).__name__}"
                )
            y = y + self.base_module(x)
        return y
