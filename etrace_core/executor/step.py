"""Evaluations of one compiled step: its Jacobians (D, df, M) and its loss VJP (dL/dh, direct
grads).

Both are interpreters of the graph's flat jaxpr, so they are pure functions of state values and
compose with jit, vmap and scan.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jcore

from etrace_core.compiler.graph import ETraceGraph
from etrace_core.compiler.jaxpr_tools import bind_eqn, read_var, stop_gradient_all
from etrace_core.compiler.positions import is_admissible, propagate, reachable, static_values
from etrace_core.compiler.relations import etp_operands
from etrace_core.compiler.shared_outputs import shared_output_sets

from .param_jacobian import param_jacobians

Path = tuple[str, ...]


class StepSpec(NamedTuple):
    """Static structure of a compiled graph that the step evaluations need."""

    graph: ETraceGraph
    relation_at: dict[int, tuple[int, ...]]  # eqn index -> its relations' indices (LoRA: 2)
    traced_operands: dict[int, tuple[int, ...]]  # relation eqn index -> operand positions traced
    admissible: frozenset  # eqn indices where positions survive (D/df paths)
    tail: frozenset  # eqn indices between relation outputs and h^t
    hidden_slot: dict[Any, tuple[tuple[int, int], ...]]  # hidden outvar -> ((group, slot), ...)
    seeds: tuple[tuple[tuple[int, int], ...], ...]  # cotangent seeds: ((group, slot), ...)
    escapes: bool  # outputs read h^{t-1} by a path that does not go through h^t
    param_traces: tuple = ()  # ParamTraceRelation: parameters traced outside ETP ops
    # sets of relation indices whose outputs reach the hidden states only through one sum, so
    # that their output-side Jacobians df are the same (compiler.shared_outputs)
    shared_outputs: tuple[tuple[int, ...], ...] = ()


def build_spec(graph: ETraceGraph, param_traces=()) -> StepSpec:
    minfo = graph.module_info
    jaxpr = minfo.jaxpr
    static = static_values(minfo.closed_jaxpr)
    eqn_index = {id(e): i for i, e in enumerate(jaxpr.eqns)}
    relation_at, traced = {}, {}
    for k, rel in enumerate(graph.hidden_param_op_relations):
        i = eqn_index[id(rel.eqn)]
        relation_at[i] = relation_at.get(i, ()) + (k,)
        w = rel.eqn.invars[rel.weight_operand]
        _, _, b = etp_operands(rel.eqn)
        positions = [
            j
            for j, v in enumerate(rel.eqn.invars)
            if (v is w) or (rel.bias_path is not None and v is b)
        ]
        traced[i] = tuple(sorted(set(traced.get(i, ())) | set(positions)))
    admissible = frozenset(i for i, e in enumerate(jaxpr.eqns) if is_admissible(e, static))

    # where each hidden state is made (its perturbation point): p_prod and the cuts go there
    made_at = (
        dict(zip(graph.hidden_perturb.perturb_paths, graph.hidden_perturb.perturb_vars))
        if graph.hidden_perturb is not None
        else {}
    )
    hidden_slot: dict[Any, list] = {}
    for g in graph.hidden_groups:
        for s, (path, v) in enumerate(zip(g.hidden_paths, g.hidden_outvars)):
            hidden_slot.setdefault(made_at.get(path, v), []).append((g.index, s))
    tail = _tail_eqns(jaxpr, graph, static, set(hidden_slot))
    tail = tail | param_tail_eqns(jaxpr, param_traces, set(hidden_slot))
    hidden_in = [v for g in graph.hidden_groups for v in g.hidden_invars]
    escaped = reachable(jaxpr, hidden_in, stop=set(hidden_slot)) - set(hidden_slot)
    escapes = bool(escaped & set(minfo.output_vars))
    return StepSpec(
        graph,
        relation_at,
        traced,
        admissible,
        tail,
        {v: tuple(s) for v, s in hidden_slot.items()},
        _seeds(graph),
        escapes,
        tuple(param_traces),
        shared_output_sets(jaxpr, graph.hidden_param_op_relations),
    )


def _tail_eqns(jaxpr, graph, static, hidden_vars) -> frozenset:
    """Admissible equations on a path from a relation's output to a hidden state."""
    tail = set()
    for rel in graph.hidden_param_op_relations:
        reach = propagate(jaxpr, rel.y, static).maps
        useful = set(v for v in hidden_vars if v in reach)
        for i in range(len(jaxpr.eqns) - 1, -1, -1):
            eqn = jaxpr.eqns[i]
            if not any(v in useful for v in eqn.outvars if not isinstance(v, jcore.DropVar)):
                continue
            carried = [v for v in eqn.invars if not isinstance(v, jcore.Literal) and v in reach]
            if carried and all(v in reach for v in eqn.outvars if not isinstance(v, jcore.DropVar)):
                tail.add(i)
                useful.update(carried)
    return frozenset(tail)


