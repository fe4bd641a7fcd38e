"""etrace_bridge: train PyTorch recurrent models online with eligibility traces (via JAX)."""

import os

os.environ.setdefault(
    "XLA_PYTHON_CLIENT_PREALLOCATE", "false"
)  # before jax starts: share the GPU with torch

from etrace_core.x64 import keep_x64  # noqa: E402

with keep_x64():  # importing brainstate resets jax_enable_x64: keep the user's setting
    from .algorithms import make_algorithm
    from .arrays import to_jax, to_torch
    from .bptt import (
        BPTTResult,
        GradientReport,
        TBPTTWindow,
        bptt_gradients,
        compare_gradients,
        tbptt_gradients,
        tbptt_windows,
    )
    from .cache import enable_compilation_cache
    from .errors import (
        BridgeError,
        CheckpointError,
        ConversionCheckError,
        ExportError,
        StaleConversionError,
        TargetError,
        UnsupportedModelError,
        UnsupportedOpError,
    )
    from .learner import OnlineLearner
    from .module import TorchModule, from_torch

__all__ = [
    "from_torch",
    "TorchModule",
    "OnlineLearner",
    "make_algorithm",
    "to_jax",
    "to_torch",
    "bptt_gradients",
    "tbptt_gradients",
    "tbptt_windows",
    "compare_gradients",
    "BPTTResult",
    "TBPTTWindow",
    "GradientReport",
    "enable_compilation_cache",
    "BridgeError",
    "ExportError",
    "UnsupportedModelError",
    "UnsupportedOpError",
    "ConversionCheckError",
    "StaleConversionError",
    "CheckpointError",
    "TargetError",
]
