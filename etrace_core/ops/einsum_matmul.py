"""ETP einsum ``y = einsum('x_spec,w_spec->y_spec', x, weight_fn(w))`` as one dense ETP matmul.

braintrace's two-operand, batched-form equation (the leading letter of ``x_spec`` leads
``y_spec`` and is absent from ``w_spec``). Every letter has one role:

- batch and *shared* letters (in ``x`` and ``y``, not in ``w``): the weight is reused along
  them, they become the canonical leading axes ``L``;
- *head* (diagonal) letters ``H`` (in ``x``, ``w`` and ``y``): one block of the weight each;
- *contracted* letters ``K`` (in ``x`` and ``w``, not in ``y``): with the heads, the
  canonical input axis ``I = H*K``;
- *output* letters ``O`` (in ``w`` and ``y``, not in ``x``): with the heads, the canonical
  output axis ``H*O``;
- letters of ``x`` alone are summed out of ``x`` first (a linear map of the input).

So the op is ``X (L, H*K) @ blockdiag_H(W (K, O)) -> (L, H*O)``: ``x`` is summed and transposed
into ``X``, the result is reshaped and transposed into ``y`` (relabellings the compiler
follows), and the placement ``w -> blockdiag`` is the weight function of ``etp_matmul``, whose
gradient rule pulls the canonical gradient back through it. Exact; the trace has the dense
``(H*K, H*O)`` size, ``H`` times the weight's.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from etrace_core.ops.elementwise import ElementFn
from etrace_core.ops.matmul import bind_matmul
from etrace_core.ops.units import strip, with_unit

__all__ = ["einsum", "EinsumSpec", "parse_equation", "EinsumPlacement"]

_SUPPORTED = (
    "supported: two operands 'x_spec,w_spec->y_spec' of distinct lowercase letters, the "
    "leading letter of x_spec leading y_spec (the batch axis) and absent from w_spec, every "
    "output letter in x or the weight, every weight letter in x or the output"
)


class EinsumSpec(NamedTuple):
    """An equation's specs and the role of each letter (strings of letters, in spec order)."""

    x_spec: str
    w_spec: str
    y_spec: str
    batch: str
    shared: str  # in x and y, not in w (batch excluded), y's order
    heads: str  # in x, w and y, w's order
    contracted: str  # in x and w, not in y, w's order
    outputs: str  # in w and y, not in x, w's order
    summed: str  # in x only

    @property
    def equation(self) -> str:
        return f"{self.x_spec},{self.w_spec}->{self.y_spec}"


def _refuse(equation, problem):
    raise ValueError(f"einsum({equation!r}): {problem}; {_SUPPORTED}")


def parse_equation(equation: str) -> EinsumSpec:
    """Check ``equation`` (spaces ignored) and classify its letters; ValueError naming the
    equation, the offending part and what is supported for anything else."""
    if not isinstance(equation, str):
        raise ValueError(f"einsum: the equation must be a string, got {equation!r}; {_SUPPORTED}")
    eq = equation.replace(" ", "")
    if "->" not in eq:
        _refuse(equation, "the output spec is missing (implicit equations are not supported)")
    lhs, y_spec = eq.split("->", 1)
    operands = lhs.split(",")
    if len(operands) != 2:
        _refuse(equation, f"{len(operands)} operand(s); exactly two (x, weight) are needed")
    x_spec, w_spec = operands
    for name, s in (("x", x_spec), ("weight", w_spec), ("output", y_spec)):
        bad = sorted({c for c in s if not ("a" <= c <= "z")})
        if not s or bad:
            what = f"characters {bad}" if bad else "an empty spec"
            _refuse(equation, f"the {name} spec {s!r} has {what} (no ellipsis, digits, capitals)")
        repeated = sorted({c for c in s if s.count(c) > 1})
        if repeated:
            _refuse(equation, f"axis {repeated[0]!r} repeats in the {name} spec {s!r}")
    batch = x_spec[0]
    if y_spec[0] != batch:
        _refuse(
            equation,
            f"the output spec {y_spec!r} does not lead with x's leading (batch) axis {batch!r}",
        )
    if batch in w_spec:
        _refuse(equation, f"the batch axis {batch!r} appears in the weight spec {w_spec!r}")
    for c in y_spec:
        if c not in x_spec and c not in w_spec:
            _refuse(equation, f"output axis {c!r} appears in neither x nor the weight")
    for c in w_spec:
        if c not in x_spec and c not in y_spec:
            _refuse(
                equation,
                f"weight axis {c!r} appears in neither x nor the output (a sum over the "
                "weight alone)",
            )
    return EinsumSpec(
        x_spec,
        w_spec,
        y_spec,
        batch,
        shared="".join(c for c in y_spec[1:] if c in x_spec and c not in w_spec),
        heads="".join(c for c in w_spec if c in x_spec and c in y_spec),
        contracted="".join(c for c in w_spec if c in x_spec and c not in y_spec),
        outputs="".join(c for c in w_spec if c not in x_spec),
        summed="".join(c for c in x_spec if c not in w_spec and c not in y_spec),
    )


