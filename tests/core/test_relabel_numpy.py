"""The NumPy replays of relabelling ops (etrace_core.compiler.relabel_numpy) against the JAX
primitives themselves (oracle: the primitive bound on the same int32 id arrays; exact)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from etrace_core.compiler import relabel_numpy

X = np.arange(4 * 6 * 5, dtype=np.int32).reshape(4, 6, 5)

CASES = {
    "slice": lambda x: x[1:3, ::2, 1:],
    "slice strided": lambda x: lax.slice(x, (0, 1, 0), (4, 6, 5), (3, 2, 2)),
    "dynamic_slice": lambda x: lax.dynamic_slice(x, (1, 2, 0), (2, 3, 5)),
    "dynamic_slice clamped": lambda x: lax.dynamic_slice(x, (3, -2, 4), (2, 3, 2)),
    "reshape": lambda x: x.reshape(6, 20),
    "transpose": lambda x: jnp.transpose(x, (2, 0, 1)),
    "squeeze": lambda x: x[:, :1, :].squeeze(1),
    "broadcast_in_dim": lambda x: lax.broadcast_in_dim(x[:, 0, :], (4, 3, 5), (0, 2)),
    "broadcast size-1": lambda x: jnp.broadcast_to(x[:1], (2, 4, 6, 5)),
    "concatenate": lambda x: jnp.concatenate([x, x[:, :2]], axis=1),
    "rev": lambda x: lax.rev(x, (0, 2)),
    "split": lambda x: jnp.split(x, [1, 4], axis=1),
}


@pytest.mark.parametrize("name", list(CASES))
def test_numpy_replay_matches_the_jax_primitive(name):
    jaxpr = jax.make_jaxpr(CASES[name])(X)
    env = {v: X for v in jaxpr.jaxpr.invars}
    replayed = 0
    for eqn in jaxpr.eqns:
        args = [v.val if hasattr(v, "val") else env[v] for v in eqn.invars]
        want = eqn.primitive.bind(*[jnp.asarray(a) for a in args], **eqn.params)
        want = list(want) if eqn.primitive.multiple_results else [want]
        got = relabel_numpy.replay(eqn.primitive.name, dict(eqn.params), args)
        if eqn.primitive.name in ("slice", "dynamic_slice", "reshape", "transpose", "squeeze"):
            assert got is not None, eqn.primitive.name
        if got is not None:
            replayed += 1
            assert len(got) == len(want)
            for g, w in zip(got, want):
                assert g.shape == w.shape and g.dtype == w.dtype
                np.testing.assert_array_equal(g, np.asarray(w))
        env.update(zip(eqn.outvars, [np.asarray(w) for w in want]))
    assert replayed >= 1


def test_uncovered_ops_and_parameters_are_left_to_jax():
    assert relabel_numpy.replay("gather", {}, [X]) is None
    assert relabel_numpy.replay("pad", {}, [X, np.int32(0)]) is None
    params = {"new_sizes": (120,), "dimensions": (2, 1, 0), "sharding": None}
    assert relabel_numpy.replay("reshape", params, [X]) is None
    unknown = {"permutation": (0, 1, 2), "some_future_option": 1}
    assert relabel_numpy.replay("transpose", unknown, [X]) is None
