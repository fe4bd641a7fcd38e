"""Channels-first convolutions (torch layout) on the ``etp_conv`` primitive."""

import math
from collections.abc import Sequence
from typing import Optional

import brainstate
import jax.numpy as jnp

from etrace_core.ops.conv import bind_conv, normalise_padding
from etrace_core.ops.elementwise import ElementFn
from etrace_core.ops.units import strip, strip_bias, with_unit

from .init import DEFAULT, Initializer, Key, fan_in_uniform, make_param, resolve_dtype, split_key
from .linear import WeightMask

__all__ = ["Conv1d", "Conv2d", "Conv3d"]

IntOrTuple = int | Sequence[int]


def _tuple(value: IntOrTuple, n: int, what: str) -> tuple:
    if isinstance(value, int):
        return (value,) * n
    value = tuple(int(v) for v in value)
    if len(value) != n:
        raise ValueError(f"{what} needs {n} values, got {value}")
    return value


def _padding(padding, n: int):
    """``'SAME'``/``'VALID'``, an int, or per spatial dim an int or a ``(lo, hi)`` pair (one
    entry is used for every dim); checked here so a bad value fails at construction."""
    if isinstance(padding, str):
        mode = padding.upper()
        if mode not in ("SAME", "VALID"):
            raise ValueError(f"padding string must be 'SAME' or 'VALID', got {padding!r}")
        return mode
    if isinstance(padding, int):
        return padding
    items = tuple(padding)
    if n == 1 and len(items) == 2 and all(isinstance(p, int) for p in items):
        items = (items,)  # one spatial dim: (lo, hi) is its pair
    if len(items) == 1:
        items = items * n
    if len(items) != n:
        raise ValueError(
            f"padding needs one entry (an int or a (lo, hi) pair) per spatial dim ({n}), "
            f"got {padding!r}"
        )
    out = []
    for p in items:
        pair = (p, p) if isinstance(p, int) else tuple(p)
        if len(pair) != 2 or not all(isinstance(v, int) and v >= 0 for v in pair):
            raise ValueError(f"padding entries must be ints >= 0 or (lo, hi) pairs, got {p!r}")
        out.append(pair)
    return tuple(out)


def _out_spatial(in_sizes, kernel, stride, padding, dilation):
    """Output spatial sizes of a convolution (``padding`` as normalised by ``_padding``)."""
    pads = normalise_padding(padding, in_sizes, kernel, stride, dilation)
    return tuple(
        (size + lo + hi - ((k - 1) * d + 1)) // s + 1
        for size, k, s, d, (lo, hi) in zip(in_sizes, kernel, stride, dilation, pads)
    )


