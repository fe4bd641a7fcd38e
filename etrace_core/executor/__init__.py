"""Graph executors: compile a model's graph and evaluate the Jacobians online learning needs."""

from .base import ETraceGraphExecutor
from .data import MultiStepData, SingleStepData
from .vjp import ETraceVjpGraphExecutor, VjpResiduals

__all__ = [
    "ETraceGraphExecutor",
    "ETraceVjpGraphExecutor",
    "VjpResiduals",
    "SingleStepData",
    "MultiStepData",
]
