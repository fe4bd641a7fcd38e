"""ETP low-rank (LoRA) op ``y = alpha * x @ b_fn(B) @ a_fn(A) (+ bias_fn(b))``, two primitives.

``etp_lora_mm`` (batched ``x (N, I)``) and ``etp_lora_mv`` (unbatched ``x (I,)``), braintrace's
names; operands ``(x, B (I, r), A (r, O)[, b (O,)])``. Both factors are traced weights, so one
equation gives two relations (one per factor), each with its own canonical form:

- ``B`` (operand 1): ``X = x``, and the canonical weight is the effective matrix
  ``W = alpha b_fn(B) a_fn(A)`` ``(I, O)``: ``y = x W`` is a dense matmul in ``W``, whose
  column ``o`` drives only output ``o``, so its trace follows the hidden Jacobian D exactly.
  A trace shaped like ``B`` cannot: D acts on the output axis, which ``B`` lacks. The gradient
  ``M = dL/dW`` maps back by the chain rule, ``dB = b_fn'^T (alpha M a_fn(A)^T)``; that map
  is linear in ``M``, so a sum of ``M`` over steps maps exactly while ``A`` stays fixed.
- ``A`` (operand 2): ``X = alpha x @ b_fn(B)`` ``(r,)``, canonical weight ``a_fn(A)`` ``(r, O)``
  (an ordinary matmul in ``A``); ``dA = a_fn'^T M``.

The bias rides as the extra canonical row of the ``B`` relation (of ``A``'s when ``B`` is not
traced); its gradient is pulled back through ``bias_fn``. The two relations share their output
``y``, so io-dim traces keep one output-side trace for both.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.interpreters import ad, batching

from etrace_core.ops.elementwise import ElementFn
from etrace_core.ops.primitive import primitive_from_reference
from etrace_core.ops.units import strip, strip_bias, with_unit

__all__ = [
    "lora_matmul",
    "etp_lora_mm_p",
    "etp_lora_mv_p",
    "LORA_PRIMITIVES",
    "x_canon_b",
    "x_canon_a",
    "y_canon",
    "io_to_params_b",
    "io_to_params_a",
]


def _apply(fn, v):
    return v if fn is None else fn(v)


def _reference(x, B, A, *b, alpha, has_bias, b_fn=None, a_fn=None, bias_fn=None):
    """Plain jnp implementation; impl, abstract eval and lowering all derive from it."""
    y = alpha * jnp.matmul(jnp.matmul(x, _apply(b_fn, B)), _apply(a_fn, A))
    if has_bias:
        y = y + _apply(bias_fn, b[0])
    return y


etp_lora_mm_p = primitive_from_reference("etp_lora_mm", _reference)
etp_lora_mv_p = primitive_from_reference("etp_lora_mv", _reference)
LORA_PRIMITIVES = (etp_lora_mm_p, etp_lora_mv_p)


def _tangent(fn, v, dv):
    """The tangent of ``fn(v)`` along ``dv`` (``dv`` itself without ``fn``)."""
    return dv if fn is None else jax.jvp(fn, (v,), (dv,))[1]


def _define_rules(prim):
    def jvp(primals, tangents, *, alpha, has_bias, b_fn=None, a_fn=None, bias_fn=None):
        """Product rule, one linear jnp term per non-zero tangent (transposed by jnp's rules)."""
        params = dict(alpha=alpha, has_bias=has_bias, b_fn=b_fn, a_fn=a_fn, bias_fn=bias_fn)
        y = prim.bind(*primals, **params)
        x, B, A = primals[:3]
        Bf, Af = _apply(b_fn, B), _apply(a_fn, A)
        dx, dB, dA = tangents[:3]
        terms = []
        if type(dx) is not ad.Zero:
            terms.append(alpha * jnp.matmul(jnp.matmul(dx, Bf), Af))
        if type(dB) is not ad.Zero:
            terms.append(alpha * jnp.matmul(jnp.matmul(x, _tangent(b_fn, B, dB)), Af))
        if type(dA) is not ad.Zero:
            terms.append(alpha * jnp.matmul(jnp.matmul(x, Bf), _tangent(a_fn, A, dA)))
        if has_bias and type(tangents[3]) is not ad.Zero:
            terms.append(jnp.broadcast_to(_tangent(bias_fn, primals[3], tangents[3]), y.shape))
        if not terms:
            return y, jnp.zeros_like(y)
        return y, sum((t.astype(y.dtype) for t in terms[1:]), terms[0].astype(y.dtype))

    ad.primitive_jvps[prim] = jvp

    def batch(args, dims, **params):
        """vmap: a mapped x only stays one (batched) primitive; else the jnp reference."""
        x_dim, *rest = dims
        if all(d is None for d in rest):
            return etp_lora_mm_p.bind(jnp.moveaxis(args[0], x_dim, 0), *args[1:], **params), 0
        fn = lambda *a: _reference(*a, **params)  # noqa: E731
        return jax.vmap(fn, in_axes=tuple(dims))(*args), 0

    batching.primitive_batchers[prim] = batch


for _p in LORA_PRIMITIVES:
    _define_rules(_p)


def _hook(name, fn, shape, dtype):
    """``fn`` as a hashable primitive parameter, after checking it keeps ``shape``."""
    if fn is None:
        return None
    if not callable(fn):
        raise ValueError(f"lora_matmul: {name} must be callable, got {fn!r}")
    out = getattr(jax.eval_shape(fn, jax.ShapeDtypeStruct(shape, dtype)), "shape", None)
    if tuple(out or ()) != tuple(shape):
        raise ValueError(
            f"lora_matmul: {name} must keep its operand's shape {tuple(shape)}, got {out}"
        )
    return fn if isinstance(fn, ElementFn) else ElementFn(fn)


def lora_matmul(x, B, A, *, alpha=1.0, bias=None, b_fn=None, a_fn=None, bias_fn=None):
    """``alpha * x @ b_fn(B) @ a_fn(A) + bias_fn(bias)`` with ``B`` and ``A`` traced weights.

    braintrace's signature. ``x`` is ``(batch, I)`` (``etp_lora_mm``) or ``(I,)``
    (``etp_lora_mv``); higher-rank ``x`` is a ValueError (fold the extra axes into the batch).
    ``B`` is ``(I, r)``, ``A`` ``(r, O)``, ``bias`` ``(O,)``; ``alpha`` a static scalar. The
    hooks act element-wise on their operand and keep its shape (pass module-level functions:
    a new lambda per call is a new primitive parameter). brainunit quantities work: the
    output's unit is unit(x) * unit(B) * unit(A), and ``bias`` must carry it.
    """
    (xv, Bv, Av), unit = strip(x, B, A)
    xv, Bv, Av = jnp.asarray(xv), jnp.asarray(Bv), jnp.asarray(Av)
    if xv.ndim not in (1, 2):
        raise ValueError(
            f"lora_matmul: x must be (batch, in_features) or (in_features,), got x.ndim="
            f"{xv.ndim} (shape {xv.shape}); reshape or vmap over the extra axes first"
        )
    if Bv.ndim != 2 or Av.ndim != 2 or Bv.shape[1] != Av.shape[0]:
        raise ValueError(
            f"lora_matmul: B must be (in_features, rank) and A (rank, out_features) with the "
            f"same rank, got B of shape {Bv.shape} and A of shape {Av.shape}"
        )
    if xv.shape[-1] != Bv.shape[0]:
        raise ValueError(
            f"lora_matmul: x's last dim {xv.shape[-1]} must equal B's first dim "
            f"(in_features = {Bv.shape[0]}); got x of shape {xv.shape}, B of shape {Bv.shape}"
        )
    out = Av.shape[1]
    params = dict(
        alpha=float(alpha),
        has_bias=bias is not None,
        b_fn=_hook("b_fn", b_fn, Bv.shape, Bv.dtype),
        a_fn=_hook("a_fn", a_fn, Av.shape, Av.dtype),
        bias_fn=None,
    )
    operands = [xv, Bv, Av]
    if bias is not None:
        bv = jnp.asarray(strip_bias(bias, unit))
        if bv.shape != (out,):
            raise ValueError(f"lora_matmul: bias must have shape (O,) = ({out},), got {bv.shape}")
        params["bias_fn"] = _hook("bias_fn", bias_fn, bv.shape, bv.dtype)
        operands.append(bv)
    elif bias_fn is not None:
        raise ValueError("lora_matmul: bias_fn given without a bias")
    prim = etp_lora_mm_p if xv.ndim == 2 else etp_lora_mv_p
    return with_unit(prim.bind(*operands, **params), unit)


# ---- canonical-form rules (see etrace_core.ops.rules); `w` is the operand tuple (B, A[, b]) ----


def y_canon(params, y):
    """Canonical output ``Y = y`` (for both factors)."""
    return y


def x_canon_b(params, x, w):
    """``B``'s canonical input: ``x`` itself (the canonical weight is ``alpha b_fn(B) a_fn(A)``)."""
    return x


def x_canon_a(params, x, w):
    """``A``'s canonical input: ``alpha x @ b_fn(B)``, shape ``L + (r,)``."""
    return params["alpha"] * jnp.matmul(x, _apply(params.get("b_fn"), w[0]))


def _pull_back(fn, v, cot):
    """``fn'(v)^T cot`` (``cot`` itself without ``fn``)."""
    if fn is None:
        return cot
    return jax.vjp(fn, v)[1](cot.astype(jnp.result_type(v)))[0]


def _bias_grad(params, w, M, row: int):
    if not params["has_bias"]:
        return None
    b = w[2] if len(w) > 2 else None
    fn = params.get("bias_fn")
    return M[row] if (fn is None or b is None) else _pull_back(fn, b, M[row])


def _check_m(name, M, rows, cols, has_bias):
    want = (rows + has_bias, cols)
    if tuple(M.shape) != want:
        raise ValueError(f"lora.{name}: M must have shape {want}, got {tuple(M.shape)}")


def io_to_params_b(params, w, M):
    """``(dB, db)`` from ``M = dL/dW`` (``(I[+1], O)``) of the effective matrix ``W``."""
    B, A = w[0], w[1]
    i = np.shape(B)[0]
    _check_m("io_to_params_b", M, i, np.shape(A)[1], params["has_bias"])
    A_eff = _apply(params.get("a_fn"), A)
    dB = _pull_back(params.get("b_fn"), B, params["alpha"] * (M[:i] @ A_eff.T.astype(M.dtype)))
    return dB, _bias_grad(params, w, M, i)


def io_to_params_a(params, w, M):
    """``(dA, db)`` from ``M = dL/da_fn(A)`` (``(r[+1], O)``)."""
    A = w[1]
    r = np.shape(A)[0]
    _check_m("io_to_params_a", M, r, np.shape(A)[1], params["has_bias"])
    return _pull_back(params.get("a_fn"), A, M[:r]), _bias_grad(params, w, M, r)