class _ConvNd(brainstate.nn.Module):
    """N-d convolution: ``x (B, C_in, *S)`` or ``(C_in, *S)`` -> ``(B, C_out, *S_out)``.

    ``weight`` has torch's layout ``(C_out, C_in/groups, *K)`` and ``bias`` shape ``(C_out,)``;
    both go through :func:`etrace_core.ops.conv`. Defaults follow torch:
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with ``fan_in = C_in/groups * prod(K)``.
    ``padding`` is ``'SAME'``, ``'VALID'`` (either case), an int, or per spatial dim an int or
    a ``(lo, hi)`` pair. ``kernel_shape`` is the stored kernel's shape; ``w_mask`` (broadcast to
    it, or a callable giving it from that shape) multiplies the kernel inside the op, so the
    kernel stays the traced parameter and masked entries get zero gradient.

    brainstate's channels-last form, with brainstate's (and braintrace's) parameter layout:
    ``Conv2d(in_size=(H, W, C), out_channels, kernel_size, ...)`` takes and returns
    ``(B, *S, C)`` / ``(*S, C)`` arrays; ``weight`` is one dict ParamState with ``'weight'``
    ``(*K, C_in/groups, C_out)`` (read in place by the op) and, when ``b_init`` is given,
    ``'bias'`` ``(1, ..., 1, C_out)`` (brainstate's default is no bias); ``rhs_dilation=`` for
    ``dilation``; ``out_size`` is ``(*S_out, C_out)``.
    """

    num_spatial_dims: int = 0

    def __init__(
        self,
        in_channels: Optional[int] = None,
        out_channels: Optional[int] = None,
        kernel_size: IntOrTuple = None,
        *,
        stride: IntOrTuple = 1,
        padding: str | IntOrTuple = "SAME",
        dilation: IntOrTuple = 1,
        groups: int = 1,
        bias: bool = True,
        w_init: Optional[Initializer] = None,
        b_init: Optional[Initializer] = DEFAULT,
        in_size=None,
        rhs_dilation: Optional[IntOrTuple] = None,
        w_mask=None,
        dtype=None,
        key: Key = None,
        name: Optional[str] = None,
    ):
        super().__init__(name=name)
        n = self.num_spatial_dims
        if isinstance(in_channels, (tuple, list)):  # brainstate's positional Conv(in_size, ...)
            if in_size is not None:
                raise ValueError("give in_size once (positionally or as in_size=)")
            in_channels, in_size = None, in_channels
        self.channel_last = in_size is not None
        if in_size is not None:
            in_size = tuple(in_size) if isinstance(in_size, (tuple, list)) else (in_size,)
            if in_channels is not None or len(in_size) != n + 1:
                raise ValueError(
                    f"give in_channels, or in_size=(*spatial, channels) with {n} "
                    f"spatial dims (channels last), got in_channels={in_channels}, "
                    f"in_size={in_size}"
                )
            in_channels = in_size[-1]
            self.in_size = in_size
        if in_channels is None or out_channels is None or kernel_size is None:
            raise ValueError(
                "a convolution needs in_channels (or in_size), out_channels and kernel_size"
            )
        if rhs_dilation is not None:
            dilation = rhs_dilation
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) "
                f"must be divisible by groups ({groups})"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _tuple(kernel_size, n, "kernel_size")
        self.stride = _tuple(stride, n, "stride")
        self.padding = _padding(padding, n)
        self.dilation = _tuple(dilation, n, "dilation")
        self.groups = groups
        dtype = resolve_dtype(dtype)
        w_key, b_key = split_key(key, 2)
        default = fan_in_uniform(in_channels // groups * math.prod(self.kernel_size))
        if self.channel_last:  # brainstate's parameters: one dict, kernel (*K, C_in/g, C_out)
            self.kernel_shape = self.kernel_size + (in_channels // groups, out_channels)
            params = {"weight": make_param(w_init, self.kernel_shape, dtype, w_key, default).value}
            if bias and b_init is not None and b_init is not DEFAULT:  # brainstate: no bias
                b_shape = (1,) * n + (out_channels,)
                params["bias"] = make_param(b_init, b_shape, dtype, b_key, default).value
            self.weight, self.bias = brainstate.ParamState(params), None
            spatial = _out_spatial(
                in_size[:-1], self.kernel_size, self.stride, self.padding, self.dilation
            )
            self.out_size = spatial + (out_channels,)
        else:
            self.kernel_shape = (out_channels, in_channels // groups) + self.kernel_size
            self.weight = make_param(w_init, self.kernel_shape, dtype, w_key, default)
            has_bias = bias and b_init is not None
            self.bias = (
                make_param(b_init, (out_channels,), dtype, b_key, default) if has_bias else None
            )
        if callable(w_mask):  # brainstate: a mask initialiser, called with the kernel's shape
            w_mask = w_mask(self.kernel_shape)
        self.w_mask = (
            None if w_mask is None else jnp.broadcast_to(jnp.asarray(w_mask), self.kernel_shape)
        )
        # one function object per layer: the op's static parameter stays the same across calls
        self._masked = None if w_mask is None else ElementFn(WeightMask(self.w_mask))

    def update(self, x):
        bias = None if self.bias is None else self.bias.value
        if self.channel_last:  # (B, *S, C) -> (B, C, *S) and back: index relabelling only
            n = self.num_spatial_dims
            if x.ndim not in (n + 1, n + 2) or tuple(x.shape[-(n + 1) :]) != self.in_size:
                raise ValueError(
                    f"{type(self).__name__}: x must have shape (B, *in_size) or in_size with "
                    f"in_size={self.in_size} (channels last), got {tuple(x.shape)}"
                )
            axis = x.ndim - self.num_spatial_dims - 1
            params = self.weight.value
            (xm, w), unit = strip(jnp.moveaxis(x, -1, axis), params["weight"])
            b = params.get("bias")
            b = None if b is None else strip_bias(b, unit)
            y = bind_conv(
                xm,
                w,
                b,
                self.stride,
                self.padding,
                self.dilation,
                self.groups,
                w_layout="io",
                weight_fn=self._masked,
                flat_bias=True,
            )
            return with_unit(jnp.moveaxis(y, axis, -1), unit)
        (x, w), unit = strip(x, self.weight.value)
        bias = None if bias is None else strip_bias(bias, unit)
        y = bind_conv(
            x,
            w,
            bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            weight_fn=self._masked,
        )
        return with_unit(y, unit)


class Conv1d(_ConvNd):
    """1-D convolution over ``(B, C_in, L)`` or ``(C_in, L)`` inputs; see :class:`_ConvNd`."""

    num_spatial_dims = 1


class Conv2d(_ConvNd):
    """2-D convolution over ``(B, C_in, H, W)`` or ``(C_in, H, W)`` inputs; see :class:`_ConvNd`."""

    num_spatial_dims = 2


class Conv3d(_ConvNd):
    """3-D convolution over ``(B, C_in, D, H, W)`` or ``(C_in, D, H, W)``; see :class:`_ConvNd`."""

    num_spatial_dims = 3
