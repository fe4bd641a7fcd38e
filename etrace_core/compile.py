"""``compile(model, algorithm, *example_args)``: one call from a model to a ready online learner.

It initialises the model's states, builds the algorithm, compiles the one-step graph from the
example inputs and creates the eligibility traces (braintrace's entry point, same signature).
"""

from __future__ import annotations

from typing import Any, Optional

import brainstate

from .algorithms import (
    D_RTRL,
    UORO,
    EProp,
    ETraceAlgorithm,
    HybridDimVjpAlgorithm,
    IODimVjpAlgorithm,
    OSTLFeedforward,
    OSTLRecurrent,
    ParamDimVjpAlgorithm,
)
from .compiler.errors import CompilationError, NotSupportedError
from .vmap import ETraceVmap, compile_vmapped

__all__ = ["compile", "ALGORITHM_NAMES"]

ALGORITHM_NAMES = {
    "d_rtrl": D_RTRL,
    "param_dim": ParamDimVjpAlgorithm,
    "pp_prop": IODimVjpAlgorithm,
    "es_d_rtrl": IODimVjpAlgorithm,
    "esd_rtrl": IODimVjpAlgorithm,
    "io_dim": IODimVjpAlgorithm,
    "hybrid": HybridDimVjpAlgorithm,
    "eprop": EProp,
    "e_prop": EProp,
    "ostl_recurrent": OSTLRecurrent,
    "ostl_feedforward": OSTLFeedforward,
    "uoro": UORO,
}

# braintrace algorithms etrace does not implement: named so the error says so
_NOT_IMPLEMENTED = (
    "three_factor",
    "dni",
    "snap",
)


def resolve_algorithm(algorithm: str | type[ETraceAlgorithm]) -> type[ETraceAlgorithm]:
    """An ETraceAlgorithm subclass from itself or from a name (case-insensitive)."""
    if isinstance(algorithm, type):
        if issubclass(algorithm, ETraceAlgorithm):
            return algorithm
        raise TypeError(f"algorithm class must be a subclass of ETraceAlgorithm, got {algorithm!r}")
    if isinstance(algorithm, str):
        key = algorithm.strip().lower()
        if key in ALGORITHM_NAMES:
            return ALGORITHM_NAMES[key]
        if key in _NOT_IMPLEMENTED:
            raise NotSupportedError(
                f"algorithm {algorithm!r} is not implemented in etrace; "
                f"available: {sorted(ALGORITHM_NAMES)}"
            )
        raise ValueError(
            f"unknown algorithm name {algorithm!r}; valid names: "
            f"{sorted(ALGORITHM_NAMES)}, or pass an ETraceAlgorithm subclass"
        )
    raise TypeError(
        f"algorithm must be an ETraceAlgorithm subclass or a name, got {type(algorithm).__name__}"
    )


def compile(
    model: brainstate.nn.Module,
    algorithm: str | type[ETraceAlgorithm],
    *example_inputs: Any,
    batch_size: Optional[int] = None,
    seed: Optional[int] = None,
    verbose: int = 0,
    vmap: bool = False,
    **options: Any,
) -> ETraceAlgorithm | ETraceVmap:
    """Initialise `model`'s states (``batch_size``), wrap it in `algorithm` (``**options`` go to
    its constructor), compile the graph from `example_inputs` and create the traces.

    ``seed`` seeds brainstate's random generator for the state initialisation. ``verbose=1``
    or ``2`` prints the compiled graph.

    ``vmap=True``: the model is written for one sample and the example inputs carry a batch
    axis 0 of size ``batch_size`` (required); states and traces are created per sample and the
    learner is returned wrapped in an :class:`~etrace_core.vmap.ETraceVmap` (a
    ``brainstate.nn.Vmap``) that maps each step over the batch; gradients are summed over
    samples (see ``etrace_core.vmap``).
    """
    cls = resolve_algorithm(algorithm)
    if not example_inputs:
        raise ValueError(
            "compile() needs at least one example input to build the graph, e.g. "
            "compile(model, 'd_rtrl', x0): pass the inputs of one step"
        )
    if verbose not in (0, 1, 2):
        raise ValueError(f"verbose must be 0, 1 or 2, got {verbose!r}")
    if vmap:
        result = compile_vmapped(model, cls, example_inputs, batch_size, seed, options)
        learner = result.module
    else:
        if seed is not None:
            with brainstate.random.seed_context(seed):
                brainstate.nn.init_all_states(model, batch_size=batch_size)
        else:
            brainstate.nn.init_all_states(model, batch_size=batch_size)
        learner = result = cls(model, **options)
        learner.compile_graph(*example_inputs)
    if not learner.graph.hidden_param_op_relations:
        raise CompilationError(
            "no trainable weight reaches a hidden state through an ETP op, so there is nothing "
            "to train online: route the recurrent layer's weights through etrace_core.ops "
            "(matmul / conv / element_wise)"
        )
    if verbose:
        learner.show_graph(verbose=True)
    return result
