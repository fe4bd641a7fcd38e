"""ETraceGraph and the compile pipeline: module info -> hidden groups -> relations ->
perturbation."""

from __future__ import annotations

import builtins
import warnings
from collections.abc import Sequence
from typing import NamedTuple, Optional

from jax.extend import core as jcore

from .errors import CompilationError
from .hidden_groups import HiddenGroup, find_hidden_groups_from_minfo
from .jaxpr_tools import CUSTOM_CALLS, LOOPS, uses_etp
from .module_info import ModuleInfo, Path, extract_module_info
from .perturbation import HiddenPerturbation, add_hidden_perturbation_from_minfo
from .relations import HiddenParamOpRelation, analyse_relations


class ETraceGraph(NamedTuple):
    """The compiled eligibility-trace graph of a one-step model."""

    module_info: ModuleInfo
    hidden_groups: Sequence[HiddenGroup]
    hid_path_to_group: builtins.dict[Path, HiddenGroup]
    hidden_param_op_relations: Sequence[HiddenParamOpRelation]
    hidden_perturb: Optional[HiddenPerturbation]

    def dict(self) -> dict:
        return self._asdict()


CompiledGraph = ETraceGraph


def compile_etrace_graph(model, *args, include_hidden_perturb: bool = True) -> ETraceGraph:
    """Compile `model` (a one-step brainstate module) called with `args` into an ETraceGraph.

    ``include_hidden_perturb=False`` leaves out the hidden perturbation (``hidden_perturb`` is
    None): enough to inspect the graph; the algorithms compile with it."""
    minfo = extract_module_info(model, *args)
    check_opaque_ops(minfo)
    groups, by_path = find_hidden_groups_from_minfo(minfo)
    if not groups:
        warnings.warn(
            f"{type(model).__name__} has no HiddenState written by its step: there is nothing to "
            "carry over time, so online learning gives each step's ordinary gradient "
            "(a feed-forward model)",
            UserWarning,
            stacklevel=2,
        )
    relations, _ = analyse_relations(minfo, by_path)
    perturb = (
        add_hidden_perturbation_from_minfo(minfo) if groups and include_hidden_perturb else None
    )
    return ETraceGraph(minfo, tuple(groups), by_path, tuple(relations), perturb)


def check_opaque_ops(minfo: ModuleInfo) -> None:
    """Refuse weights used inside loops/custom calls, where the compiler cannot follow them."""
    param_of = {v: p for p, v in minfo.param_invars.items()}
    for eqn in minfo.jaxpr.eqns:
        name = eqn.primitive.name
        if name not in LOOPS and name not in CUSTOM_CALLS:
            continue
        weights = [
            param_of[v] for v in eqn.invars if not isinstance(v, jcore.Literal) and v in param_of
        ]
        hidden_etp = uses_etp(eqn)
        if (name in LOOPS and weights) or hidden_etp:
            where = f" (weights {weights})" if weights else ""
            raise CompilationError(
                f"a {name} inside the step uses weights{where}"
                f"{' through an ETP op' if hidden_etp else ''}; the compiler cannot follow "
                "weights into an opaque loop or custom call. Move the weighted op out of the "
                "loop (loops without weights are fine)"
            )