def param_tail_eqns(jaxpr, param_traces, made) -> frozenset:
    """Equations on a path from a traced parameter to where a hidden state is made."""
    tail = set()
    for r in param_traces:
        reach = reachable(jaxpr, [r.var], stop=made)
        useful = set(made)
        for i in range(len(jaxpr.eqns) - 1, -1, -1):
            eqn = jaxpr.eqns[i]
            if not any(v in useful for v in eqn.outvars if not isinstance(v, jcore.DropVar)):
                continue
            carried = [
                v
                for v in eqn.invars
                if not isinstance(v, jcore.Literal) and v in reach and v not in made
            ]
            if carried:
                tail.add(i)
                useful.update(carried)
    return frozenset(tail)


def _seeds(graph) -> tuple:
    """Cotangent seeds for the Jacobian VJP: one per state slot, split where groups share a
    weight."""
    groups = graph.hidden_groups
    if not groups:
        return ()
    shared = any(len(r.hidden_groups) > 1 for r in graph.hidden_param_op_relations)
    if shared:
        return tuple(((g.index, s),) for g in groups for s in range(g.num_state))
    depth = max(g.num_state for g in groups)
    return tuple(tuple((g.index, s) for g in groups if s < g.num_state) for s in range(depth))


# ----------------------------------------------------------------------------------------------
# Inputs and outputs of a step, by path


def step_invals(graph: ETraceGraph, args_flat, values: dict[Path, Any]) -> list:
    minfo = graph.module_info
    return list(args_flat) + [values[p] for p in minfo.state_paths]


def split_outputs(graph: ETraceGraph, outvals) -> tuple[list, dict[Path, Any]]:
    minfo = graph.module_info
    outs = list(outvals[: minfo.num_outputs])
    new = dict(zip(minfo.written_paths, outvals[minfo.num_outputs :]))
    return outs, new


# ----------------------------------------------------------------------------------------------
# Jacobians: D (h^{t-1} -> h^t), df (relation outputs -> h^t), M (same-step coupling in a group)


class StepJacobians(NamedTuple):
    outputs: list  # flat model outputs
    new_values: dict[Path, Any]  # written states
    xs: list[Any]  # per relation: canonical input X (ones column for bias)
    dfs: list[list[Any]]  # per relation, per reached group: L + (O, S)
    # per group, S x S nested lists of varshape arrays: D_blocks[g][s][s'] = dh_s/dh_s'. Kept
    # apart: consumers that only need products with them (the ES-D-RTRL output trace) fuse
    # them, where a stacked (..., S, S) array was written out every step
    D_blocks: list[list[list[Any]]]
    Ms: list[Any]  # per group: varshape + (S, S), dW_s/dp_s' (identity if S=1)
    Js: list[Any] = ()  # per param trace, per group: (U, S) or (U, S, |theta|)

    @property
    def Ds(self) -> list[Any]:
        """Per group: varshape + (S, S), D[..., s, s'] = dh_s/dh_s' (the blocks stacked)."""
        return [stack_blocks(b) for b in self.D_blocks]


