"""ES-D-RTRL / pp-prop: input and output traces (io-dimension memory, O(B (I + O)))."""

from __future__ import annotations

from numbers import Integral

from .base import ETraceAlgorithm


def decay_from(decay_or_rank) -> float:
    """alpha from a float in [0, 1), or from an int rank r >= 1 as alpha = (r - 1) / (r + 1)."""
    if isinstance(decay_or_rank, bool):
        raise TypeError("decay_or_rank must be a float in [0, 1) or an int rank >= 1, got a bool")
    if isinstance(decay_or_rank, Integral):
        r = int(decay_or_rank)
        if r < 1:
            raise ValueError(f"decay_or_rank as a rank must be >= 1, got {r}")
        return (r - 1) / (r + 1)
    alpha = float(decay_or_rank)
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"decay_or_rank as a decay must lie in [0, 1), got {alpha}")
    return alpha


class IODimVjpAlgorithm(ETraceAlgorithm):
    """ES-D-RTRL (pp-prop): eps_x = a eps_x + x; eps_f = a D eps_f + (1 - a) df;
    grad = outer(eps_x, dL/dh * eps_f) / (1 - a^t), with t the number of time steps seen."""

    def __init__(self, model, decay_or_rank=0.9, **kwargs):
        super().__init__(model, **kwargs)
        self.decay = decay_from(decay_or_rank)

    def trace_kinds(self):
        return ["io"] * len(self.graph.hidden_param_op_relations)


ES_D_RTRL = IODimVjpAlgorithm
pp_prop = IODimVjpAlgorithm
