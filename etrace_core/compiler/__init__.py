"""The eligibility-trace compiler: jaxpr analyses that build an ETraceGraph."""

from .control_flow import DEFAULT_CONTROL_FLOW_POLICY, ControlFlowPolicy
from .errors import CompilationError, NotCompiledError, NotSupportedError
from .graph import CompiledGraph, ETraceGraph, compile_etrace_graph
from .hidden_groups import (
    HiddenGroup,
    find_hidden_groups_from_minfo,
    find_hidden_groups_from_module,
)
from .module_info import ModuleInfo, extract_module_info
from .perturbation import (
    HiddenPerturbation,
    add_hidden_perturbation_from_minfo,
    add_hidden_perturbation_in_module,
)
from .relations import (
    HiddenParamOpRelation,
    UntracedUse,
    analyse_relations,
    find_hidden_param_op_relations_from_minfo,
    find_hidden_param_op_relations_from_module,
)

__all__ = [
    "ControlFlowPolicy",
    "DEFAULT_CONTROL_FLOW_POLICY",
    "CompilationError",
    "NotCompiledError",
    "NotSupportedError",
    "ETraceGraph",
    "CompiledGraph",
    "compile_etrace_graph",
    "HiddenGroup",
    "find_hidden_groups_from_minfo",
    "find_hidden_groups_from_module",
    "ModuleInfo",
    "extract_module_info",
    "HiddenPerturbation",
    "add_hidden_perturbation_from_minfo",
    "add_hidden_perturbation_in_module",
    "HiddenParamOpRelation",
    "UntracedUse",
    "analyse_relations",
    "find_hidden_param_op_relations_from_minfo",
    "find_hidden_param_op_relations_from_module",
]
