"""Hybrid: param-dim traces for element-wise or small weights, io-dim traces for the rest."""

from __future__ import annotations

from typing import Optional

from .base import ETraceAlgorithm
from .io_dim import decay_from

KINDS = ("param", "io")


class HybridDimVjpAlgorithm(ETraceAlgorithm):
    """Chooses per weight: D-RTRL where the weight is element-wise or has at most
    `max_param_dim_size` elements (exact and cheap), ES-D-RTRL elsewhere.

    `mode={weight_path: 'param' | 'io'}` overrides the choice for named weights.
    """

    def __init__(
        self,
        model,
        decay_or_rank=0.9,
        *,
        max_param_dim_size: int = 4096,
        mode: Optional[dict[tuple, str]] = None,
        **kwargs,
    ):
        super().__init__(model, **kwargs)
        self.decay = decay_from(decay_or_rank)
        self.max_param_dim_size = int(max_param_dim_size)
        self.mode = {tuple(k): v for k, v in (mode or {}).items()}
        bad = {k: v for k, v in self.mode.items() if v not in KINDS}
        if bad:
            raise ValueError(f"mode values must be 'param' or 'io', got {bad}")

    def trace_kinds(self):
        rels = self.graph.hidden_param_op_relations
        known = {r.weight_path for r in rels}
        own = {r.path for r in self.executor.param_trace_relations}  # always param-dim
        unknown = [k for k in self.mode if k not in known and k not in own]
        if unknown:
            raise ValueError(
                f"mode names weights that are not online-traced: {unknown}; "
                f"traced weights are {sorted(known)}"
            )
        kinds = []
        for r in rels:
            if r.weight_path in self.mode:
                kinds.append(self.mode[r.weight_path])
            elif r.primitive.name == "etp_elemwise":
                kinds.append("param")
            else:
                w = r.eqn.invars[r.weight_operand].aval
                kinds.append("param" if w.size <= self.max_param_dim_size else "io")
        return kinds
