"""The streaming step's gradient-layout fast paths, each against the general path it replaces.

- ``matmul.factors_to_params`` (an io-dim gradient ``A^T B`` contracted straight into the
  weight's layout) against ``io_to_params`` of the canonical ``(I[+1], O)`` matrix ``A^T B``:
  both layouts, with/without bias, with a ``weight_fn`` and a shaped bias; float64, 1e-12.
- ``traces.tiling`` / ``gather_units``: a unit map that repeats the units along its last axis
  (fused gates) is a concatenation of copies, equal to the gather; any other map (permuted,
  with unmapped positions, a partial repeat) is not detected and keeps the gather (exact).
The same paths on torch's own GRUCell/LSTMCell maps: tests/bridge/test_gradient_layout.py."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from etrace_core.algorithms.traces import Connection, gather_units, tiling
from etrace_core.ops.elementwise import ElementFn
from etrace_core.ops.matmul import factors_to_params, io_to_params


def _rel_err(got, ref):
    return float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref)))


@pytest.mark.parametrize("layout", ["io", "oi"])
@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("lead", [(5,), (3, 5)])  # one step, and a chunk of steps stacked
def test_factors_to_params_equals_canonical(x64, layout, has_bias, lead):
    rng = np.random.default_rng(0)
    i, o = 4, 6
    w = jnp.asarray(rng.standard_normal((i, o) if layout == "io" else (o, i)))
    A = jnp.asarray(rng.standard_normal(lead + (i + has_bias,)))
    B = jnp.asarray(rng.standard_normal(lead + (o,)))
    params = {"w_layout": layout, "has_bias": has_bias}
    M = jnp.einsum("...ni,...no->io", A, B)
    dw, db = factors_to_params(params, w, A, B)
    rw, rb = io_to_params(params, w, M)
    assert dw.shape == w.shape and _rel_err(dw, rw) <= 1e-12
    if has_bias:
        assert db.shape == (o,) and _rel_err(db, rb) <= 1e-12
    else:
        assert db is None and rb is None


def test_factors_to_params_weight_fn_and_shaped_bias(x64):
    """A masked weight (gradient pulled back through the mask) and a bias of shape (2, 3)."""
    rng = np.random.default_rng(1)
    mask = jnp.asarray(rng.random((6, 4)) > 0.4, jnp.float64)
    fn = ElementFn(lambda w: w * mask)
    params = {"w_layout": "oi", "has_bias": True, "weight_fn": fn, "b_shape": (2, 3)}
    w = jnp.asarray(rng.standard_normal((6, 4)))
    A, B = jnp.asarray(rng.standard_normal((5, 5))), jnp.asarray(rng.standard_normal((5, 6)))
    dw, db = factors_to_params(params, w, A, B)
    rw, rb = io_to_params(params, w, A.T @ B)
    assert _rel_err(dw, rw) <= 1e-12 and _rel_err(db, rb) <= 1e-12
    assert db.shape == (2, 3) and float(jnp.max(jnp.abs(dw * (1 - mask)))) == 0.0


def test_factors_to_params_refuses_wrong_shapes():
    params = {"w_layout": "oi", "has_bias": True}
    with pytest.raises(ValueError, match="factors_to_params"):
        factors_to_params(params, jnp.zeros((6, 4)), jnp.zeros((5, 4)), jnp.zeros((5, 6)))


def _fused_map(batch, H, k):
    """The unit map of a k-gate fused output (batch, k * H) onto hidden units (batch, H)."""
    return np.tile(np.arange(batch * H).reshape(batch, 1, H), (1, k, 1)).reshape(batch, k * H)


def _check_gather(unit, group_size, tile):
    conn = Connection(0, 0, 0, unit, False, group_size, tile)
    rng = np.random.default_rng(2)
    for shape in [(group_size, 2), (group_size, 2, 2)]:
        per_unit = jnp.asarray(rng.standard_normal(shape))
        got = gather_units(conn, per_unit)
        padded = np.concatenate([np.asarray(per_unit), np.zeros((1,) + shape[1:])])
        ref = padded[np.where(unit < 0, group_size, unit)]
        assert got.shape == ref.shape and np.array_equal(np.asarray(got), ref)
        general = gather_units(conn._replace(tile=0), per_unit)
        assert np.array_equal(np.asarray(got), np.asarray(general))


@pytest.mark.parametrize("k", [1, 3, 4])
def test_fused_gate_maps_are_tiles_and_copies_equal_the_gather(k):
    unit = _fused_map(3, 5, k)
    assert tiling(unit, 15) == k
    _check_gather(unit, 15, k)
    flat = unit.reshape(-1)[: 5 * k]  # no leading axis: one unit block repeated k times
    assert tiling(flat, 5) == k
    _check_gather(flat, 5, k)


def test_irregular_maps_keep_the_gather():
    unit = _fused_map(3, 5, 3)
    permuted = unit[:, np.random.default_rng(0).permutation(15)]
    unmapped = unit.copy()
    unmapped[1, 7] = -1
    shifted = (unit + 1) % 15  # same shape, units rotated
    partial = unit[:, :12]  # 12 positions: not a whole number of unit blocks
    for m in (permuted, unmapped, shifted, partial):
        assert tiling(m, 15) == 0
        _check_gather(m, 15, 0)
    assert tiling(unit, 30) == 0  # a group larger than the map covers
