"""etrace_bridge: train PyTorch recurrent models online with eligibility traces (via JAX)."""
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # before jax starts: share the GPU with torch

from .bptt import (  # noqa: E402
    BPTTResult, GradientReport, TBPTTWindow, bptt_gradients, compare_gradients, tbptt_gradients,
    tbptt_windows,
)
from .arrays import to_jax, to_torch  # noqa: E402
from .errors import BridgeError, ExportError, UnsupportedModelError, UnsupportedOpError  # noqa: E402
from .algorithms import make_algorithm  # noqa: E402
from .learner import OnlineLearner  # noqa: E402
from .module import TorchModule, from_torch  # noqa: E402

__all__ = [
    "from_torch", "TorchModule", "OnlineLearner", "make_algorithm", "to_jax", "to_torch",
    "bptt_gradients", "tbptt_gradients", "tbptt_windows", "compare_gradients", "BPTTResult",
    "TBPTTWindow", "GradientReport",
    "BridgeError", "ExportError", "UnsupportedModelError", "UnsupportedOpError",
]
