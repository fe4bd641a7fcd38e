"""Canonical-form rules of the ETP primitives: an immutable primitive -> OpRule lookup.

Every rule function takes the primitive's ``params`` (``eqn.params`` in a jaxpr) first:

- ``x_canon(params, x, w) -> X``, shape ``L + (I,)`` (only ``w.shape`` is read for matmul/conv,
  so an abstract value works; elemwise ignores ``x``);
- ``y_canon(params, y) -> Y``, shape ``L + (O,)``; works on any array shaped like the output,
  integer arrays included;
- ``io_to_params(params, w, M) -> (dw, db)`` for ``M = sum_l X[l]^T G[l]`` of shape ``(I, O)``,
  or ``(I + 1, O)`` when ``params['has_bias']`` (last row: bias gradient; ``db`` else None).
"""

from collections.abc import Callable
from typing import NamedTuple

from etrace_core.ops.conv import etp_conv_p
from etrace_core.ops.conv import io_to_params as _conv_io
from etrace_core.ops.conv import x_canon as _conv_x
from etrace_core.ops.conv import y_canon as _conv_y
from etrace_core.ops.elementwise import etp_elemwise_p
from etrace_core.ops.elementwise import io_to_params as _elem_io
from etrace_core.ops.elementwise import x_canon as _elem_x
from etrace_core.ops.elementwise import y_canon as _elem_y
from etrace_core.ops.matmul import etp_matmul_p
from etrace_core.ops.matmul import io_to_params as _mm_io
from etrace_core.ops.matmul import x_canon as _mm_x
from etrace_core.ops.matmul import y_canon as _mm_y

__all__ = ["OpRule", "rule_for", "is_etp_primitive", "ETP_PRIMITIVES"]


class OpRule(NamedTuple):
    """Pure functions putting one ETP op into matmul form ``Y = X @ W``."""

    x_canon: Callable
    y_canon: Callable
    io_to_params: Callable


_RULES = (
    (etp_matmul_p, OpRule(_mm_x, _mm_y, _mm_io)),
    (etp_conv_p, OpRule(_conv_x, _conv_y, _conv_io)),
    (etp_elemwise_p, OpRule(_elem_x, _elem_y, _elem_io)),
)

ETP_PRIMITIVES = tuple(p for p, _ in _RULES)


def is_etp_primitive(p):
    """Whether ``p`` (a jaxpr eqn's primitive) is one of the ETP primitives."""
    return any(p is q for q in ETP_PRIMITIVES)


def rule_for(primitive):
    """The OpRule of an ETP primitive; ValueError for any other primitive."""
    for p, rule in _RULES:
        if primitive is p:
            return rule
    raise ValueError(
        f"rule_for: {primitive!r} is not an ETP primitive "
        f"(expected one of {[p.name for p in ETP_PRIMITIVES]})"
    )
