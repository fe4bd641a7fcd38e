"""ATen -> JAX lowering: the op table (one `OpRecord` per supported op, by family) and the
interpreter that runs an exported step with it."""

from .interpreter import LoweredStep, lower
from .record import OpRecord
from .table import FAMILIES, OP_TABLE

__all__ = ["lower", "LoweredStep", "OP_TABLE", "OpRecord", "FAMILIES"]