class EinsumPlacement(ElementFn):
    """``w (w_spec) -> blockdiag_H(fn(w) as (H, K, O))``, the ``(H*K, H*O)`` matrix of the op.

    Hashable by value (the permutation, the block sizes and ``fn``), so it can be a primitive
    parameter and equal equations give equal jaxpr equations.
    """

    __slots__ = ("perm", "blocks", "elem_fn")

    def __init__(self, perm: tuple[int, ...], blocks: tuple[int, int, int], elem_fn=None):
        self.perm = tuple(int(p) for p in perm)
        self.blocks = tuple(int(b) for b in blocks)
        self.elem_fn = elem_fn
        super().__init__(self._dense)

    def _dense(self, w):
        v = w if self.elem_fn is None else self.elem_fn(w)
        h, k, o = self.blocks
        v = jnp.transpose(v, self.perm).reshape(h, k, o)
        if h == 1:
            return v[0]
        eye = jnp.eye(h, dtype=v.dtype)
        return jnp.einsum("hko,hg->hkgo", v, eye).reshape(h * k, h * o)

    def __eq__(self, other):
        return (
            isinstance(other, EinsumPlacement)
            and (other.perm, other.blocks) == (self.perm, self.blocks)
            and other.elem_fn is self.elem_fn
        )

    def __hash__(self):
        return hash((self.perm, self.blocks, id(self.elem_fn)))

    def __repr__(self):
        return f"einsum_placement{self.blocks}"


def _sizes(spec: EinsumSpec, x_shape, w_shape) -> dict[str, int]:
    """Size of every letter; ValueError for a rank or size that does not match the equation."""
    eq = spec.equation
    for name, s, shape in (("x", spec.x_spec, x_shape), ("weight", spec.w_spec, w_shape)):
        if len(shape) != len(s):
            raise ValueError(
                f"einsum({eq!r}): {name} has shape {tuple(shape)} (rank {len(shape)}), the "
                f"equation's {name} spec {s!r} needs rank {len(s)}"
            )
    size = dict(zip(spec.x_spec, x_shape))
    for c, n in zip(spec.w_spec, w_shape):
        if size.setdefault(c, n) != n:
            raise ValueError(
                f"einsum({eq!r}): axis {c!r} has size {size[c]} in x and {n} in the weight"
            )
    return size


def einsum(equation, x, weight, *, weight_fn=None):
    """``jnp.einsum(equation, x, weight_fn(weight))`` with ``weight`` the traced ETP weight.

    braintrace's ETP einsum: a two-operand equation in batched form, e.g. ``'bi,io->bo'``
    (dense), ``'bhi,hio->bho'`` (one matrix per head), ``'bti,io->bto'`` (the weight shared
    along ``t``; where ``t`` is summed before the hidden state, the op's relation ends at the
    sum and the compiler's dense trace ``dh/dW`` takes over, as ``show_graph`` says).
    ``weight_fn`` is an element-wise function of the weight (it keeps the weight's shape);
    ``weight`` stays the trained parameter. brainunit quantities work: the output's unit is
    unit(x) * unit(weight). No bias: add one after the op. Any other equation raises
    ValueError naming the equation, the offending axis and what is supported.
    """
    spec = parse_equation(equation)
    (x, w), unit = strip(x, weight)
    x, w = jnp.asarray(x), jnp.asarray(w)
    size = _sizes(spec, x.shape, w.shape)
    fn = None
    if weight_fn is not None:
        if not callable(weight_fn):
            raise ValueError(f"einsum: weight_fn must be callable, got {weight_fn!r}")
        shape = getattr(jax.eval_shape(weight_fn, w), "shape", None)
        if shape != w.shape:
            raise ValueError(
                f"einsum({spec.equation!r}): weight_fn must keep the weight's shape "
                f"{w.shape}, got {shape}"
            )
        fn = weight_fn
    lead = spec.batch + spec.shared
    n = {
        k: math.prod(size[c] for c in getattr(spec, k)) for k in ("heads", "contracted", "outputs")
    }
    # x -> X (L, H*K): sum the letters of x alone, order the rest, flatten heads and contraction
    if spec.summed:
        x = jnp.sum(x, axis=tuple(spec.x_spec.index(c) for c in spec.summed))
    kept = "".join(c for c in spec.x_spec if c not in spec.summed)
    order = lead + spec.heads + spec.contracted
    X = jnp.transpose(x, tuple(kept.index(c) for c in order))
    X = X.reshape(X.shape[: len(lead)] + (n["heads"] * n["contracted"],))
    perm = tuple(spec.w_spec.index(c) for c in spec.heads + spec.contracted + spec.outputs)
    place = EinsumPlacement(perm, (n["heads"], n["contracted"], n["outputs"]), fn)
    Y = bind_matmul(X, w, None, "io", place)
    # Y (L, H*O) -> y: unflatten heads and outputs, then the output spec's order
    done = lead + spec.heads + spec.outputs
    y = Y.reshape(tuple(size[c] for c in done))
    y = jnp.transpose(y, tuple(done.index(c) for c in spec.y_spec))
    return with_unit(y, unit)