def jacobian_step(spec: StepSpec, args_flat, values: dict[Path, Any]) -> StepJacobians:
    graph = spec.graph
    minfo, groups, rels = graph.module_info, graph.hidden_groups, graph.hidden_param_op_relations
    invals = step_invals(graph, args_flat, values)
    n_args = minfo.num_args
    state_index = {p: n_args + i for i, p in enumerate(minfo.state_paths)}

    h_prev = [[invals[state_index[p]] for p in g.hidden_paths] for g in groups]
    y_zero = [jnp.zeros(r.y.aval.shape, r.y.aval.dtype) for r in rels]
    p_zero = [[jnp.zeros(g.varshape, v.aval.dtype) for v in g.hidden_outvars] for g in groups]

    def cut_step(h_prev, y_pert, p_prod):
        vals = list(invals)
        for g, hs in zip(groups, h_prev):
            for p, h in zip(g.hidden_paths, hs):
                vals[state_index[p]] = h
        xs = [None] * len(rels)
        env = dict(zip(minfo.jaxpr.constvars, minfo.closed_jaxpr.consts))
        env.update(zip(minfo.jaxpr.invars, vals))
        for i, eqn in enumerate(minfo.jaxpr.eqns):
            ins = [read_var(env, v) for v in eqn.invars]
            outs = bind_eqn(eqn, ins)
            if i not in spec.admissible:
                outs = stop_gradient_all(outs)
            for k in spec.relation_at.get(i, ()):  # LoRA: one perturbation per factor
                xs[k] = _canonical_x(rels[k], ins)
                outs = [outs[0] + y_pert[k]]
            for v, o in zip(eqn.outvars, outs):
                if isinstance(v, jcore.DropVar):
                    continue
                for gi, s in spec.hidden_slot.get(v, ()):
                    o = o + jnp.reshape(p_prod[gi][s], jnp.shape(o))
                env[v] = o
        outvals = [read_var(env, v) for v in minfo.jaxpr.outvars]
        h_new = [[read_var(env, v) for v in g.hidden_outvars] for g in groups]
        return h_new, (outvals, [lax.stop_gradient(x) for x in xs])

    h_new, vjp_fn, (outvals, xs) = jax.vjp(cut_step, h_prev, y_zero, p_zero, has_aux=True)
    outs, new_values = split_outputs(graph, outvals)
    if not groups:
        return StepJacobians(outs, new_values, xs, [[] for _ in rels], [], [])

    cots = [_seed_cotangent(groups, seed, h_new) for seed in spec.seeds]
    stacked = jax.tree.map(lambda *c: jnp.stack(c), *cots)
    d_h, d_y, d_p = jax.vmap(vjp_fn)(stacked)
    # d_h[g][s'][seed] = sum_s seed_s * dh_s/dh_s'  -> per group (varshape, S, S)
    slot_of_seed = _slot_of_seed(spec.seeds, len(groups))
    D_blocks = [_block_lists(d_h[g.index], slot_of_seed[g.index]) for g in groups]
    Ms = [stack_blocks(_block_lists(d_p[g.index], slot_of_seed[g.index])) for g in groups]
    dfs = []
    for k, rel in enumerate(rels):
        rule = rel.rule
        per_group = []
        for g in rel.hidden_groups:
            cols = [
                rule.y_canon(rel.params, d_y[k][slot_of_seed[g.index][s]])
                for s in range(g.num_state)
            ]
            per_group.append(jnp.stack(cols, axis=-1))
        dfs.append(per_group)
    Js = param_jacobians(spec, args_flat, values) if spec.param_traces else ()
    return StepJacobians(outs, new_values, xs, dfs, D_blocks, Ms, Js)


def _seed_cotangent(groups, seed, like):
    chosen = dict(seed)
    return [
        [
            jnp.ones_like(like[g.index][s])
            if chosen.get(g.index) == s
            else jnp.zeros_like(like[g.index][s])
            for s in range(g.num_state)
        ]
        for g in groups
    ]


