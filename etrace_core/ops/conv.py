"""ETP convolution (torch layout, 1-D and 2-D) as one JAX primitive, and its canonical-form rules.

``x: (B, C_in, *S)`` or unbatched ``(C_in, *S)``; ``w: (C_out, C_in/groups, *K)`` (torch
``OIH``/``OIHW``); ``b: (C_out,)``. Cross-correlation, exactly as ``torch.nn.functional.conv1d/2d``.

Canonical form: ``X`` holds the im2col patches of *all* input channels, channels-last, so
``L = (B, *S_out)`` (``S_out`` alone when unbatched) and ``I = C_in * prod(K)``, feature index
``i = c_in * prod(K) + k`` (``k`` the flat kernel position). ``Y`` is ``y`` channels-last,
``O = C_out``. With ``groups > 1`` the canonical gradient ``M`` is block-structured: output
channel ``o`` of group ``g`` only uses rows of input channels in group ``g``, so ``io_to_params``
reads the diagonal blocks and ignores the others (they are not weights).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.interpreters import ad, batching

from etrace_core.ops.matmul import weight_and_bias_grads
from etrace_core.ops.primitive import primitive_from_reference
from etrace_core.ops.units import strip, strip_bias, with_unit

__all__ = ["conv", "bind_conv", "etp_conv_p", "x_canon", "y_canon", "io_to_params"]

_DIMENSION_NUMBERS = {
    1: ("NCH", "OIH", "NCH"),
    2: ("NCHW", "OIHW", "NCHW"),
    3: ("NCDHW", "OIDHW", "NCDHW"),
}


def torch_kernel(w, w_layout="oi"):
    """The kernel in torch's layout ``(C_out, C_in/groups, *K)``: ``w`` itself for ``'oi'``;
    for ``'io'`` (lax/brainstate channels-last ``(*K, C_in/groups, C_out)``) transposed."""
    if w_layout == "oi":
        return w
    n = w.ndim - 2
    return jnp.transpose(w, (n + 1, n) + tuple(range(n)))


def torch_kernel_shape(shape, w_layout="oi"):
    shape = tuple(shape)
    return shape if w_layout == "oi" else (shape[-1], shape[-2]) + shape[:-2]


def _reference(
    x,
    w,
    *b,
    window_strides,
    padding,
    rhs_dilation,
    feature_group_count,
    has_bias,
    batched,
    w_layout="oi",
    weight_fn=None,
    b_shape=None,
):
    """Plain lax implementation; impl, abstract eval and lowering all derive from it."""
    if weight_fn is not None:
        w = weight_fn(w)
    w = torch_kernel(w, w_layout)
    dtype = jnp.result_type(x, w)
    xb = x if batched else x[None]
    y = lax.conv_general_dilated(
        xb.astype(dtype),
        w.astype(dtype),
        window_strides,
        padding,
        rhs_dilation=rhs_dilation,
        dimension_numbers=_DIMENSION_NUMBERS[w.ndim - 2],
        feature_group_count=feature_group_count,
    )
    if has_bias:
        y = y + b[0].reshape((-1,) + (1,) * (w.ndim - 2))
    return y if batched else y[0]


def _is_int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _int_tuple(value, n, name):
    """An int or a length-``n`` sequence of positive ints, as a tuple."""
    t = (value,) * n if _is_int(value) else tuple(value)
    if len(t) != n or not all(_is_int(v) and v >= 1 for v in t):
        raise ValueError(
            f"conv: {name} must be a positive int or a tuple of {n} positive ints "
            f"(one per spatial dim), got {value!r}"
        )
    return tuple(int(v) for v in t)


def _same_pads(in_sizes, k_sizes, strides, dilations):
    """``'SAME'`` padding: output size ``ceil(S / stride)``, extra pad on the high side."""
    pads = []
    for size, k, s, d in zip(in_sizes, k_sizes, strides, dilations):
        total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        pads.append((total // 2, total - total // 2))
    return tuple(pads)


def normalise_padding(padding, in_sizes, k_sizes, strides, dilations):
    n = len(in_sizes)
    if isinstance(padding, str):
        mode = padding.upper()
        if mode == "VALID":
            return ((0, 0),) * n
        if mode == "SAME":
            return _same_pads(in_sizes, k_sizes, strides, dilations)
        raise ValueError(f"conv: padding string must be 'SAME' or 'VALID', got {padding!r}")
    items = (padding,) * n if _is_int(padding) else tuple(padding)
    if n == 1 and len(items) == 2 and all(_is_int(p) for p in items):
        items = (items,)  # one spatial dim: (lo, hi) is its pair (brainstate's form)
    pads = []
    for p in items:
        pair = (p, p) if _is_int(p) else tuple(p)
        if len(pair) != 2 or not all(_is_int(v) and v >= 0 for v in pair):
            pads = None
            break
        pads.append((int(pair[0]), int(pair[1])))
    if pads is None or len(pads) != n:
        raise ValueError(
            f"conv: padding must be 'SAME', 'VALID', a non-negative int or a tuple "
            f"of {n} non-negative ints (or (lo, hi) pairs), got {padding!r}"
        )
    return tuple(pads)


etp_conv_p = primitive_from_reference("etp_conv", _reference)


def _no_bias(params):
    return {**params, "has_bias": False}


def _jvp_x(dx, x, w, *b, **params):
    y = _reference(dx, w, **_no_bias(params))
    return y.astype(jnp.result_type(x, w, *b))


def _jvp_w(dw, x, w, *b, **params):
    fn = params.get("weight_fn")
    if fn is not None:  # the tangent of fn(w), then the op on it without fn
        _, dw = jax.jvp(fn, (w,), (dw,))
        params = {**params, "weight_fn": None}
    y = _reference(x, dw, **_no_bias(params))
    return y.astype(jnp.result_type(x, w, *b))


def _jvp_b(db, x, w, b, **params):
    shape = jax.eval_shape(lambda *a: _reference(*a, **params), x, w, b).shape
    channel_axis = 1 if params["batched"] else 0
    spatial = (1,) * (len(shape) - channel_axis - 1)
    return jnp.broadcast_to(db.reshape((-1,) + spatial), shape).astype(jnp.result_type(x, w, b))


def _jvp(primals, tangents, **params):
    """Product rule, one linear jnp term per non-zero tangent (x, w, and b if present).

    The tangent is built from jnp ops, so reverse mode transposes it with their own rules.
    """
    y = etp_conv_p.bind(*primals, **params)
    terms = [
        rule(t, *primals, **params)
        for rule, t in zip((_jvp_x, _jvp_w, _jvp_b), tangents)
        if type(t) is not ad.Zero
    ]
    return y, sum(terms[1:], terms[0]) if terms else jnp.zeros_like(y)


ad.primitive_jvps[etp_conv_p] = _jvp


def _batch(args, dims, **params):
    """vmap: a mapped x only stays one primitive (merged into the batch); else the reference."""
    x_dim, *rest = dims
    if all(d is None for d in rest):
        x = jnp.moveaxis(args[0], x_dim, 0)
        if not params["batched"]:
            return etp_conv_p.bind(x, *args[1:], **{**params, "batched": True}), 0
        n, batch = x.shape[:2]
        y = etp_conv_p.bind(x.reshape((n * batch,) + x.shape[2:]), *args[1:], **params)
        return y.reshape((n, batch) + y.shape[1:]), 0
    fn = lambda *a: _reference(*a, **params)
    return jax.vmap(fn, in_axes=tuple(dims))(*args), 0


batching.primitive_batchers[etp_conv_p] = _batch


def conv(
    x,
    w,
    b=None,
    *,
    stride=1,
    padding="SAME",
    dilation=1,
    groups=1,
    strides=None,
    bias=None,
    dimension_numbers=None,
):
    """torch-style channels-first 1-D/2-D/3-D convolution (cross-correlation) ``+ b``.

    ``strides=`` and ``bias=`` are braintrace's keywords for ``stride`` and ``b``.
    ``dimension_numbers`` (lax's ``(lhs, rhs, out)`` strings, e.g. ``('NWC', 'WIO', 'NWC')``)
    selects channels-last data (``N...C``; moved to channels-first around the op, a
    relabelling the compiler follows) and/or a channels-last kernel ``(*K, C_in/groups,
    C_out)`` (``...IO``; the op reads it in place, so it stays the traced operand). The
    default is torch's ``NC...`` / ``OI...``.

    ``padding``: ``'SAME'`` (output size ``ceil(S / stride)``; for stride 1 equals torch
    ``'same'``), ``'VALID'``, an int, or a tuple with one int (or ``(lo, hi)`` pair) per
    spatial dim.
    """
    if strides is not None:
        stride = strides
    if bias is not None:
        if b is not None:
            raise ValueError("conv: pass the bias once, as b or as bias=")
        b = bias
    (x, w), unit = strip(x, w)
    b = None if b is None else strip_bias(b, unit)
    channels_last, w_layout = _layouts(dimension_numbers, jnp.ndim(w) - 2)
    if channels_last:  # (B, *S, C) -> (B, C, *S) and back: relabelling only
        x = jnp.asarray(x)
        axis = x.ndim - (jnp.ndim(w) - 2) - 1
        y = bind_conv(jnp.moveaxis(x, -1, axis), w, b, stride, padding, dilation, groups, w_layout)
        return with_unit(jnp.moveaxis(y, axis, -1), unit)
    return with_unit(bind_conv(x, w, b, stride, padding, dilation, groups, w_layout), unit)


def _layouts(dimension_numbers, n):
    """(channels-last data?, kernel layout 'oi' or 'io') from lax-style dimension numbers."""
    if dimension_numbers is None:
        return False, "oi"
    try:
        lhs, rhs, out = (str(s).upper() for s in dimension_numbers)
    except (TypeError, ValueError):
        lhs = rhs = out = None
    first = ("NC", "OI")
    ok = (
        lhs is not None
        and len(lhs) == len(rhs) == len(out) == n + 2
        and lhs == out
        and lhs[0] == "N"
        and (lhs[1] == "C" or lhs[-1] == "C")
        and (rhs[:2] == first[1] or rhs[-2:] == "IO")
    )
    if not ok:
        from etrace_core.compiler.errors import NotSupportedError  # (compiler imports ops)

        raise NotSupportedError(
            f"conv: dimension_numbers {dimension_numbers!r} not supported; give "
            "(lhs, rhs, out) strings with lhs == out in 'NC...' or 'N...C' and rhs "
            f"'OI...' or '...IO' for {n} spatial dims, e.g. ('NWC', 'WIO', 'NWC')"
        )
    return lhs[-1] == "C" and lhs[1] != "C", "oi" if rhs[:2] == "OI" else "io"


def bind_conv(
    x, w, b, stride, padding, dilation, groups, w_layout="oi", weight_fn=None, flat_bias=False
):
    """The checked ``etp_conv`` bind. ``weight_fn`` (an ``ElementFn`` keeping ``w``'s shape) is
    applied to the kernel inside the op (``w`` stays the traced operand); ``flat_bias``: ``b``
    may have any shape with ``C_out`` elements (e.g. brainstate's ``(1, ..., 1, C_out)``)."""
    x, w = jnp.asarray(x), jnp.asarray(w)
    b = None if b is None else jnp.asarray(b)
    b_shape = None
    if flat_bias and b is not None and b.ndim != 1:
        b_shape, b = tuple(b.shape), b
    w_stored = w
    w = jax.ShapeDtypeStruct(torch_kernel_shape(w.shape, w_layout), w.dtype)  # checks only
    if w.ndim not in (3, 4, 5):
        raise ValueError(
            "conv: w must have shape (C_out, C_in/groups, *K) with 1, 2 or 3 "
            f"spatial dims (torch OIH / OIHW / OIDHW), got shape {w.shape}"
        )
    n = w.ndim - 2
    if x.ndim not in (n + 1, n + 2):
        raise ValueError(
            f"conv: for a {n}-D kernel x must have shape (B, C_in, *S) or (C_in, *S) "
            f"with {n} spatial dims, got shape {x.shape}"
        )
    batched = x.ndim == n + 2
    c_in, c_out = x.shape[int(batched)], w.shape[0]
    if not _is_int(groups) or groups < 1 or c_in % groups or c_out % groups:
        raise ValueError(
            f"conv: groups must be a positive int dividing C_in={c_in} and "
            f"C_out={c_out}, got {groups!r}"
        )
    if w.shape[1] != c_in // groups:
        raise ValueError(
            f"conv: w must have shape (C_out, C_in/groups, *K) = "
            f"({c_out}, {c_in // groups}, ...) for x with C_in={c_in} and "
            f"groups={groups}, got w of shape {w.shape}"
        )
    if b is not None and (b.shape if b_shape is None else (b.size,)) != (c_out,):
        raise ValueError(f"conv: b must have shape (C_out,) = ({c_out},), got {b.shape}")
    strides = _int_tuple(stride, n, "stride")
    dilations = _int_tuple(dilation, n, "dilation")
    in_sizes, k_sizes = x.shape[x.ndim - n :], w.shape[2:]
    pads = normalise_padding(padding, in_sizes, k_sizes, strides, dilations)
    for size, k, s, d, (lo, hi) in zip(in_sizes, k_sizes, strides, dilations, pads):
        if size + lo + hi < (k - 1) * d + 1:
            raise ValueError(
                f"conv: padded input size {size + lo + hi} is smaller than the "
                f"dilated kernel size {(k - 1) * d + 1} (x {x.shape}, w {w.shape})"
            )
    operands = (x, w_stored) if b is None else (x, w_stored, b)
    extra = {} if w_layout == "oi" else {"w_layout": w_layout}  # torch layout: no extra param
    if weight_fn is not None:
        extra["weight_fn"] = weight_fn
    if b_shape is not None:
        extra["b_shape"] = b_shape
    return etp_conv_p.bind(
        *operands,
        window_strides=strides,
        padding=pads,
        rhs_dilation=dilations,
        feature_group_count=int(groups),
        has_bias=b is not None,
        batched=batched,
        **extra,
    )


def x_canon(params, x, w):
    """im2col patches of all input channels, channels-last: ``(B, *S_out, C_in * prod(K))``.

    Only ``w.shape`` is read, so an abstract value works for ``w``.
    """
    xb = x if params["batched"] else x[None]
    k_shape = torch_kernel_shape(w.shape, params.get("w_layout", "oi"))
    patches = lax.conv_general_dilated_patches(
        xb,
        tuple(k_shape[2:]),
        params["window_strides"],
        params["padding"],
        rhs_dilation=params["rhs_dilation"],
        dimension_numbers=_DIMENSION_NUMBERS[len(k_shape) - 2],
        precision=lax.Precision.HIGHEST,
    )
    patches = jnp.moveaxis(patches, 1, -1)
    return patches if params["batched"] else patches[0]


def y_canon(params, y):
    """Output with the channel axis moved last: ``(B, *S_out, C_out)`` or ``(*S_out, C_out)``."""
    return jnp.moveaxis(y, 1 if params["batched"] else 0, -1)


def io_to_params(params, w, M):
    """Map a canonical ``(C_in*prod(K)[+1], C_out)`` gradient to ``(dw, db)`` in torch layout."""
    groups, has_bias = params["feature_group_count"], params["has_bias"]
    layout = params.get("w_layout", "oi")
    t_shape = torch_kernel_shape(w.shape, layout)
    c_out, c_group = t_shape[:2]
    k = math.prod(t_shape[2:])
    i = groups * c_group * k
    if M.shape != (i + has_bias, c_out):
        raise ValueError(
            f"conv.io_to_params: M must have shape (C_in*prod(K)"
            f"{'+1' if has_bias else ''}, C_out) = {(i + has_bias, c_out)}, "
            f"got {M.shape}"
        )
    blocks = M[:i].reshape(groups, c_group, k, groups, c_out // groups)
    g = np.arange(groups)
    diagonal = blocks[g, :, :, g, :]
    dw = jnp.transpose(diagonal, (0, 3, 1, 2)).reshape(t_shape)
    if layout == "io":  # back to (*K, C_in/groups, C_out)
        n = len(t_shape) - 2
        dw = jnp.transpose(dw, tuple(range(2, n + 2)) + (1, 0))
    return weight_and_bias_grads(params, w, dw, M, i)
