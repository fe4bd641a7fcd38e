"""ETP dense op ``y = x @ w (+ b)`` as one JAX primitive, and its canonical-form rules.

The weight keeps the layout it has in the model (``'io'``: ``(I, O)``; ``'oi'``: ``(O, I)``, the
torch ``Linear`` layout), so the compiler finds the parameter array itself as an operand.
"""

import brainunit as u
import jax
import jax.numpy as jnp
from jax.interpreters import ad, batching

from etrace_core.ops.elementwise import ElementFn
from etrace_core.ops.primitive import primitive_from_reference
from etrace_core.ops.units import strip, strip_bias, with_unit

__all__ = [
    "matmul",
    "bind_matmul",
    "etp_matmul_p",
    "x_canon",
    "y_canon",
    "io_to_params",
    "factors_to_params",
]

_LAYOUTS = ("io", "oi")


def _reference(x, w, *b, w_layout, has_bias, weight_fn=None, b_shape=None):
    """Plain jnp implementation; impl, abstract eval and lowering all derive from it."""
    if weight_fn is not None:
        w = weight_fn(w)
    y = jnp.matmul(x, w if w_layout == "io" else w.T)
    if has_bias:
        y = y + (b[0] if b_shape is None else b[0].reshape(-1))
    return y


def _io_sizes(w_shape, w_layout):
    i, o = w_shape
    return (i, o) if w_layout == "io" else (o, i)


def _matrix_shape(w, weight_fn):
    """Shape of the matrix the op multiplies by: ``weight_fn(w)``'s, else ``w``'s."""
    if weight_fn is None:
        return tuple(jnp.shape(w))
    return tuple(jax.eval_shape(weight_fn, jax.ShapeDtypeStruct(jnp.shape(w), w.dtype)).shape)


def _check(x, w_shape, b, w_layout):
    if w_layout not in _LAYOUTS:
        raise ValueError(f"matmul: w_layout must be 'io' or 'oi', got {w_layout!r}")
    expected = "(I, O)" if w_layout == "io" else "(O, I)"
    if len(w_shape) != 2:
        raise ValueError(
            f"matmul: w must have shape {expected} for w_layout={w_layout!r}, got shape {w_shape}"
        )
    i, o = _io_sizes(w_shape, w_layout)
    if jnp.ndim(x) < 1 or jnp.shape(x)[-1] != i:
        raise ValueError(
            f"matmul: x must have shape (..., I) with I={i} to match w of shape "
            f"{w_shape} = {expected} (w_layout={w_layout!r}), "
            f"got x of shape {jnp.shape(x)}"
        )
    if b is not None and jnp.shape(b) != (o,):
        raise ValueError(f"matmul: b must have shape (O,) = ({o},), got {jnp.shape(b)}")


etp_matmul_p = primitive_from_reference("etp_matmul", _reference)


def _jvp_x(dx, x, w, *b, w_layout, has_bias, weight_fn=None, b_shape=None):
    y = _reference(dx, w, w_layout=w_layout, has_bias=False, weight_fn=weight_fn)
    return y.astype(jnp.result_type(x, w, *b))


def _jvp_w(dw, x, w, *b, w_layout, has_bias, weight_fn=None, b_shape=None):
    if weight_fn is not None:
        _, dw = jax.jvp(weight_fn, (w,), (dw,))
    y = _reference(x, dw, w_layout=w_layout, has_bias=False)
    return y.astype(jnp.result_type(x, w, *b))


def _jvp_b(db, x, w, b, *, w_layout, has_bias, weight_fn=None, b_shape=None):
    o = _io_sizes(_matrix_shape(w, weight_fn), w_layout)[1]
    shape = jnp.shape(x)[:-1] + (o,)
    return jnp.broadcast_to(db.reshape(-1), shape).astype(jnp.result_type(x, w, b))


