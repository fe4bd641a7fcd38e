"""``SparseLinear``: brainstate's sparse layer with its product on the ETP sparse matmul."""

import brainstate

from etrace_core.ops.matmul import bind_matmul
from etrace_core.ops.sparse import SparsePattern, pattern_of

__all__ = ["SparseLinear"]


class SparseLinear(brainstate.nn.SparseLinear):
    """``y = x @ S(weight['weight']) (+ weight['bias'])`` for a fixed sparse pattern ``S``.

    brainstate's constructor, unchanged: ``SparseLinear(spar_mat, b_init=None, in_size=None,
    name=None, param_type=ParamState)`` with ``spar_mat`` a brainunit/brainevent sparse matrix
    whose stored values become ``weight.value['weight']``. The product goes through
    :func:`etrace_core.sparse_matmul` (the pattern is read once here), so the stored values are
    a traced ETP weight with exact gradients; their trace has the dense ``(in, out)`` size.
    """

    def __init__(self, spar_mat, b_init=None, in_size=None, name=None, **kwargs):
        super().__init__(spar_mat, b_init=b_init, in_size=in_size, name=name, **kwargs)
        rows, cols, shape = pattern_of(spar_mat)
        self._pattern = SparsePattern(rows, cols, shape)

    def update(self, x):
        params = self.weight.value
        return bind_matmul(x, params["weight"], params.get("bias"), "io", self._pattern)
