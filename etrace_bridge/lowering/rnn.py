"""Fused recurrent-cell kernels that torch.export keeps on CUDA (`nn.GRUCell`/`nn.LSTMCell` on a
GPU export as `_thnn_fused_*_cell`; on CPU they decompose into element-wise ops).

The gate matmuls stay outside (`aten.linear` / `mm` on the weights, traced as ETP ops); these
lowerings are the element-wise gate math, with torch's gate order (GRU: r, z, n; LSTM: i, f, g, o).
The workspace output (kept by torch for its backward) is the activated gates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import torch

from .record import OpRecord

aten = torch.ops.aten


def _plus(a, b):
    return a if b is None else a + b


def _gru_cell(input_gates, hidden_gates, hx, input_bias=None, hidden_bias=None):
    ig = jnp.split(_plus(input_gates, input_bias), 3, axis=-1)
    hg = jnp.split(_plus(hidden_gates, hidden_bias), 3, axis=-1)
    r = jax.nn.sigmoid(ig[0] + hg[0])
    z = jax.nn.sigmoid(ig[1] + hg[1])
    n = jnp.tanh(ig[2] + r * hg[2])
    hy = n + z * (hx - n)
    return hy, jnp.concatenate([r, z, n, hg[2], hx], axis=-1)


def _lstm_cell(input_gates, hidden_gates, cx, input_bias=None, hidden_bias=None):
    gates = _plus(_plus(input_gates, input_bias), _plus(hidden_gates, hidden_bias))
    i, f, g, o = jnp.split(gates, 4, axis=-1)
    i, f, g, o = jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)
    cy = f * cx + i * g
    return o * jnp.tanh(cy), cy, jnp.concatenate([i, f, g, o], axis=-1)


OPS = {
    aten._thnn_fused_gru_cell.default: OpRecord(_gru_cell),
    aten._thnn_fused_lstm_cell.default: OpRecord(_lstm_cell),
}
