"""Compiled programs shared across conversions of the same structure (etrace_bridge.shared_programs):
re-used only for the same computation, never with another model's values, and never hiding a
wrong conversion from the self-check."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

from etrace_bridge import from_torch
from etrace_bridge.errors import ConversionCheckError
from etrace_bridge.shared_programs import call_jaxpr
from tests.bridge.jax_compiles import compilations


def test_same_structure_shares_one_program_with_its_own_values():
    x = jnp.arange(6.0).reshape(2, 3)
    scales = [jnp.full((3,), 2.0), jnp.full((3,), -3.0)]
    closed = [jax.make_jaxpr(lambda x, s=s: jnp.tanh(x * s + 0.25))(x) for s in scales]
    assert all(len(c.consts) == 1 for c in closed)  # the values live in the constants
    with compilations("xla") as names:
        outs = [call_jaxpr(c, x)[0] for c in closed]
    assert len(names) == 1, names  # one compile for both
    for s, out in zip(scales, outs):
        np.testing.assert_array_equal(np.asarray(out), np.asarray(jnp.tanh(x * s + 0.25)))
    other = jax.make_jaxpr(lambda x: jnp.sin(x * scales[0]))(x)  # another computation
    want = np.asarray(jnp.sin(x * scales[0]))
    with compilations("xla") as names:
        got = np.asarray(call_jaxpr(other, x)[0])
    assert len(names) == 1  # compiled, not mistaken for the tanh program
    np.testing.assert_allclose(got, want, rtol=1e-6)


class _Net(nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.cell = nn.GRUCell(4, 9)
        self.readout = nn.Linear(9, 2)

    def forward(self, x, h):
        h = self.cell(x, h)
        return self.readout(h), h


def test_second_conversion_of_the_same_structure_compiles_no_check_program():
    args = (torch.randn(3, 4), torch.zeros(3, 9))
    from_torch(_Net(0), args)
    with compilations("xla") as names:
        from_torch(_Net(1), args)  # other weights, same structure
    assert names == []


def test_a_cached_program_never_hides_a_wrong_conversion():
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh())
    x = torch.randn(3, 5)
    from_torch(net, (x,))  # correct: its check program is cached
    with pytest.raises(ConversionCheckError, match="step 0"):
        from_torch(net, (x,), custom_ops={"aten::tanh": lambda v: v})
    from_torch(nn.Sequential(nn.Linear(5, 7), nn.Tanh()), (x,))  # and correct again
