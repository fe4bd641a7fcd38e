"""etrace_core: an eligibility-trace compiler and online learning algorithms on JAX."""
from . import nn, ops
from .algorithms import (D_RTRL, ES_D_RTRL, ETraceAlgorithm, HybridDimVjpAlgorithm,
                         IODimVjpAlgorithm, OnlineResult, ParamDimVjpAlgorithm, pp_prop, run_online)
from .compiler import (CompilationError, CompiledGraph, ETraceGraph, HiddenGroup,
                       HiddenParamOpRelation, HiddenPerturbation, ModuleInfo, NotCompiledError,
                       add_hidden_perturbation_from_minfo, add_hidden_perturbation_in_module,
                       compile_etrace_graph, extract_module_info, find_hidden_groups_from_minfo,
                       find_hidden_groups_from_module, find_hidden_param_op_relations_from_minfo,
                       find_hidden_param_op_relations_from_module)
from .executor import (ETraceGraphExecutor, ETraceVjpGraphExecutor, MultiStepData, SingleStepData,
                       VjpResiduals)

__version__ = "0.1.0"

__all__ = [
    "nn", "ops",
    "ETraceGraph", "CompiledGraph", "ModuleInfo", "HiddenGroup", "HiddenParamOpRelation",
    "HiddenPerturbation", "CompilationError", "NotCompiledError",
    "compile_etrace_graph", "extract_module_info", "find_hidden_groups_from_minfo",
    "find_hidden_groups_from_module", "find_hidden_param_op_relations_from_minfo",
    "find_hidden_param_op_relations_from_module", "add_hidden_perturbation_from_minfo",
    "add_hidden_perturbation_in_module",
    "ETraceGraphExecutor", "ETraceVjpGraphExecutor", "VjpResiduals", "SingleStepData",
    "MultiStepData",
    "ETraceAlgorithm", "ParamDimVjpAlgorithm", "D_RTRL", "IODimVjpAlgorithm", "ES_D_RTRL",
    "pp_prop", "HybridDimVjpAlgorithm", "run_online", "OnlineResult",
]
