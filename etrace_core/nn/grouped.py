"""``GroupedLinear``: ``G`` independent ``in -> out`` blocks on the ETP grouped matmul."""

from typing import Optional

import brainstate

from etrace_core.ops.grouped import grouped_matmul

from .init import DEFAULT, Initializer, Key, fan_in_uniform, make_param, resolve_dtype, split_key

__all__ = ["GroupedLinear"]


class GroupedLinear(brainstate.nn.Module):
    """``y[..., g, :] = x[..., g, :] @ W[g] + b[g]`` with ``weight`` a dict ParamState
    ``{'weight': (G, in, out), 'bias': (G, out)}`` (braintrace's layout and constructor:
    ``GroupedLinear(num_groups, in_features, out_features, w_init, b_init, name)``;
    ``b_init=None`` for no bias). Defaults follow torch's Linear: U(-1/sqrt(in), 1/sqrt(in)).
    Both entries are traced ETP weights (exact; see :func:`etrace_core.grouped_matmul`).
    """

    def __init__(
        self,
        num_groups: int,
        in_features: int,
        out_features: int,
        w_init: Optional[Initializer] = DEFAULT,
        b_init: Optional[Initializer] = DEFAULT,
        name: Optional[str] = None,
        *,
        dtype=None,
        key: Key = None,
    ):
        super().__init__(name=name)
        self.num_groups, self.in_features, self.out_features = num_groups, in_features, out_features
        self.in_size = (num_groups, in_features)
        self.out_size = (num_groups, out_features)
        dtype = resolve_dtype(dtype)
        w_key, b_key = split_key(key, 2)
        default = fan_in_uniform(in_features)
        params = {
            "weight": make_param(
                w_init, (num_groups, in_features, out_features), dtype, w_key, default
            ).value
        }
        if b_init is not None:
            params["bias"] = make_param(
                b_init, (num_groups, out_features), dtype, b_key, default
            ).value
        self.weight = brainstate.ParamState(params)

    def update(self, x):
        params = self.weight.value
        return grouped_matmul(x, params["weight"], params.get("bias"))
