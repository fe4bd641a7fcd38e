"""Per-sample vmap of an online learner: ``compile(model, algorithm, x, batch_size=B, vmap=True)``.

The model is written for one sample. Its states and the eligibility traces are created inside
``brainstate.transform.vmap_new_states`` (tag ``'new'``), so each gets a leading batch axis of
size B, and the learner is wrapped in a ``brainstate.nn.Vmap`` over that tag: every call maps
the one-sample online step over axis 0 of the inputs, the hidden states and the traces. The
parameters are shared (not mapped), so the gradient of a loss of the wrapper's output is the
sum over samples of each sample's online gradient (JAX sums the per-lane cotangents of an
unmapped input); a mean-reduced loss gives the mean.
"""

from __future__ import annotations

from typing import Any, Optional

import brainstate
import jax

from .algorithms import ETraceAlgorithm
from .algorithms.seq_drivers import SequenceDriverMixin

__all__ = ["ETraceVmap", "VMAP_STATE_TAG", "compile_vmapped"]

VMAP_STATE_TAG = "new"


class ETraceVmap(SequenceDriverMixin, brainstate.nn.Vmap):
    """A ``brainstate.nn.Vmap`` over an online learner, returned by ``compile(..., vmap=True)``.

    Calling it runs one online step per sample; ``module`` is the one-sample learner (its
    ``graph``, ``param_states``, ``get_etrace_of`` ...; its traces carry the batch axis first).
    ``etrace_grad`` / ``etrace_evolve`` drive the wrapper (all samples), not ``module``.
    """

    def __init__(self, learner: ETraceAlgorithm):
        super().__init__(learner, vmap_states=VMAP_STATE_TAG)

    @property
    def learner(self) -> ETraceAlgorithm:
        return self.module

    @property
    def param_states(self):
        """The model's ParamStates by path (shared by all samples)."""
        return self.module.param_states

    @property
    def graph(self):
        return self.module.graph

    def init_etrace_state(self, *args, **kwargs) -> None:
        """Zero every sample's traces (keeps their batch axis)."""
        self.module.reset_state()


def one_sample(example_inputs: tuple, batch_size: int) -> tuple:
    """The first sample of `example_inputs`, whose every leaf must have `batch_size` at axis 0;
    all mismatching leaves are named at once."""
    leaves, tree = jax.tree.flatten(example_inputs)
    problems = []
    for k, a in enumerate(leaves):
        shape = tuple(jax.numpy.shape(a))
        if not shape or shape[0] != batch_size:
            problems.append(f"leaf {k} of shape {shape}")
    if problems:
        raise ValueError(
            f"compile(..., vmap=True) maps over axis 0 of the example inputs, which must have "
            f"batch_size={batch_size} there; found {', '.join(problems)}. Give every input a "
            "leading batch axis of that size, or use vmap=False"
        )
    return jax.tree.unflatten(tree, [a[0] for a in leaves])


def compile_vmapped(
    model: brainstate.nn.Module,
    cls: type[ETraceAlgorithm],
    example_inputs: tuple,
    batch_size: Optional[int],
    seed: Optional[int],
    options: dict[str, Any],
) -> ETraceVmap:
    """Build `cls(model, **options)` for one sample, create per-sample states and traces
    (batch axis of `batch_size`) and wrap the learner in an :class:`ETraceVmap`."""
    if batch_size is None:
        raise ValueError(
            "compile(..., vmap=True) needs batch_size (the size of the mapped axis 0 of the "
            "inputs): pass batch_size=B"
        )
    sample = one_sample(example_inputs, batch_size)
    learner = cls(model, **options)

    @brainstate.transform.vmap_new_states(state_tag=VMAP_STATE_TAG, axis_size=batch_size)
    def init() -> None:
        brainstate.nn.init_all_states(model)
        learner.compile_graph(*sample)

    if seed is not None:
        with brainstate.random.seed_context(seed):
            init()
    else:
        init()
    return ETraceVmap(learner)
