"""e-prop (Bellec et al. 2020) and OSTL (Bohnstingl et al. 2023) on etrace's traces.

Both are named variants of the two trace rules etrace already has:

- ``EProp`` is D-RTRL's per-weight trace ``e`` with e-prop's two options: a low-pass filtered
  trace ``e_bar^t = kappa e_bar^{t-1} + e^t`` in the gradient ``sum_t L^t . e_bar^t``
  (``kappa_filter_decay``), and a learning signal ``L`` that is either ``dL/dh`` itself
  (``feedback='symmetric'``) or a fixed random projection of its direction
  (``feedback='random'``). ``kappa = 0`` with symmetric feedback *is* D-RTRL.
- ``OSTLRecurrent`` ('with-H') is D-RTRL; ``OSTLFeedforward`` ('without-H') is ES-D-RTRL with a
  negligible decay, so the trace holds (almost) only the current step.

Filtering or random feedback makes the gradient differ from BPTT on purpose: those two options
are approximations by design, not labelled per weight by the compiler (the algorithm's
``approximate_options`` says which are on).
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from . import online
from .io_dim import IODimVjpAlgorithm
from .param_dim import ParamDimVjpAlgorithm

__all__ = ["EProp", "OSTLRecurrent", "OSTLFeedforward"]

FEEDBACK_SCALE = 0.1  # standard deviation of the random feedback matrices' entries


class EProp(ParamDimVjpAlgorithm):
    """e-prop: ``dL/dW = sum_t L^t . e_bar^t`` over D-RTRL's per-weight trace ``e``.

    ``feedback='symmetric'`` uses ``L = dL/dh``; ``'random'`` uses ``L = B (l / (|l| + 1e-8))``
    with ``l = dL/dh`` normalised over the hidden units of each group and ``B`` a fixed
    ``(width, width)`` matrix per hidden group, ``N(0, 0.1^2)`` entries drawn from
    ``random_feedback_key`` (required then). ``kappa_filter_decay`` in ``[0, 1)``: the trace's
    low-pass factor; ``0`` (the default) with symmetric feedback is exactly D-RTRL.
    Parameters that are not traced keep their exact same-step gradient, as in every etrace
    algorithm.
    """

    def __init__(
        self,
        model,
        feedback: str = "symmetric",
        kappa_filter_decay: float = 0.0,
        random_feedback_key: Optional[Any] = None,
        name: Optional[str] = None,
        vjp_method: str = "single-step",
        fast_solve: bool = True,
        **kwargs,
    ):
        if feedback not in ("symmetric", "random"):
            raise ValueError(f"feedback must be 'symmetric' or 'random'; got {feedback!r}")
        if feedback == "random" and random_feedback_key is None:
            raise ValueError(
                "feedback='random' requires random_feedback_key=<PRNGKey>, e.g. "
                "jax.random.PRNGKey(0)"
            )
        kappa = float(kappa_filter_decay)
        if not 0.0 <= kappa < 1.0:
            raise ValueError(f"kappa_filter_decay must lie in [0, 1), got {kappa}")
        super().__init__(model, name=name, vjp_method=vjp_method, fast_solve=fast_solve, **kwargs)
        self.feedback = feedback
        self.kappa_filter_decay = kappa
        self.random_feedback_key = random_feedback_key

    @property
    def approximate_options(self) -> tuple[str, ...]:
        """The options on that make the gradient differ from D-RTRL's by design."""
        out = []
        if self.kappa_filter_decay > 0.0:
            out.append(f"kappa_filter_decay={self.kappa_filter_decay} (filtered trace)")
        if self.feedback == "random":
            out.append("feedback='random' (random projection of the learning signal)")
        return tuple(out)

    def learning_rule(self) -> online.LearningRule:
        feedback = None
        if self.feedback == "random":
            groups = self.graph.hidden_groups
            keys = jax.random.split(jnp.asarray(self.random_feedback_key), max(len(groups), 1))
            dtype = jnp.result_type(float)
            feedback = tuple(
                FEEDBACK_SCALE
                * jax.random.normal(keys[g.index], (g.varshape[-1],) * 2, dtype=dtype)
                for g in groups
            )
        return online.LearningRule(kappa=self.kappa_filter_decay, feedback=feedback)


class OSTLRecurrent(ParamDimVjpAlgorithm):
    """OSTL's 'with-H' regime: the trace keeps the hidden-to-hidden Jacobian; this is D-RTRL's
    per-weight trace (exact for element-wise recurrences, labelled approximate otherwise)."""

    regime = "with-H"


class OSTLFeedforward(IODimVjpAlgorithm):
    """OSTL's 'without-H' regime: ES-D-RTRL (pp-prop) with a negligible decay (default
    ``1e-6``), so the trace carries (almost) only the current step's input."""

    regime = "without-H"

    def __init__(self, model, decay_or_rank=1e-6, **kwargs):
        super().__init__(model, decay_or_rank, **kwargs)
