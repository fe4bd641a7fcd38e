"""Canonical-form rules of the ETP primitives: an immutable primitive -> OpRule lookup.

Every rule function takes the primitive's ``params`` (``eqn.params`` in a jaxpr) first:

- ``x_canon(params, x, w) -> X``, shape ``L + (I,)`` (only ``w.shape`` is read for matmul/conv,
  so an abstract value works; elemwise ignores ``x``);
- ``y_canon(params, y) -> Y``, shape ``L + (O,)``; works on any array shaped like the output,
  integer arrays included;
- ``io_to_params(params, w, M) -> (dw, db)`` for ``M = sum_l X[l]^T G[l]`` of shape ``(I, O)``,
  or ``(I + 1, O)`` when ``params['has_bias']`` (last row: bias gradient; ``db`` else None);
- ``factors_to_params(params, w, A, B) -> (dw, db)`` (optional): the same for ``M = A^T B``
  given as its factors, contracted straight into ``w``'s layout (no canonical matrix).

``w`` is the weight operand; for an op with several traced weights (LoRA's two factors) there is
one rule per weight operand, and ``w`` is the tuple of the operands listed in ``OpRule.operands``.
"""

from collections.abc import Callable, Sequence
from typing import NamedTuple, Optional

from etrace_core.ops.conv import etp_conv_p
from etrace_core.ops.conv import io_to_params as _conv_io
from etrace_core.ops.conv import x_canon as _conv_x
from etrace_core.ops.conv import y_canon as _conv_y
from etrace_core.ops.elementwise import etp_elemwise_p
from etrace_core.ops.elementwise import io_to_params as _elem_io
from etrace_core.ops.elementwise import x_canon as _elem_x
from etrace_core.ops.elementwise import y_canon as _elem_y
from etrace_core.ops.lora import LORA_PRIMITIVES
from etrace_core.ops.lora import io_to_params_a as _lora_io_a
from etrace_core.ops.lora import io_to_params_b as _lora_io_b
from etrace_core.ops.lora import x_canon_a as _lora_x_a
from etrace_core.ops.lora import x_canon_b as _lora_x_b
from etrace_core.ops.lora import y_canon as _lora_y
from etrace_core.ops.matmul import etp_matmul_p
from etrace_core.ops.matmul import factors_to_params as _mm_factors
from etrace_core.ops.matmul import io_to_params as _mm_io
from etrace_core.ops.matmul import x_canon as _mm_x
from etrace_core.ops.matmul import y_canon as _mm_y

__all__ = [
    "OpRule",
    "rule_for",
    "is_etp_primitive",
    "ETP_PRIMITIVES",
    "weight_operands",
    "bias_operand",
]


class OpRule(NamedTuple):
    """Pure functions putting one ETP op into matmul form ``Y = X @ W``, for one weight."""

    x_canon: Callable
    y_canon: Callable
    io_to_params: Callable
    operands: Optional[tuple[int, ...]] = None  # the functions' `w`: these operands (a tuple);
    #                                            None: the weight operand alone
    factors_to_params: Optional[Callable] = None  # io_to_params of A^T B from A and B

    def weight_arg(self, operands: Sequence, position: int):
        """The ``w`` this rule's functions take, from the op's operands (values, avals or
        None) in equation order; `position` is the weight's operand position."""
        if self.operands is None:
            return operands[position]
        return tuple(operands[i] for i in self.operands if i < len(operands))


_LORA_B = OpRule(_lora_x_b, _lora_y, _lora_io_b, (1, 2, 3))
_LORA_A = OpRule(_lora_x_a, _lora_y, _lora_io_a, (1, 2, 3))

# (primitive, weight operand position, rule), bias operand position when params['has_bias']
_RULES = (
    (etp_matmul_p, 1, OpRule(_mm_x, _mm_y, _mm_io, factors_to_params=_mm_factors)),
    (etp_conv_p, 1, OpRule(_conv_x, _conv_y, _conv_io)),
    (etp_elemwise_p, 0, OpRule(_elem_x, _elem_y, _elem_io)),
    *((p, k, rule) for p in LORA_PRIMITIVES for k, rule in ((1, _LORA_B), (2, _LORA_A))),
)
_BIAS_AT = ((etp_matmul_p, 2), (etp_conv_p, 2), *((p, 3) for p in LORA_PRIMITIVES))

ETP_PRIMITIVES = tuple(dict.fromkeys(p for p, _, _ in _RULES))


def is_etp_primitive(p):
    """Whether ``p`` (a jaxpr eqn's primitive) is one of the ETP primitives."""
    return any(p is q for q in ETP_PRIMITIVES)


def weight_operands(primitive) -> tuple[int, ...]:
    """Operand positions of the op's traced weights (one relation each): ``(1,)`` for a
    matmul or conv, ``(0,)`` element-wise, ``(1, 2)`` for LoRA's two factors."""
    return tuple(k for p, k, _ in _RULES if p is primitive)


def bias_operand(primitive, params) -> Optional[int]:
    """Operand position of the op's bias (None when it has none)."""
    if not params.get("has_bias"):
        return None
    return next((k for p, k in _BIAS_AT if p is primitive), None)


def rule_for(primitive, operand: Optional[int] = None):
    """The OpRule of an ETP primitive for its weight at `operand` (None: its first weight;
    ``y_canon`` is the same for all); ValueError for any other primitive."""
    for p, k, rule in _RULES:
        if primitive is p and (operand is None or operand == k):
            return rule
    if is_etp_primitive(primitive):
        raise ValueError(
            f"rule_for: {primitive.name} has traced weights at operands "
            f"{weight_operands(primitive)}, not at {operand}"
        )
    raise ValueError(
        f"rule_for: {primitive!r} is not an ETP primitive "
        f"(expected one of {[p.name for p in ETP_PRIMITIVES]})"
    )
