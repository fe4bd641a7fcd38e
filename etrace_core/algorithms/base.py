"""ETraceAlgorithm: wraps a one-step model so that the grad of a loss of its output is the online
gradient."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import numpy as np

from etrace_core.compiler.errors import NotCompiledError
from etrace_core.compiler.param_relations import DEFAULT_DENSE_TRACE_BUDGET
from etrace_core.compiler.state_leaves import read_leaves, write_leaves
from etrace_core.executor import data
from etrace_core.executor.step import jacobian_step, vjp_step
from etrace_core.executor.vjp import ETraceVjpGraphExecutor

from . import online, param_traces
from .seq_drivers import SequenceDriverMixin


class _Compiled:
    """What compile_graph derives (kept out of brainstate's state graph): the trace plan, the
    example step inputs, and the jitted sequence drivers of this graph by loss function."""

    def __init__(self, plan=None, example=None):
        self.plan, self.example, self.drivers = plan, example, {}
        self.states = None  # the model's states by path at the last full walk (_check_ready)


class ETraceState(brainstate.ShortTermState):
    """Eligibility traces (and the count of time steps they have seen)."""


class ETraceAlgorithm(SequenceDriverMixin, brainstate.nn.Module):
    """Base of the online algorithms: `algo(x)` runs one step of `model` and updates the traces.

    Differentiating a loss of `algo(x)` w.r.t. the model's ParamStates gives the online gradient:
    traced weights get dL/dh^t . trace, every other parameter its exact same-step gradient.
    """

    def __init__(
        self,
        model: brainstate.nn.Module,
        *,
        vjp_method: str = "single-step",
        check_finite: bool = False,
        auto_reinit: bool = False,
        dense_trace_budget: int = DEFAULT_DENSE_TRACE_BUDGET,
        fast_solve: bool = True,
        trace_dtype=None,
        control_flow=None,
        name=None,
    ):
        """`dense_trace_budget`: the largest dense parameter trace dh/dtheta (elements, batch
        included) kept for a parameter that reaches hidden states through a position-mixing
        op; a larger one leaves the parameter its same-step gradient, labelled approximate.
        `control_flow`: a :class:`~etrace_core.ControlFlowPolicy` for the compiler (inner scans
        unrolled, while loops); default ``ControlFlowPolicy()``."""
        super().__init__(name=name)
        self.model = model
        self.executor = ETraceVjpGraphExecutor(
            model, vjp_method, dense_trace_budget=dense_trace_budget, control_flow=control_flow
        )
        self.check_finite = check_finite
        self.auto_reinit = auto_reinit
        # braintrace's switch between two implementations of the same trace update; etrace has
        # one (per hidden group, block-diagonal), so the flag is kept for compatibility only
        self.fast_solve = bool(fast_solve)
        self.trace_dtype = None if trace_dtype is None else jnp.dtype(trace_dtype)
        self.running_index = brainstate.LongTermState(jax.device_put(np.zeros((), np.int32)))
        self.etrace = None
        self._compiled = _Compiled()

    # -- graph --------------------------------------------------------------------------------

    @property
    def graph(self):
        return self.executor.graph

    @property
    def vjp_method(self) -> str:
        return self.executor.vjp_method

    @property
    def graph_executor(self):
        """The graph executor (alias of ``executor``, braintrace's name)."""
        return self.executor

    @property
    def is_compiled(self) -> bool:
        """Whether ``compile_graph`` has run."""
        return self._plan is not None

    @property
    def param_states(self):
        """The model's ParamStates by path."""
        return self.model.states(brainstate.ParamState)

    @property
    def hidden_states(self):
        """The model's HiddenStates by path."""
        return self.model.states(brainstate.HiddenState)

    def compile_graph(self, *args) -> None:
        """Compile the model's one-step graph from example inputs, plan the traces and create
        them (zero), so ``algo.compile_graph(x); algo(x)`` runs; ``init_etrace_state()`` zeroes
        them again (e.g. before a new sequence).

        The traces get a new State object, as ``init_all_states`` gives the hidden states new
        ones: compiled inside ``brainstate.transform.vmap_new_states`` (per-sample vmap), the
        traces are then per-sample states like the hidden states they follow."""
        self._build(args)
        self.etrace = None
        self.init_etrace_state()

    def _build(self, args) -> None:
        """Compile the graph and plan the traces for example step inputs `args`."""
        self.executor.compile_graph(*args)
        self._compiled = _Compiled(
            plan=online.make_plan(
                self.executor.spec, self.trace_kinds(), self.decay, self.learning_rule()
            ),
            example=data.single_step_example(args),
        )

    def show_graph(self, verbose: bool = True, return_msg: bool = False):
        msg = self.executor.show_graph(verbose=False, return_msg=True)
        if self._plan is not None:
            lines = [f"Algorithm {type(self).__name__}: trace kind per weight"]
            rels = self.graph.hidden_param_op_relations
            for k, r in enumerate(rels):
                shared = online.output_side_shared_with(self._plan, k)
                note = (
                    f" (output-side trace shared with {rels[shared].weight_path}: their outputs "
                    "are summed before the hidden state)"
                    if shared is not None
                    else ""
                )
                lines.append(f"  {r.weight_path}: {self._plan.kinds[k]}-dim trace{note}")
            for r in self.executor.param_trace_relations:
                lines.append(f"  {r.path}: param-dim trace ({r.kind})")
            msg = msg + "\n" + "\n".join(lines)
        if verbose:
            print(msg)
        return msg if return_msg else None

    def graph_to_dot(self) -> str:
        return self.executor.graph_to_dot()

    def plot_graph(self, filename: str) -> str:
        return self.executor.plot_graph(filename)

    @property
    def _plan(self):
        return self._compiled.plan

    @property
    def _drivers(self):
        return self._compiled.drivers

    # -- subclass hooks -----------------------------------------------------------------------

    decay = 0.0

    def trace_kinds(self) -> Sequence[str]:
        raise NotImplementedError

    def learning_rule(self) -> online.LearningRule:
        """How trace gradients are formed (called once the graph is compiled); the exact
        rule ``dL/dh^t . trace^t`` unless a subclass says otherwise (e-prop)."""
        return online.LearningRule()

    # -- traces -------------------------------------------------------------------------------

    def init_etrace_state(self, *args, **kwargs) -> None:
        """Create zero traces for the current hidden-state shapes."""
        plan = self._require_plan()
        shapes = jax.eval_shape(lambda: online.init_traces(plan))
        dtype = self.trace_dtype
        traces = jax.tree.map(
            lambda s: np.zeros(s.shape, s.dtype if dtype is None else dtype), shapes
        )
        value = {"traces": traces, "count": np.zeros((), _float_dtype())}
        value = _committed(value, self.model)
        self.running_index.value = _committed(np.zeros((), np.int32), self.model)
        if self.etrace is None:
            self.etrace = ETraceState(value)
        else:  # keep the State object (a new one made inside a transformation would leak)
            self.etrace.value = value

    def reset_state(self, *args, **kwargs) -> None:
        """Zero the traces (the model's own states are reset by the model)."""
        if self.etrace is not None:
            zeros = jax.tree.map(lambda x: np.zeros(jnp.shape(x), x.dtype), self.etrace.value)
            self.etrace.value = _committed(zeros, self.model)

    def _weight_path(self, weight) -> tuple:
        """The model path of `weight`: a ParamState of the model, a path tuple or one name."""
        if isinstance(weight, brainstate.State):
            found = [p for p, st in self.model.states().items() if st is weight]
            if not found:
                raise KeyError(
                    f"{type(weight).__name__} is not a state of {type(self.model).__name__}"
                )
            return tuple(found[0])
        return tuple(weight) if isinstance(weight, (tuple, list)) else (weight,)

    def get_etrace_of(self, weight) -> dict[str, Any]:
        """The traces of one weight (its path, or its ParamState), by connection (relation,
        hidden group). A ParamState whose value is a dict gives the traces of all its entries.
        An io-dim trace whose output side is shared (see ``show_graph``) comes with the shared
        ``f`` (the same array for each weight that shares it)."""
        plan = self._require_plan()
        self._require_etrace()
        weight_path = self._weight_path(weight)
        out = {}
        for c, conn in enumerate(plan.connections):
            path = self.graph.hidden_param_op_relations[conn.rel].weight_path
            if path == weight_path or path[: len(weight_path)] == weight_path:
                traces = self.etrace.value["traces"]
                out[online.trace_key(conn)] = online.connection_trace(plan, traces, c)
        for k, r in enumerate(plan.spec.param_traces):
            if r.path == weight_path:
                for g in r.hidden_groups:
                    key = param_traces.trace_key(k, g.index)
                    out[key] = self.etrace.value["traces"][key]
        if not out:
            raise KeyError(
                f"{weight_path} has no eligibility trace; traced weights: "
                f"{[r.weight_path for r in self.graph.hidden_param_op_relations]}"
                + (
                    f", traced parameters: {[r.path for r in plan.spec.param_traces]}"
                    if plan.spec.param_traces
                    else ""
                )
            )
        return out

    def trace_sizes(self) -> dict[str, int]:
        """Number of scalars each trace holds, by trace key. A shared io-dim output side
        (see ``show_graph``) is held, and counted, once: under the first weight sharing it."""
        self._require_etrace()
        return online.trace_sizes(self.etrace.value["traces"])

    def _require_etrace(self):
        self._require_plan()
        if self.etrace is None:
            raise NotCompiledError(f"call {type(self).__name__}.init_etrace_state() first")

    # -- stepping -----------------------------------------------------------------------------

    def update(self, *args):
        states = self._check_ready()
        # braintrace's running_index counts update calls; the de-bias count of ES-D-RTRL
        # (etrace["count"]) counts time steps
        self.running_index.value = self.running_index.value + 1
        if data.is_multi_step(args):
            if self.executor.is_multi_step_vjp:
                return self._run_window(args, states)
            return self._run_chunk(args, states)
        return self._run_step(data.unwrap(args), states)

    def _require_plan(self):
        if self._plan is None:
            raise NotCompiledError(
                f"{type(self).__name__} is not compiled: call .compile_graph(*inputs) and "
                ".init_etrace_state() before stepping"
            )
        return self._plan

    def _check_ready(self):
        """Raise unless the algorithm can step; returns the model's current states by path."""
        plan = self._require_ready()
        # States are read and written by path at every step (`init_state` and
        # `brainstate.nn.init_all_states` may replace the State objects): check that the
        # model's current states still exist and keep the shapes the graph was compiled for.
        current = self._current_states()
        hidden_now = read_leaves(
            current,
            self.graph.module_info.leaf_refs or {},
            [p for g in plan.spec.graph.hidden_groups for p in g.hidden_paths],
        )
        self._check_hidden_shapes(hidden_now)
        return current

    def _ready_values(self):
        """`_check_ready` and `_split_values` with each state read once (the streaming path
        reads them at every call): the model's states by path, and the step's values split
        into (params, rest)."""
        self._require_ready()
        current = self._current_states()
        values = self.executor.state_values(current)
        self._check_hidden_shapes(values)
        params = {p: values[p] for p in self.graph.module_info.param_paths}
        rest = {p: v for p, v in values.items() if p not in params}
        return current, params, rest

    def _require_ready(self):
        plan = self._require_plan()
        if self.etrace is None:
            raise NotCompiledError(
                f"call {type(self).__name__}.init_etrace_state() before stepping"
            )
        return plan

    def _check_hidden_shapes(self, hidden_now) -> None:
        """Raise (or rebuild, `auto_reinit`) when a hidden state in `hidden_now` ({leaf path:
        value}) no longer has the shape the graph and traces were built for."""
        for g in self._plan.spec.graph.hidden_groups:
            for p in g.hidden_paths:
                shape = tuple(jnp.shape(hidden_now[p]))
                if shape != tuple(g.varshape):
                    if self.auto_reinit:
                        with jax.ensure_compile_time_eval():  # also inside a transformation
                            # keeps the trace State object (a new one made inside a
                            # transformation would leak)
                            self._build(self._example_for(shape))
                            self.init_etrace_state()
                        return
                    raise ValueError(
                        f"hidden state {p} has shape {shape} but the graph and traces were built "
                        f"for {tuple(g.varshape)} (a different batch size?); call "
                        "compile_graph(x) and init_etrace_state() again, or construct the "
                        "algorithm with auto_reinit=True"
                    )

    def _current_states(self):
        """The model's states by path, as `model.states()` gives them.

        The full walk of the module tree costs more than a streaming step's own Python, so the
        last walk is kept and re-used while every state in it is still the object found at its
        path (a few attribute look-ups). A State replaced or removed (`init_state`, a new
        submodule) fails that check and the tree is walked again; states added elsewhere are
        not read by the compiled step.
        """
        held = self.graph.module_info.retrieved_model_states
        known = self._compiled.states
        if known is not None and known[0] is held and _still_at_paths(self.model, known[1]):
            return known[1]
        current = self.model.states()
        missing = [p for p in held if p not in current]
        if missing:
            raise ValueError(
                f"the model no longer has the states {missing} it was compiled "
                "with; call compile_graph(x) and init_etrace_state() again"
            )
        self._compiled.states = (held, current)
        return current

    def _example_for(self, hidden_shape):
        # numpy, not jnp: this can run inside a transformation (brainstate grad of `algo(x)`),
        # where jnp.zeros would be a tracer and compile_graph needs concrete example inputs
        batch = hidden_shape[0] if hidden_shape else None
        return jax.tree.map(
            lambda a: np.zeros((batch,) + tuple(np.shape(a))[1:], jnp.result_type(a)),
            self._compiled.example,
        )

    def _split_values(self, states):
        values = self.executor.state_values(states)
        params = {p: values[p] for p in self.graph.module_info.param_paths}
        rest = {p: v for p, v in values.items() if p not in params}
        return params, rest

    def _write(self, new_values, etrace, states):
        write_leaves(states, self.graph.module_info.leaf_refs or {}, new_values)
        self.etrace.value = etrace

    def _run_step(self, args, states):
        params, rest = self._split_values(states)
        flat = jax.tree.leaves(args)
        outs, new_values, etrace = _online_step(
            self._plan, self.check_finite, params, rest, self.etrace.value, flat
        )
        self._write(new_values, etrace, states)
        return jax.tree.unflatten(self.graph.module_info.out_tree, outs)

    def _run_chunk(self, args, states):
        seq, rebuild = data.split_for_scan(args)
        params, rest = self._split_values(states)
        outs, new_values, etrace = _online_chunk(
            self._plan, self.check_finite, rebuild, params, rest, self.etrace.value, seq
        )
        self._write(new_values, etrace, states)
        return jax.tree.unflatten(self.graph.module_info.out_tree, outs)

    def _run_window(self, args, states):
        params, rest = self._split_values(states)
        outs, new_values, etrace = _online_window(
            self._plan, self.check_finite, self.executor, args, params, rest, self.etrace.value
        )
        self._write(new_values, etrace, states)
        return jax.tree.unflatten(self.graph.module_info.out_tree, outs)


def _still_at_paths(root, states) -> bool:
    """Whether each State of `states` ({path: State}) is still the object at its path under
    `root` (module attributes, list/tuple items and dict entries, as brainstate's graph walk
    names them). Anything unexpected answers False, and the caller walks the tree again."""
    try:
        for path, st in states.items():
            node = root
            for key in path:
                if isinstance(node, (list, tuple, dict)):
                    node = node[key]
                else:
                    node = vars(node)[key]
            if node is not st:
                return False
    except (KeyError, IndexError, TypeError):
        return False
    return True


def _float_dtype():
    return jnp.result_type(float)


def zero_cotangent(x):
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, dtype=jax.dtypes.float0)


def _advance(plan, check_finite, etrace, jac):
    traces = online.update_traces(plan, etrace["traces"], jac)
    # traces keep the dtype they were created with (``trace_dtype``)
    traces = jax.tree.map(lambda new, old: new.astype(old.dtype), traces, etrace["traces"])
    if check_finite:
        _raise_if_not_finite(plan, traces)
    return {"traces": traces, "count": etrace["count"] + 1}


def _raise_if_not_finite(plan, traces):
    rels = plan.spec.graph.hidden_param_op_relations
    for conn in plan.connections:
        ok = online.all_finite(traces[online.trace_key(conn)])
        brainstate.transform.jit_error_if(
            jnp.logical_not(ok),
            f"non-finite value in the eligibility trace of weight {rels[conn.rel].weight_path} "
            f"(hidden group {conn.group}); lower the learning rate or check the model's inputs",
        )
    for k, r in enumerate(plan.spec.param_traces):
        for g in r.hidden_groups:
            ok = online.all_finite(traces[param_traces.trace_key(k, g.index)])
            brainstate.transform.jit_error_if(
                jnp.logical_not(ok),
                f"non-finite value in the eligibility trace of parameter {r.path} (hidden group "
                f"{g.index}); lower the learning rate or check the model's inputs",
            )


def _direct_and_trace_grads(plan, params, etrace, dparams, dh, Ms):
    deltas = online.partial_hidden_grads(plan, dh, Ms)
    grads = online.trace_grads(plan, params, etrace["traces"], etrace["count"], deltas)
    return online.add_grads(dparams, grads)


def _escape_grads(plan, params, old_etrace, escape_fn, out_cotangents):
    """The part of the gradient carried by paths from h^{t-1} to the outputs that avoid h^t:
    dL/dh^{t-1} (those paths) . traces at t-1. Empty when the step has no such path."""
    if escape_fn is None:
        return {}
    deltas = online.partial_hidden_grads(plan, escape_fn(out_cotangents), None)
    return online.trace_grads(plan, params, old_etrace["traces"], old_etrace["count"], deltas)


# ---- one step --------------------------------------------------------------------------------


def _online_step(plan, check_finite, params, rest, etrace, flat):
    fn = jax.custom_vjp(lambda p, r, e, a: _step_primal(plan, check_finite, p, r, e, a))
    fn.defvjp(lambda p, r, e, a: _step_fwd(plan, check_finite, p, r, e, a), _step_bwd(plan))
    return fn(params, rest, etrace, flat)


def _step_primal(plan, check_finite, params, rest, etrace, flat):
    jac = jacobian_step(plan.spec, flat, {**rest, **params})
    return jac.outputs, jac.new_values, _advance(plan, check_finite, etrace, jac)


def _step_fwd(plan, check_finite, params, rest, etrace, flat):
    values = {**rest, **params}
    jac = jacobian_step(plan.spec, flat, values)
    vjp = vjp_step(plan.spec, flat, values)
    new_etrace = _advance(plan, check_finite, etrace, jac)
    residuals = (vjp.vjp_fn, vjp.escape_fn, params, new_etrace, jac.Ms, rest, etrace, flat)
    return (jac.outputs, jac.new_values, new_etrace), residuals


def _step_bwd(plan):
    def bwd(residuals, cts):
        vjp_fn, escape_fn, params, new_etrace, Ms, rest, etrace, flat = residuals
        dparams, dh, dargs = vjp_fn(cts[0])
        grads = _direct_and_trace_grads(plan, params, new_etrace, dparams, dh, Ms)
        grads = online.add_grads(grads, _escape_grads(plan, params, etrace, escape_fn, cts[0]))
        dargs = [zero_cotangent(a) if d is None else d for a, d in zip(flat, dargs)]
        return (
            grads,
            jax.tree.map(zero_cotangent, rest),
            jax.tree.map(zero_cotangent, etrace),
            dargs,
        )

    return bwd


# ---- k single steps (single-step VJP over a MultiStepData chunk) -----------------------------


def _online_chunk(plan, check_finite, rebuild, params, rest, etrace, seq):
    def primal(p, r, e, s):
        outs, new, e2, _ = _chunk_scan(plan, check_finite, rebuild, p, r, e, s, with_vjp=False)
        return outs, new, e2

    def fwd(p, r, e, s):
        outs, new, e2, per_step = _chunk_scan(
            plan, check_finite, rebuild, p, r, e, s, with_vjp=True
        )
        return (outs, new, e2), (per_step, p, r, e, s)

    def bwd(res, cts):
        (vjp_fns, escape_fns, old_etraces, etraces, Ms), p, r, e, s = res

        def body(acc, item):
            vjp_fn, escape_fn, old, et, M, g_out = item
            dparams, dh, _ = vjp_fn(g_out)
            acc = online.add_grads(acc, _direct_and_trace_grads(plan, p, et, dparams, dh, M))
            return online.add_grads(acc, _escape_grads(plan, p, old, escape_fn, g_out)), None

        zero = jax.tree.map(jnp.zeros_like, p)
        grads, _ = jax.lax.scan(body, zero, (vjp_fns, escape_fns, old_etraces, etraces, Ms, cts[0]))
        return (
            grads,
            jax.tree.map(zero_cotangent, r),
            jax.tree.map(zero_cotangent, e),
            jax.tree.map(zero_cotangent, s),
        )

    fn = jax.custom_vjp(primal)
    fn.defvjp(fwd, bwd)
    return fn(params, rest, etrace, seq)


def _chunk_scan(plan, check_finite, rebuild, params, rest, etrace, seq, with_vjp):
    def body(carry, xs_t):
        rest, etrace = carry
        flat = jax.tree.leaves(rebuild(xs_t))
        values = {**rest, **params}
        jac = jacobian_step(plan.spec, flat, values)
        old, etrace = etrace, _advance(plan, check_finite, etrace, jac)
        rest = dict(rest)
        rest.update({p: v for p, v in jac.new_values.items() if p in rest})
        extra = None
        if with_vjp:
            vjp = vjp_step(plan.spec, flat, values)
            extra = (
                vjp.vjp_fn,
                vjp.escape_fn,
                old if vjp.escape_fn is not None else None,
                etrace,
                jac.Ms,
            )
        return (rest, etrace), (jac.outputs, jac.new_values, extra)

    (rest_f, etrace_f), (outs, new_values, extra) = jax.lax.scan(body, (rest, etrace), seq)
    last = jax.tree.map(lambda v: v[-1], new_values)
    return outs, last, etrace_f, extra


# ---- a multi-step window: exact BPTT inside, traces across windows -----------------------------


def _online_window(plan, check_finite, executor, args, params, rest, etrace):
    seq, rebuild = data.split_for_scan(args)

    def primal(p, r, e, s):
        outs, new, e2, _ = _chunk_scan(plan, check_finite, rebuild, p, r, e, s, with_vjp=False)
        return outs, new, e2

    def fwd(p, r, e, s):
        outs, new, e2, _ = _chunk_scan(plan, check_finite, rebuild, p, r, e, s, with_vjp=False)
        window_args = tuple(
            data.MultiStepData(x) if isinstance(a, data.MultiStepData) else a
            for a, x in zip(args, _refill(args, s))
        )
        window_fn = executor.window_vjp(window_args, {**r, **p}).vjp_fn
        return (outs, new, e2), (window_fn, p, r, e, s)

    def bwd(res, cts):
        window_fn, p, r, e, s = res
        dparams, dh0, dseq = window_fn(jax.tree.leaves(cts[0]))
        grads = _direct_and_trace_grads(plan, p, e, dparams, dh0, None)
        return (
            grads,
            jax.tree.map(zero_cotangent, r),
            jax.tree.map(zero_cotangent, e),
            jax.tree.map(zero_cotangent, s),
        )

    fn = jax.custom_vjp(primal)
    fn.defvjp(fwd, bwd)
    return fn(params, rest, etrace, seq)


def _refill(args, seq):
    """Per-arg data, taking MultiStepData values from `seq` (which may be tracers)."""
    it = iter(seq)
    return [next(it) if isinstance(a, data.MultiStepData) else None for a in args]


def _committed(tree, model):
    """`tree` placed (committed) on the device of the model's parameters.

    A jitted step returns committed arrays; fresh `jnp.zeros` are not. Feeding the step both
    kinds in turn would compile it twice (the cache keys on commitment), so traces are
    committed from the start. NumPy leaves are transferred as they are (no compiled fill op).
    """
    leaves = [s.value for s in model.states(brainstate.ParamState).values()]
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves([leaves, tree])):
        # inside a transformation (auto_reinit): placement is the caller's
        return jax.tree.map(jnp.asarray, tree)
    arrays = [x for x in jax.tree.leaves(leaves) if isinstance(x, jax.Array)]
    device = next(iter(arrays[0].devices())) if arrays else jax.devices()[0]
    return jax.device_put(tree, device)
