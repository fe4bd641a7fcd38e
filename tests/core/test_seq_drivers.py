"""braintrace's sequence drivers ``etrace_grad`` / ``etrace_evolve`` (one step at a time).

Oracle: the same learner stepped by hand, gradient of each step's loss summed over time (float64,
1e-10); ``reduction='mean'`` and ``mask`` checked against that sum weighted and divided by hand.
"""

from __future__ import annotations

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import etrace_core
from tests.core.test_vmap import LeakyNet, _close

B, T = 2, 4


def _data():
    xs = jax.random.normal(jax.random.PRNGKey(11), (T, B, 3))
    ys = jax.random.normal(jax.random.PRNGKey(12), (T, B, 2))
    return xs, ys


def _learner(vmap, xs):
    model = LeakyNet()
    kw = dict(vmap=True) if vmap else {}
    return model, etrace_core.compile(model, "pp_prop", xs[0], batch_size=B, **kw)


@pytest.mark.parametrize("vmap", [False, True], ids=["batched", "vmap"])
def test_etrace_grad_equals_stepping_by_hand(x64, vmap):
    xs, ys = _data()
    mask = jnp.asarray([1.0, 0.0, 2.0, 1.0])
    model, learner = _learner(vmap, xs)
    step = lambda x, y: jnp.sum((learner(x) - y) ** 2)
    grads, losses = learner.etrace_grad(
        xs, ys, step_fn=step, mask=mask, reduction="sum", return_value=True
    )
    # the masked objective by hand: sum_t mask[t] * grad_t
    ref_model, ref_learner = _learner(vmap, xs)
    params = ref_model.states(brainstate.ParamState)
    total, ref_losses = None, []
    for t in range(T):
        g, v = brainstate.transform.grad(
            lambda x, y: jnp.sum((ref_learner(x) - y) ** 2), params, return_value=True
        )(xs[t], ys[t])
        g = jax.tree.map(lambda a, t=t: mask[t] * a, g)
        total = g if total is None else jax.tree.map(jnp.add, total, g)
        ref_losses.append(v)
    _close(grads, total)
    np.testing.assert_allclose(losses, jnp.stack(ref_losses), rtol=1e-10, atol=1e-10)
    # the states and traces advanced by T steps, as by hand
    _close(model.rnn.h.value, ref_model.rnn.h.value)
    algo = learner.module if vmap else learner
    ref_algo = ref_learner.module if vmap else ref_learner
    _close(algo.etrace.value, ref_algo.etrace.value)


def test_etrace_grad_mean_outputs_and_evolve(x64):
    xs, ys = _data()
    mask = jnp.asarray([1.0, 0.0, 2.0, 1.0])
    _, a = _learner(True, xs)
    _, b = _learner(True, xs)
    step_a = lambda x, y: jnp.sum((a(x) - y) ** 2)
    step_b = lambda x, y: jnp.sum((b(x) - y) ** 2)
    g_sum, masked = a.etrace_grad(
        xs, ys, step_fn=step_a, mask=mask, reduction="sum", loss_output="masked", return_value=True
    )
    g_mean, scalar = b.etrace_grad(
        xs, ys, step_fn=step_b, mask=mask, loss_output="scalar", return_value=True
    )
    _close(g_mean, jax.tree.map(lambda g: g / 4.0, g_sum))
    np.testing.assert_allclose(scalar, jnp.sum(masked) / 4.0, rtol=1e-12)
    # evolve: T more steps with no gradient, outputs stacked; equals calling step by step
    model, c = _learner(True, xs)
    outs = c.etrace_evolve(xs, return_outputs=True)
    ref_model, d = _learner(True, xs)
    ref = jnp.stack([d(x) for x in xs])
    _close(outs, ref)
    _close(model.rnn.h.value, ref_model.rnn.h.value)
    assert c.etrace_evolve(xs) is None


def test_etrace_grad_errors():
    xs, ys = _data()
    _, learner = _learner(False, xs)
    step = lambda x, y: jnp.sum(learner(x))
    with pytest.raises(etrace_core.NotSupportedError, match="run_online"):
        learner.etrace_grad(xs, ys, step_fn=step, chunk_size=2)
    with pytest.raises(ValueError, match="reduction"):
        learner.etrace_grad(xs, ys, step_fn=step, reduction="max")
    with pytest.raises(ValueError, match="mask must have shape"):
        learner.etrace_grad(xs, ys, step_fn=step, mask=jnp.ones(3))
    with pytest.raises(ValueError, match="leading length"):
        learner.etrace_grad(xs, ys[:2], step_fn=step)