def _jvp(primals, tangents, **params):
    """Product rule, one linear jnp term per non-zero tangent (x, w, and b if present).

    The tangent is built from jnp ops, so reverse mode transposes it with their own rules.
    """
    y = etp_matmul_p.bind(*primals, **params)
    terms = [
        rule(t, *primals, **params)
        for rule, t in zip((_jvp_x, _jvp_w, _jvp_b), tangents)
        if type(t) is not ad.Zero
    ]
    return y, sum(terms[1:], terms[0]) if terms else jnp.zeros_like(y)


ad.primitive_jvps[etp_matmul_p] = _jvp


def _batch(args, dims, *, w_layout, has_bias, weight_fn=None, b_shape=None):
    """vmap: a mapped x only stays one primitive (extra leading dim); else the jnp reference."""
    x_dim, *rest = dims
    if all(d is None for d in rest):
        x = jnp.moveaxis(args[0], x_dim, 0)
        extra = {} if weight_fn is None else {"weight_fn": weight_fn}
        if b_shape is not None:
            extra["b_shape"] = b_shape
        return etp_matmul_p.bind(x, *args[1:], w_layout=w_layout, has_bias=has_bias, **extra), 0
    fn = lambda *a: _reference(
        *a, w_layout=w_layout, has_bias=has_bias, weight_fn=weight_fn, b_shape=b_shape
    )
    return jax.vmap(fn, in_axes=tuple(dims))(*args), 0


batching.primitive_batchers[etp_matmul_p] = _batch


def matmul(x, w, b=None, *, w_layout="io", bias=None, weight_fn=None):
    """``x @ w + b`` (``'io'``, ``w: (I, O)``) or ``x @ w.T + b`` (``'oi'``, ``w: (O, I)``).

    ``x`` is ``(..., I)`` with any number of leading dims (also none); ``b`` (or ``bias=``,
    braintrace's keyword) is ``(O,)`` or None. ``weight_fn`` (a JAX function keeping ``w``'s
    shape, e.g. a mask or a sign constraint) makes the op ``x @ weight_fn(w) + b`` with ``w``
    itself the trained parameter. brainunit quantities work: the output's unit is
    unit(x) * unit(w), and ``b`` must carry it.
    """
    if bias is not None:
        if b is not None:
            raise ValueError("matmul: pass the bias once, as b or as bias=")
        b = bias
    fn = None
    if weight_fn is not None:
        if not callable(weight_fn):
            raise ValueError(f"matmul: weight_fn must be callable, got {weight_fn!r}")
        w_val = jnp.asarray(u.get_mantissa(w))
        w_shape = w_val.shape
        shape = getattr(jax.eval_shape(weight_fn, w_val), "shape", None)
        if shape != w_shape:
            raise ValueError(f"matmul: weight_fn must keep w's shape {w_shape}, got {shape}")
        fn = ElementFn(weight_fn)
    return bind_matmul(x, w, b, w_layout, fn)


def bind_matmul(x, w, b, w_layout, fn, flat_bias=False):
    """``x @ fn(w) (+ b)`` as one ``etp_matmul`` with ``w`` the traced operand; ``fn`` (an
    ``ElementFn`` or None) may map ``w`` to a matrix of another shape (a sparse weight's
    stored values to its dense matrix), the gradient is pulled back through it.
    ``flat_bias``: ``b`` may have any shape with ``O`` elements (flattened in the product)."""
    (x, w), unit = strip(x, w)
    b = None if b is None else jnp.asarray(strip_bias(b, unit))
    x, w = jnp.asarray(x), jnp.asarray(w)
    extra = {} if fn is None else {"weight_fn": fn}  # plain matmuls keep their two params
    if flat_bias and b is not None and b.ndim != 1:
        extra["b_shape"] = tuple(b.shape)
    flat = b if (b is None or not flat_bias) else b.reshape(-1)  # only flat_bias reshapes
    _check(x, _matrix_shape(w, fn), flat, w_layout)
    operands = (x, w) if b is None else (x, w, b)
    y = etp_matmul_p.bind(*operands, w_layout=w_layout, has_bias=b is not None, **extra)
    return with_unit(y, unit)


