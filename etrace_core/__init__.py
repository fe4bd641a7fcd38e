"""etrace_core: an eligibility-trace compiler and online learning algorithms on JAX.

Importing it leaves ``jax_enable_x64`` as the user set it (importing brainstate resets it).
The names of braintrace's public API are here too (``compile``, ``matmul``, ``conv``,
``element_wise``, ``NotSupportedError``, ...), so ``import etrace_core as braintrace`` works
for the parts listed in docs/seed_api_coverage.md.
"""

from .x64 import keep_x64

with keep_x64():  # brainstate's import switches jax_enable_x64 off: keep the user's setting
    from . import nn, ops
    from .algorithms import (
        D_RTRL,
        ES_D_RTRL,
        UORO,
        EProp,
        ETraceAlgorithm,
        HybridDimVjpAlgorithm,
        IODimVjpAlgorithm,
        OnlineResult,
        OSTLFeedforward,
        OSTLRecurrent,
        ParamDimVjpAlgorithm,
        pp_prop,
        run_online,
    )
    from .compile import compile
    from .compiler import (
        CompilationError,
        CompiledGraph,
        ControlFlowPolicy,
        ETraceGraph,
        HiddenGroup,
        HiddenParamOpRelation,
        HiddenPerturbation,
        ModuleInfo,
        NotCompiledError,
        NotSupportedError,
        add_hidden_perturbation_from_minfo,
        add_hidden_perturbation_in_module,
        compile_etrace_graph,
        extract_module_info,
        find_hidden_groups_from_minfo,
        find_hidden_groups_from_module,
        find_hidden_param_op_relations_from_minfo,
        find_hidden_param_op_relations_from_module,
    )
    from .executor import (
        ETraceGraphExecutor,
        ETraceVjpGraphExecutor,
        MultiStepData,
        SingleStepData,
        VjpResiduals,
    )
    from .ops import (
        conv,
        einsum,
        element_wise,
        grouped_matmul,
        lora_matmul,
        matmul,
        sparse_matmul,
    )
    from .vmap import ETraceVmap

# braintrace's names for the same classes (aliases)
ETraceVjpAlgorithm = ETraceAlgorithm

__version__ = "0.1.0"

__all__ = [
    "nn",
    "ops",
    "matmul",
    "conv",
    "element_wise",
    "sparse_matmul",
    "grouped_matmul",
    "lora_matmul",
    "einsum",
    "compile",
    "ETraceVmap",
    "ETraceGraph",
    "CompiledGraph",
    "ModuleInfo",
    "HiddenGroup",
    "HiddenParamOpRelation",
    "HiddenPerturbation",
    "CompilationError",
    "ControlFlowPolicy",
    "NotCompiledError",
    "NotSupportedError",
    "compile_etrace_graph",
    "extract_module_info",
    "find_hidden_groups_from_minfo",
    "find_hidden_groups_from_module",
    "find_hidden_param_op_relations_from_minfo",
    "find_hidden_param_op_relations_from_module",
    "add_hidden_perturbation_from_minfo",
    "add_hidden_perturbation_in_module",
    "ETraceGraphExecutor",
    "ETraceVjpGraphExecutor",
    "VjpResiduals",
    "SingleStepData",
    "MultiStepData",
    "ETraceAlgorithm",
    "ETraceVjpAlgorithm",
    "ParamDimVjpAlgorithm",
    "EProp",
    "OSTLRecurrent",
    "OSTLFeedforward",
    "UORO",
    "D_RTRL",
    "IODimVjpAlgorithm",
    "ES_D_RTRL",
    "pp_prop",
    "HybridDimVjpAlgorithm",
    "run_online",
    "OnlineResult",
]
