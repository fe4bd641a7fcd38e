"""ETraceGraphExecutor: compiles a model's graph and evaluates the Jacobians online learning
needs."""

from __future__ import annotations

from typing import Optional

import brainstate

from etrace_core.compiler.control_flow import ControlFlowPolicy, resolve_policy
from etrace_core.compiler.errors import NotCompiledError
from etrace_core.compiler.graph import ETraceGraph, compile_etrace_graph
from etrace_core.compiler.param_relations import (
    DEFAULT_DENSE_TRACE_BUDGET,
    find_param_trace_relations,
)

from . import data, show


class ETraceGraphExecutor:
    """Base executor: owns the model and its compiled graph; subclasses solve the Jacobians."""

    def __init__(
        self,
        model: brainstate.nn.Module,
        *,
        dense_trace_budget: int = DEFAULT_DENSE_TRACE_BUDGET,
        control_flow: Optional[ControlFlowPolicy] = None,
    ):
        """`control_flow`: the :class:`ControlFlowPolicy` the graph is compiled with (default
        ``ControlFlowPolicy()``); it ends up on ``graph.module_info.control_flow``."""
        if not isinstance(model, brainstate.nn.Module):
            raise TypeError(
                f"expected a brainstate.nn.Module, got {type(model).__name__}: the compiler reads "
                "the model's states and one-step program from a brainstate module"
            )
        self.model = model
        self._graph: Optional[ETraceGraph] = None
        self._state_id_to_path: Optional[dict[int, tuple]] = None
        self.dense_trace_budget = int(dense_trace_budget)
        self.control_flow = resolve_policy(control_flow)
        self._param_traces = ((), ())

    @property
    def graph(self) -> ETraceGraph:
        if self._graph is None:
            raise NotCompiledError(
                "the eligibility-trace graph is not compiled yet: call .compile_graph(*inputs) "
                "with one step's example inputs first"
            )
        return self._graph

    @property
    def is_compiled(self) -> bool:
        return self._graph is not None

    @property
    def states(self):
        return self.graph.module_info.retrieved_model_states

    @property
    def path_to_states(self):
        return self.states

    @property
    def state_id_to_path(self) -> dict[int, tuple]:
        if self._state_id_to_path is None:
            self._state_id_to_path = {id(st): p for p, st in self.states.items()}
        return self._state_id_to_path

    def compile_graph(self, *args) -> None:
        """Build the graph from one step's example inputs (MultiStepData: its first step)."""
        self._state_id_to_path = None
        graph = compile_etrace_graph(
            self.model, *data.single_step_example(args), control_flow=self.control_flow
        )
        found = find_param_trace_relations(
            graph.module_info,
            graph.hid_path_to_group,
            graph.hidden_param_op_relations,
            self.dense_trace_budget,
        )
        if found.replaced:  # relations that drop a mixing path: their dense traces replace them
            graph = graph._replace(
                hidden_param_op_relations=tuple(
                    r
                    for r in graph.hidden_param_op_relations
                    if r.weight_path not in found.replaced
                )
            )
        if found.also_used:  # a relation weight with another, untraced way into hidden states
            notes = dict(found.also_used)
            graph = graph._replace(
                hidden_param_op_relations=tuple(
                    r._replace(
                        approximations=r.approximations
                        + tuple(notes[p] for p in (r.weight_path, r.bias_path) if p in notes)
                    )
                    if r.weight_path in notes or r.bias_path in notes
                    else r
                    for r in graph.hidden_param_op_relations
                )
            )
        self._graph = graph
        self._param_traces = (found.traced, found.over_budget)
        self._on_compiled()

    @property
    def param_trace_relations(self):
        """Parameters traced outside ETP ops (element-wise or dense param-dim traces)."""
        _ = self.graph
        return self._param_traces[0]

    @property
    def over_budget_params(self):
        """Parameters feeding hidden states whose dense trace exceeds the budget."""
        _ = self.graph
        return self._param_traces[1]

    def _on_compiled(self) -> None:
        """Hook for subclasses to precompute structure once the graph exists."""

    def show_graph(self, verbose: bool = True, return_msg: bool = False):
        """Print (and/or return) the hidden groups, traced weights and untraced weights."""
        msg = show.graph_summary(self.graph, *self._param_traces)
        if verbose:
            print(msg)
        return msg if return_msg else None

    def graph_to_dot(self) -> str:
        return show.graph_to_dot(self.graph, *self._param_traces)

    def plot_graph(self, filename: str) -> str:
        return show.plot_graph(self.graph, filename, *self._param_traces)

    def solve_h2w_h2h_jacobian(self, *args):
        raise NotImplementedError(
            f"{type(self).__name__} does not implement solve_h2w_h2h_jacobian"
        )

    def solve_h2w_h2h_l2h_jacobian(self, *args):
        raise NotImplementedError(
            f"{type(self).__name__} does not implement solve_h2w_h2h_l2h_jacobian"
        )