def _slot_of_seed(seeds, n_groups):
    """slot_of_seed[g][s] = index of the seed that carries (group g, slot s)."""
    table = [dict() for _ in range(n_groups)]
    for i, seed in enumerate(seeds):
        for g, s in seed:
            table[g][s] = i
    return [[table[g][s] for s in range(len(table[g]))] for g in range(n_groups)]


def _block_lists(per_input_slot, seed_of_slot) -> list[list[Any]]:
    """VJP results as blocks[s_out][s_in] (varshape arrays)."""
    return [[col[seed] for col in per_input_slot] for seed in seed_of_slot]


def stack_blocks(blocks: list[list[Any]]):
    """S x S nested blocks -> one varshape + (S_out, S_in) array."""
    return jnp.stack([jnp.stack(row, axis=-1) for row in blocks], axis=-2)


def _canonical_x(rel, ins):
    x = ins[0] if rel.has_x else None
    X = rel.rule.x_canon(rel.params, x, rel.rule_weight(ins))
    if rel.params.get("has_bias"):
        X = jnp.concatenate([X, jnp.ones(X.shape[:-1] + (1,), X.dtype)], axis=-1)
    return X


# ----------------------------------------------------------------------------------------------
# Loss VJP: outputs as a function of parameters, hidden perturbations and inputs


class StepVjp(NamedTuple):
    outputs: list
    new_values: dict[Path, Any]
    vjp_fn: Any  # out cotangents (flat list) -> (dparams {path}, dL/dh {path}, dargs (flat))
    escape_fn: Any = None  # out cotangents -> dL/dh^{t-1} {path} through paths avoiding h^t


def vjp_step(spec: StepSpec, args_flat, values: dict[Path, Any]) -> StepVjp:
    """The step with relation weights cut from their own tails (their gradient comes from the
    traces) and perturbations on every hidden state, differentiated w.r.t. parameters, the
    perturbations and the inputs."""
    graph = spec.graph
    minfo = graph.module_info
    param_paths = [p for p in minfo.param_paths]
    perturb_paths = graph.hidden_perturb.perturb_paths if graph.hidden_perturb else ()
    perturb_at = {}
    if graph.hidden_perturb is not None:
        perturb_at = dict(
            zip(graph.hidden_perturb.perturb_vars, graph.hidden_perturb.perturb_paths)
        )
    diff_args = [i for i, a in enumerate(args_flat) if _inexact(a)]

    def run(params, perturb, dargs):
        args = list(args_flat)
        for i, a in zip(diff_args, dargs):
            args[i] = a
        vals = dict(values)
        vals.update(params)
        invals = step_invals(graph, args, vals)
        live = dict(zip(minfo.jaxpr.constvars, minfo.closed_jaxpr.consts))
        live.update(zip(minfo.jaxpr.invars, invals))
        # parameters with their own traces are cut from their paths to h^t like relation
        # weights: the trace carries those paths
        twin = {r.var: lax.stop_gradient(live[r.var]) for r in spec.param_traces}
        for i, eqn in enumerate(minfo.jaxpr.eqns):
            ins = [read_var(live, v) for v in eqn.invars]
            outs = bind_eqn(eqn, ins)
            twins = None
            if i in spec.relation_at:
                cut = spec.traced_operands[i]
                twins = bind_eqn(
                    eqn,
                    [
                        lax.stop_gradient(a)
                        if j in cut
                        else (a if isinstance(v, jcore.Literal) else twin.get(v, a))
                        for j, (v, a) in enumerate(zip(eqn.invars, ins))
                    ],
                )
            elif i in spec.tail and any(
                not isinstance(v, jcore.Literal) and v in twin for v in eqn.invars
            ):
                twins = bind_eqn(
                    eqn,
                    [
                        twin.get(v, a) if not isinstance(v, jcore.Literal) else a
                        for v, a in zip(eqn.invars, ins)
                    ],
                )
            for j, v in enumerate(eqn.outvars):
                if isinstance(v, jcore.DropVar):
                    continue
                if v in perturb_at:
                    base = twins[j] if twins is not None else outs[j]
                    live[v] = base + jnp.reshape(perturb[perturb_at[v]], jnp.shape(base))
                    twin.pop(v, None)
                else:
                    live[v] = outs[j]
                    if twins is not None:
                        twin[v] = twins[j]
        outvals = [read_var(live, v) for v in minfo.jaxpr.outvars]
        outs, new_values = split_outputs(graph, outvals)
        return outs, new_values

    params = {p: values[p] for p in param_paths}
    perturb = {
        p: jnp.zeros(minfo.state_outvars[p].aval.shape, minfo.state_outvars[p].aval.dtype)
        for p in perturb_paths
    }
    dargs = [args_flat[i] for i in diff_args]
    outs, vjp_fn, new_values = jax.vjp(run, params, perturb, dargs, has_aux=True)
    escape = escape_vjp(spec, args_flat, values) if spec.escapes else None
    return StepVjp(outs, new_values, _ArgsVjp(vjp_fn, tuple(diff_args), len(args_flat)), escape)


