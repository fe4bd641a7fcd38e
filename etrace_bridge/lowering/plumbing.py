"""Graph plumbing: symbolic sizes, runtime asserts, getitem."""

from __future__ import annotations

import operator

import jax.numpy as jnp
import numpy as np
import torch

from .record import plain

aten = torch.ops.aten


def _no_op(*args, **kwargs):
    return None


def _plumbing_ops():
    return {
        aten.sym_size.int: lambda x, dim: jnp.shape(x)[dim],
        aten.sym_numel.default: lambda x: int(np.prod(jnp.shape(x))),
        aten._assert_tensor_metadata.default: _no_op,
        aten._assert_scalar.default: _no_op,
        aten.sym_constrain_range_for_size.default: _no_op,
        aten.sym_constrain_range.default: _no_op,
        aten._assert_async.msg: _no_op,
        operator.getitem: operator.getitem,
        torch.sym_max: max,
        torch.sym_min: min,
        torch.sym_not: operator.not_,
        torch.sym_float: float,
        torch.sym_int: int,
    }


OPS = plain(_plumbing_ops())
