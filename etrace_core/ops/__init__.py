"""ETP ops: JAX primitives whose weight operand is a model parameter, with canonical-form rules."""

from etrace_core.ops.conv import conv, etp_conv_p
from etrace_core.ops.einsum_matmul import einsum
from etrace_core.ops.elementwise import element_wise, etp_elemwise_p
from etrace_core.ops.grouped import grouped_matmul
from etrace_core.ops.lora import etp_lora_mm_p, etp_lora_mv_p, lora_matmul
from etrace_core.ops.matmul import etp_matmul_p, matmul
from etrace_core.ops.rules import (
    ETP_PRIMITIVES,
    OpRule,
    bias_operand,
    is_etp_primitive,
    rule_for,
    weight_operands,
)
from etrace_core.ops.sparse import sparse_matmul

__all__ = [
    "matmul",
    "conv",
    "element_wise",
    "sparse_matmul",
    "grouped_matmul",
    "lora_matmul",
    "einsum",
    "OpRule",
    "rule_for",
    "weight_operands",
    "bias_operand",
    "is_etp_primitive",
    "ETP_PRIMITIVES",
    "etp_matmul_p",
    "etp_conv_p",
    "etp_elemwise_p",
    "etp_lora_mm_p",
    "etp_lora_mv_p",
]
