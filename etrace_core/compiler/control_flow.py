"""ControlFlowPolicy: etrace's one place for how the compiler treats cond / scan / while.

The knobs and their defaults are braintrace's (same names, same meaning where etrace honours
them). A value etrace cannot honour is refused when a model is compiled with it, never ignored:

- ``cond``: ``'convert'`` (etrace always if-converts a ``cond``: both branches run, ``select_n``
  picks the result). ``'opaque'`` is refused.
- ``scan_unroll_limit``: an inner ``scan`` that uses a weight (or an ETP op) and has static length
  up to this limit is unrolled into the flat step program, so its weights are traced like any
  other; a longer one is refused by name. ``0`` (or negative) unrolls nothing.
- ``while_hidden``: ``'opaque-fwd'`` (a weight-free ``while`` loop that feeds a hidden state is
  kept whole; its derivatives are assembled from forward-mode JVPs) or ``'error'`` (refuse it).
- ``etp_in_control_flow``: ``'error'`` (an ETP op left inside a loop is refused). ``'exclude'``
  (drop that weight from online learning) is refused: etrace never drops a weight silently.
- ``scan_descent``: ``'auto'`` or ``'off'``. etrace does not implement braintrace's structured
  descent into long scans: with either value a weighted scan longer than ``scan_unroll_limit``
  is refused, and the message says how to raise the limit.
- ``fixpoint_iteration_limit``: validated as in braintrace; etrace's canonicalisation is one
  structural recursion over the (finite) program, so it has no fixpoint loop to bound.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import NotSupportedError

_CHOICES = {
    "cond": ("convert", "opaque"),
    "while_hidden": ("opaque-fwd", "error"),
    "etp_in_control_flow": ("error", "exclude"),
    "scan_descent": ("auto", "off"),
}

# known values etrace refuses, with the reason and the fix
_REFUSED = {
    ("cond", "opaque"): (
        "etrace always if-converts a cond (both branches are evaluated and select_n picks the "
        "result), so weights inside branches are traced; to keep a dead branch's NaN/Inf "
        "derivative out of the gradient, guard the operand inside the branch "
        "(e.g. sqrt(where(ok, x, 1.)))"
    ),
    ("etp_in_control_flow", "exclude"): (
        "etrace never drops a weight from online learning silently; move the ETP op out of the "
        "loop, or make the loop a scan of static length within scan_unroll_limit so it is "
        "unrolled"
    ),
}


@dataclass(frozen=True)
class ControlFlowPolicy:
    """How the compiler handles control flow inside one step (see the module docstring)."""

    cond: str = "convert"
    scan_unroll_limit: int = 16
    while_hidden: str = "opaque-fwd"
    etp_in_control_flow: str = "error"
    scan_descent: str = "auto"
    fixpoint_iteration_limit: int = 64

    def __post_init__(self) -> None:
        for knob, choices in _CHOICES.items():
            value = getattr(self, knob)
            if value not in choices:
                raise ValueError(
                    f"ControlFlowPolicy.{knob} must be one of {list(choices)}, got {value!r}"
                )
        for knob in ("scan_unroll_limit", "fixpoint_iteration_limit"):
            value = getattr(self, knob)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"ControlFlowPolicy.{knob} must be an int, got {value!r}")
        if self.fixpoint_iteration_limit < 1:
            raise ValueError(
                "ControlFlowPolicy.fixpoint_iteration_limit must be a positive integer, got "
                f"{self.fixpoint_iteration_limit!r}"
            )

    def check_supported(self) -> None:
        """Refuse the knob values etrace cannot honour (NotSupportedError, with the fix)."""
        refused = [
            f"ControlFlowPolicy({knob}={getattr(self, knob)!r}): {why}"
            for (knob, value), why in _REFUSED.items()
            if getattr(self, knob) == value
        ]
        if refused:
            raise NotSupportedError("; ".join(refused))


DEFAULT_CONTROL_FLOW_POLICY = ControlFlowPolicy()


def resolve_policy(policy) -> ControlFlowPolicy:
    """`policy`, or the default when None; anything else is a TypeError."""
    if policy is None:
        return DEFAULT_CONTROL_FLOW_POLICY
    if not isinstance(policy, ControlFlowPolicy):
        raise TypeError(
            f"control_flow must be a ControlFlowPolicy (or None), got {type(policy).__name__}"
        )
    return policy