def x_canon(params, x, w):
    """Canonical input ``X = x``: ``L`` is the leading dims of ``x``, ``I`` its last dim."""
    return x


def y_canon(params, y):
    """Canonical output ``Y = y``: column ``o`` of ``y`` depends only on column ``o`` of W."""
    return y


def io_to_params(params, w, M):
    """Map a canonical ``(I[+1], O)`` gradient to ``(dw, db)``, ``dw`` in ``w``'s layout."""
    layout, has_bias = params["w_layout"], params["has_bias"]
    fn = params.get("weight_fn")
    i, o = _io_sizes(_matrix_shape(w, fn), layout)
    if M.shape != (i + has_bias, o):
        raise ValueError(
            f"matmul.io_to_params: M must have shape (I{'+1' if has_bias else ''}, O)"
            f" = {(i + has_bias, o)}, got {M.shape}"
        )
    return weight_and_bias_grads(params, w, M[:i] if layout == "io" else M[:i].T, M, i)


def factors_to_params(params, w, A, B):
    """``io_to_params(params, w, A^T B)`` contracted in ``w``'s own layout: ``A`` is ``(..., N,
    I[+1])`` (inputs, bias column last), ``B`` ``(..., N, O)``; the leading axes are summed too.

    For ``'oi'`` (torch's ``(O, I)``) ``dw = B^T A[:, :I]`` and ``db = B^T A[:, I]``: the same
    sums as the canonical ``(I + 1, O)`` matrix, without transposing and splitting it after."""
    layout, has_bias = params["w_layout"], params["has_bias"]
    i, o = _io_sizes(_matrix_shape(w, params.get("weight_fn")), layout)
    if A.shape[-1] != i + has_bias or B.shape[-1] != o:
        raise ValueError(
            f"matmul.factors_to_params: A must be (..., N, {i + has_bias}) and B (..., N, {o}), "
            f"got {A.shape} and {B.shape}"
        )
    # kept as (1, N, .) contracted over two axes: XLA on CPU then lays B out transposed in the
    # fusion that produces it and runs a plain (O, N) x (N, I) product on its fast matmul path;
    # a 2-D product contracting axis 0 of both is kept as such and runs on a slower one.
    A = A.reshape((1, -1, A.shape[-1]))
    B = B.reshape((1, -1, B.shape[-1]))
    X = A[..., :i] if has_bias else A
    if layout == "oi":
        dw = jnp.einsum("kno,kni->oi", B, X)
    else:
        dw = jnp.einsum("kni,kno->io", X, B)
    db = jnp.einsum("kno,kn->o", B, A[..., i]) if has_bias else None
    return pull_back(params, w, dw, db)


def weight_and_bias_grads(params, w, dw, M, i: int):
    """``(dw, db)`` of an ETP op's ``io_to_params``: `dw` (the gradient w.r.t. ``weight_fn(w)``
    in `w`'s layout) pulled back to `w` through ``params['weight_fn']``, and the bias gradient
    from row `i` of the canonical `M` (None without a bias), in ``params['b_shape']``."""
    return pull_back(params, w, dw, M[i] if params["has_bias"] else None)


def pull_back(params, w, dw, db):
    """``(dw, db)``: `dw` (w.r.t. ``weight_fn(w)``, in `w`'s layout) pulled back to `w` through
    ``params['weight_fn']``; the bias gradient `db` (flat, or None) in ``params['b_shape']``."""
    fn = params.get("weight_fn")
    if fn is not None:
        dw = jax.vjp(fn, w)[1](dw.astype(jnp.result_type(w)))[0]
    if not params["has_bias"]:
        return dw, None
    b_shape = params.get("b_shape")
    return dw, (db if b_shape is None else db.reshape(b_shape))
