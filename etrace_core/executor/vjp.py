"""ETraceVjpGraphExecutor: Jacobians and dL/dh of a compiled step, for the VJP-based algorithms."""

from __future__ import annotations

from typing import Any

import jax
from jax import lax

from etrace_core.compiler.jaxpr_tools import eval_jaxpr
from etrace_core.compiler.state_leaves import read_leaves

from . import data
from .base import ETraceGraphExecutor
from .step import (
    CotangentFn,
    StepSpec,
    build_spec,
    jacobian_step,
    split_outputs,
    step_invals,
    vjp_step,
)

VJP_METHODS = ("single-step", "multi-step")


class VjpResiduals:
    """What a step keeps to turn output cotangents into dL/dparams (direct) and dL/dh.

    A pytree (the output structure is static), so it can be returned from `jax.jit`.
    """

    def __init__(self, vjp_fn, out_tree):
        self.vjp_fn, self.out_tree = vjp_fn, out_tree

    def __call__(self, out_cotangent):
        """(direct parameter gradients {path}, dL/dh {hidden path}, input gradients)."""
        return self.vjp_fn(jax.tree.leaves(out_cotangent))


jax.tree_util.register_pytree_node(
    VjpResiduals, lambda r: ((r.vjp_fn,), r.out_tree), lambda tree, ch: VjpResiduals(ch[0], tree)
)


class ETraceVjpGraphExecutor(ETraceGraphExecutor):
    """Executor for D-RTRL / ES-D-RTRL / hybrid.

    `vjp_method='single-step'`: dL/dh^t at each step. `'multi-step'`: with MultiStepData of k
    steps, the VJP runs through the k steps (exact BPTT inside the window).
    """

    def __init__(self, model, vjp_method: str = "single-step", **kwargs):
        super().__init__(model, **kwargs)
        if vjp_method not in VJP_METHODS:
            raise ValueError(f"unknown vjp_method {vjp_method!r}; expected one of {VJP_METHODS}")
        self.vjp_method = vjp_method
        self._spec: StepSpec | None = None

    @property
    def is_single_step_vjp(self) -> bool:
        return self.vjp_method == "single-step"

    @property
    def is_multi_step_vjp(self) -> bool:
        return self.vjp_method == "multi-step"

    @property
    def spec(self) -> StepSpec:
        if self._spec is None:
            _ = self.graph  # raises the not-compiled error
        return self._spec

    def _on_compiled(self) -> None:
        self._spec = build_spec(self.graph, self.param_trace_relations)

    def state_values(self, states=None) -> dict[tuple, Any]:
        """Current values of the states the step reads, looked up by path in the model now
        (`init_state` may have replaced the State objects the graph was compiled with);
        `states` is the model's `states()` when the caller already has it."""
        current = self.model.states() if states is None else states
        minfo = self.graph.module_info
        return read_leaves(current, minfo.leaf_refs or {}, minfo.state_paths)

    # -- public solvers (pure: they read states, never write them) ----------------------------

    def solve_h2w_h2h_jacobian(self, *args):
        """(outputs, new hidden {path}, other states {path}, (xs {rel}, dfs {(rel, group)}), Ds)."""
        if data.is_multi_step(args):
            return self._scan(args, with_vjp=False)
        return self._single(data.unwrap(args), self.state_values(), with_vjp=False)

    def solve_h2w_h2h_l2h_jacobian(self, *args):
        """As `solve_h2w_h2h_jacobian`, plus the VJP residuals giving dL/dh (and direct grads).

        With MultiStepData the residuals belong to the whole window: dL/dh is w.r.t. the hidden
        states at the window's start, and the direct gradients are BPTT inside the window.
        """
        if data.is_multi_step(args):
            return self._scan(args, with_vjp=True)
        return self._single(data.unwrap(args), self.state_values(), with_vjp=True)

    # -- helpers --------------------------------------------------------------------------------

    def _single(self, args, values, with_vjp):
        graph = self.graph
        minfo = graph.module_info
        flat = jax.tree.leaves(args)
        jac = jacobian_step(self.spec, flat, values)
        hidden, others = self._split_states(jac.new_values)
        outputs = jax.tree.unflatten(minfo.out_tree, jac.outputs)
        xs = dict(enumerate(jac.xs))
        dfs = {
            (k, g.index): df
            for k, r in enumerate(graph.hidden_param_op_relations)
            for g, df in zip(r.hidden_groups, jac.dfs[k])
        }
        result = (outputs, hidden, others, (xs, dfs), jac.Ds)
        if not with_vjp:
            return result
        vjp = vjp_step(self.spec, flat, values)
        return result + (VjpResiduals(vjp.vjp_fn, minfo.out_tree),)

    def _split_states(self, new_values):
        hidden_paths = set(self.graph.hid_path_to_group)
        hidden = {p: v for p, v in new_values.items() if p in hidden_paths}
        others = {p: v for p, v in new_values.items() if p not in hidden_paths}
        return hidden, others

    def _scan(self, args, with_vjp):
        seq, rebuild = data.split_for_scan(args)
        values = self.state_values()

        def body(vals, xs_t):
            outputs, hidden, others, etp, Ds = self._single(rebuild(xs_t), vals, with_vjp=False)
            vals = dict(vals)
            vals.update(hidden)
            vals.update({p: v for p, v in others.items() if p in vals})
            return vals, (outputs, hidden, others, etp, Ds)

        _, stacked = lax.scan(body, values, seq)
        if not with_vjp:
            return stacked
        return stacked + (self.window_vjp(args, values),)

    def window_vjp(self, args, values):
        """VJP of k exact steps w.r.t. (parameters, hidden states at the start, inputs)."""
        graph = self.graph
        minfo = graph.module_info
        seq, rebuild = data.split_for_scan(args)
        hidden_paths = list(graph.hid_path_to_group)
        param_paths = list(minfo.param_paths)

        def window(params, h0, seq):
            vals = dict(values)
            vals.update(params)
            vals.update(h0)

            def body(vals, xs_t):
                flat = jax.tree.leaves(rebuild(xs_t))
                outvals = eval_jaxpr(
                    minfo.jaxpr, minfo.closed_jaxpr.consts, step_invals(graph, flat, vals)
                )
                outs, new = split_outputs(graph, outvals)
                vals = dict(vals)
                vals.update({p: v for p, v in new.items() if p in vals})
                return vals, outs

            _, outs = lax.scan(body, vals, seq)
            return outs

        params = {p: values[p] for p in param_paths}
        h0 = {p: values[p] for p in hidden_paths}
        _, fn = jax.vjp(window, params, h0, seq)
        return VjpResiduals(CotangentFn(fn), minfo.out_tree)
