"""The D-RTRL trace gradient sum_{l, s} eps[l, i, o, s] * delta[l, o, s] is computed as grouped
element-wise sums over the leading (batch) indices, statically sliced up to GRAD_STATIC_MAX
leading indices and in a loop of groups beyond: every path (one index, a group with remainder,
several groups, the loop with and without remainder) and every state count must equal the
plain einsum.

Oracle: ``jnp.einsum`` of the same arrays, float64, relative tolerance 1e-13."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from etrace_core.algorithms.traces import GRAD_GROUP, GRAD_STATIC_MAX, ParamDimTrace


@pytest.mark.parametrize("S", [1, 2])
@pytest.mark.parametrize(
    "lead",
    [
        (),
        (3,),
        (GRAD_GROUP,),
        (GRAD_GROUP + 1,),
        (2, 3 * GRAD_GROUP + 5),
        (GRAD_STATIC_MAX + 2 * GRAD_GROUP,),
        (GRAD_STATIC_MAX + 2 * GRAD_GROUP + 3,),
    ],
)
def test_param_dim_grad_equals_einsum(x64, lead, S):
    I, O = 5, 7
    k1, k2 = jax.random.split(jax.random.PRNGKey(len(lead) + sum(lead) + S))
    eps = jax.random.normal(k1, lead + (I, O, S), jnp.float64)
    delta = jax.random.normal(k2, lead + (O, S), jnp.float64)
    got = jax.jit(lambda e, d: ParamDimTrace.grad({"eps": e}, d, None, None))(eps, delta)
    ref = jnp.einsum("...ios,...os->io", eps, delta)
    assert got.shape == (I, O) and got.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-13, atol=1e-13)