def escape_vjp(spec: StepSpec, args_flat, values: dict[Path, Any]):
    """VJP of the outputs w.r.t. h^{t-1} along paths that avoid h^t (e.g. an output read from
    the membrane before its reset). Traces at t-1 turn it into the rest of the gradient."""
    graph = spec.graph
    minfo = graph.module_info
    hidden_paths = [p for g in graph.hidden_groups for p in g.hidden_paths]
    blocked = set(spec.hidden_slot)

    def run(shift):
        vals = dict(values)
        vals.update({p: values[p] + shift[p] for p in hidden_paths})
        env = dict(zip(minfo.jaxpr.constvars, minfo.closed_jaxpr.consts))
        env.update(zip(minfo.jaxpr.invars, step_invals(graph, args_flat, vals)))
        for eqn in minfo.jaxpr.eqns:
            outs = bind_eqn(eqn, [read_var(env, v) for v in eqn.invars])
            for v, o in zip(eqn.outvars, outs):
                if not isinstance(v, jcore.DropVar):
                    env[v] = lax.stop_gradient(o) if v in blocked else o
        return [read_var(env, v) for v in minfo.output_vars]

    zero = {p: jnp.zeros_like(values[p]) for p in hidden_paths}
    _, fn = jax.vjp(run, zero)
    return CotangentFn(fn, single=True)


class CotangentFn:
    """A VJP function taking the flat list of output cotangents; a pytree, so it can be a
    residual or cross a jit/scan boundary. `single`: the VJP has one primal input."""

    def __init__(self, fn, single: bool = False):
        self.fn, self.single = fn, single

    def __call__(self, out_cotangents):
        grads = self.fn(list(out_cotangents))
        return grads[0] if self.single else grads


jax.tree_util.register_pytree_node(
    CotangentFn, lambda v: ((v.fn,), v.single), lambda single, ch: CotangentFn(ch[0], single)
)


def _inexact(a) -> bool:
    return jnp.issubdtype(jnp.result_type(a), jnp.inexact)


class _ArgsVjp:
    """The VJP function, mapping input cotangents back to every positional argument."""

    def __init__(self, fn, diff_args: tuple[int, ...], num_args: int):
        self.fn, self.diff_args, self.num_args = fn, diff_args, num_args

    def __call__(self, out_cotangents):
        dparams, dh, dargs = self.fn(list(out_cotangents))
        full = [None] * self.num_args
        for i, d in zip(self.diff_args, dargs):
            full[i] = d
        return dparams, dh, full


jax.tree_util.register_pytree_node(
    _ArgsVjp,
    lambda v: ((v.fn,), (v.diff_args, v.num_args)),
    lambda aux, ch: _ArgsVjp(ch[0], *aux),
)

__all__ = [
    "StepSpec",
    "build_spec",
    "StepJacobians",
    "stack_blocks",
    "jacobian_step",
    "StepVjp",
    "vjp_step",
    "escape_vjp",
    "CotangentFn",
    "step_invals",
    "split_outputs",
]
