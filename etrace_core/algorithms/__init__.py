"""Online learning algorithms over a compiled eligibility-trace graph."""

from .base import ETraceAlgorithm, ETraceState
from .eprop import EProp, OSTLFeedforward, OSTLRecurrent
from .hybrid import HybridDimVjpAlgorithm
from .io_dim import ES_D_RTRL, IODimVjpAlgorithm, pp_prop
from .param_dim import D_RTRL, ParamDimVjpAlgorithm
from .sequence import OnlineResult, run_online
from .uoro import UORO

__all__ = [
    "ETraceAlgorithm",
    "ETraceState",
    "ParamDimVjpAlgorithm",
    "D_RTRL",
    "IODimVjpAlgorithm",
    "ES_D_RTRL",
    "pp_prop",
    "HybridDimVjpAlgorithm",
    "EProp",
    "OSTLRecurrent",
    "OSTLFeedforward",
    "UORO",
    "OnlineResult",
    "run_online",
]
