"""D-RTRL: one trace per weight element (param-dimension memory, O(B |theta|))."""

from __future__ import annotations

from .base import ETraceAlgorithm


class ParamDimVjpAlgorithm(ETraceAlgorithm):
    """D-RTRL: eps^t = D^t eps^{t-1} + df^t (x) x^t for every traced weight.

    Exact (equal to BPTT) when the hidden-to-hidden recurrence is element-wise.
    """

    def trace_kinds(self):
        return ["param"] * len(self.graph.hidden_param_op_relations)


D_RTRL = ParamDimVjpAlgorithm
