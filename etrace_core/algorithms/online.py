"""The pure core of online learning: trace updates and trace gradients over a compiled step."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from etrace_core.executor.step import StepJacobians, StepSpec

from . import param_traces
from .traces import TRACE_KINDS, Connection, IODimTrace, gather_units, tiling

Path = tuple[str, ...]


class LearningRule(NamedTuple):
    """How a trace gradient is formed from the traces and dL/dh (e-prop's two options).

    ``kappa > 0``: gradients use the low-pass filtered trace ``e_bar = kappa e_bar + e``
    (kept beside each trace under ``filtered_key``) instead of the trace ``e`` itself.
    ``feedback``: per hidden group a fixed ``(width, width)`` matrix ``B``; the learning signal
    is then ``B``-projected ``dL/dh``, L2-normalised over the group's last (unit) axis, instead
    of ``dL/dh`` (random feedback). The defaults leave the exact rule unchanged.
    """

    kappa: float = 0.0
    feedback: Optional[tuple[Any, ...]] = None


class TracePlan(NamedTuple):
    """Which trace rule each relation uses, and how its outputs map onto hidden units."""

    spec: StepSpec
    kinds: tuple[str, ...]  # per relation: 'param' or 'io'
    connections: tuple[Connection, ...]
    decay: float  # io-dim decay alpha (unused by param-dim)
    rule: LearningRule = LearningRule()
    # per connection: the connection whose trace holds its io-dim output side (itself unless
    # its relation's output is summed with another io-dim relation's: see shared_outputs)
    f_owner: tuple[int, ...] = ()


def make_plan(
    spec: StepSpec, kinds: Sequence[str], decay: float, rule: Optional[LearningRule] = None
) -> TracePlan:
    conns = []
    for k, rel in enumerate(spec.graph.hidden_param_op_relations):
        for slot, g in enumerate(rel.hidden_groups):
            unit = np.asarray(rel.y_to_hidden[slot])
            ident = rel.is_identity_map(slot)
            tile = 0 if ident else tiling(unit, g.size)
            conns.append(Connection(k, slot, g.index, unit, ident, g.size, tile))
    owner = _output_side_owners(spec.shared_outputs, tuple(kinds), conns)
    return TracePlan(spec, tuple(kinds), tuple(conns), float(decay), rule or LearningRule(), owner)


def _output_side_owners(shared_sets, kinds, conns) -> tuple[int, ...]:
    """Per connection, the connection holding its output-side trace: within a set of relations
    with one df (``StepSpec.shared_outputs``), the io-dim ones share their first one's."""
    index = {(c.rel, c.slot): i for i, c in enumerate(conns)}
    owner = list(range(len(conns)))
    for members in shared_sets:
        io = [k for k in members if kinds[k] == "io"]
        for k in io[1:]:
            for (rel, slot), i in index.items():
                if rel == k:
                    owner[i] = index[(io[0], slot)]
    return tuple(owner)


def output_side_owner(plan: TracePlan, c: int) -> int:
    """Index of the connection whose trace holds connection `c`'s output side."""
    return plan.f_owner[c] if plan.f_owner else c


def output_side_shared_with(plan: TracePlan, rel: int) -> Optional[int]:
    """The relation whose io-dim output-side trace relation `rel` uses (None: its own)."""
    for c, conn in enumerate(plan.connections):
        o = output_side_owner(plan, c)
        if conn.rel == rel and o != c:
            return plan.connections[o].rel
    return None


def connection_trace(plan: TracePlan, traces, c: int):
    """Connection `c`'s trace, with the output side it shares filled in (a view: the shared
    ``f`` is the owner's array)."""
    conn = plan.connections[c]
    own = traces[trace_key(conn)]
    o = output_side_owner(plan, c)
    if o == c:
        return own
    return {**own, "f": traces[trace_key(plan.connections[o])]["f"]}


FILTERED = "filtered:"


def filtered_key(key: str) -> str:
    """The key of the low-pass filtered copy of trace `key` (``LearningRule.kappa > 0``)."""
    return FILTERED + key


def _grad_view(plan: TracePlan, traces):
    """The traces the gradient contracts with: the filtered ones when ``kappa > 0``."""
    if plan.rule.kappa <= 0.0:
        return traces
    return {k: traces[filtered_key(k)] for k in traces if not k.startswith(FILTERED)}


def trace_key(conn: Connection) -> str:
    return f"rel{conn.rel}_group{conn.group}"


def init_traces(plan: TracePlan) -> dict[str, Any]:
    """Zero traces shaped from the compiled graph (the batch is the hidden states' batch)."""
    graph = plan.spec.graph
    rels, groups = graph.hidden_param_op_relations, graph.hidden_groups
    traces = {}
    for c, conn in enumerate(plan.connections):
        rel = rels[conn.rel]
        rule = rel.rule
        x_aval = rel.x.aval if rel.has_x else None
        operands = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in rel.eqn.invars]
        X = jax.eval_shape(
            lambda x, w: rule.x_canon(rel.params, x, w),
            None if x_aval is None else jax.ShapeDtypeStruct(x_aval.shape, x_aval.dtype),
            rel.rule_weight(operands),
        )
        X_shape = X.shape[:-1] + (X.shape[-1] + (1 if rel.params.get("has_bias") else 0),)
        y_shape = conn.unit.shape + (groups[conn.group].num_state,)
        kind = TRACE_KINDS[plan.kinds[conn.rel]]
        trace = kind.init(X_shape, y_shape, rel.y.aval.dtype)
        if output_side_owner(plan, c) != c:  # the owner holds the output side
            trace = {k: v for k, v in trace.items() if k != "f"}
        traces[trace_key(conn)] = trace
    traces.update(param_traces.init(plan.spec))
    if plan.rule.kappa > 0.0:
        traces.update({filtered_key(k): jax.tree.map(jnp.zeros_like, t) for k, t in traces.items()})
    return traces


def update_traces(plan: TracePlan, traces, jac: StepJacobians):
    """One step of every trace, from the step's inputs X, diagonals df and Jacobians D."""
    new = {}
    for c, conn in enumerate(plan.connections):
        kind = TRACE_KINDS[plan.kinds[conn.rel]]
        key = trace_key(conn)
        if output_side_owner(plan, c) != c:  # output side: updated once, by its owner
            new[key] = IODimTrace.update_input(traces[key], jac.xs[conn.rel], plan.decay)
            continue
        D_y = [
            [gather_units(conn, block.reshape(-1)) for block in row]
            for row in jac.D_blocks[conn.group]
        ]
        new[key] = kind.update(
            traces[key], jac.xs[conn.rel], jac.dfs[conn.rel][conn.slot], D_y, plan.decay
        )
    if plan.spec.param_traces:
        new.update(param_traces.update(plan.spec, traces, jac.Ds, jac.Js))
    kappa = plan.rule.kappa
    if kappa > 0.0:
        new.update(
            {
                filtered_key(k): jax.tree.map(
                    lambda old, e: kappa * old + e.astype(old.dtype), traces[filtered_key(k)], t
                )
                for k, t in list(new.items())
            }
        )
    return new


def partial_hidden_grads(plan: TracePlan, dh: dict[Path, Any], Ms) -> list[Any]:
    """Per group, dL/dh^t as (group size, S), undoing same-step coupling inside the group.

    dL/dp from the perturbation counts paths from one state of a unit to another in the same
    step; the traces already do, so each group's gradient is solved against its coupling M.
    """
    out = []
    for g in plan.spec.graph.hidden_groups:
        cols = [dh.get(p) for p in g.hidden_paths]
        cols = [jnp.zeros(g.varshape, jnp.result_type(float)) if c is None else c for c in cols]
        dtype = jnp.result_type(*cols)
        cols = [c.reshape(-1).astype(dtype) for c in cols]
        if Ms is not None and g.num_state == 2:
            # solved column by column, stacked once: stacking before the solve made XLA:CPU
            # write the stacked (size, 2) array and then a second one for the solution, per step
            M = Ms[g.index].reshape(-1, 2, 2)
            cols = _solve_transposed_2(M, cols[0], cols[1])
        delta = jnp.stack(cols, axis=-1)
        if Ms is not None and g.num_state > 2:
            M = Ms[g.index].reshape(-1, g.num_state, g.num_state)
            delta = _solve_transposed(M, delta)
        if plan.rule.feedback is not None:
            delta = _random_feedback(plan.rule.feedback[g.index], delta, g.varshape)
        out.append(delta)
    return out


def _random_feedback(B, delta, varshape):
    """``B``-projection of the unit-axis L2-normalised signal (per state and leading index)."""
    s = delta.reshape(tuple(varshape) + delta.shape[-1:])
    norm = jnp.sqrt(jnp.sum(jnp.square(s), axis=-2, keepdims=True))
    s = jnp.einsum("...lj,lk->...kj", s / (norm + 1e-8), B.astype(s.dtype))
    return s.reshape(delta.shape)


def _solve_transposed(M, b):
    """x with M^T x = b for a batch of small (S, S) matrices M (..., S, S) and b (..., S).

    For S = 2 (e.g. LIF's (V, a)) the closed form: an element-wise expression that XLA fuses,
    where a batched LAPACK LU on CPU costs a custom call, pivoting loop and two triangular
    solves per step."""
    if M.shape[-1] == 2:
        return jnp.stack(_solve_transposed_2(M, b[..., 0], b[..., 1]), axis=-1)
    return jnp.linalg.solve(jnp.swapaxes(M, -1, -2), b[..., None])[..., 0]


def _solve_transposed_2(M, b0, b1):
    """The two columns (x0, x1) of x with M^T x = (b0, b1), for (..., 2, 2) matrices M."""
    a, c = M[..., 0, 0], M[..., 0, 1]  # M^T = [[a, b], [c, d]]
    b_, d = M[..., 1, 0], M[..., 1, 1]
    det = a * d - b_ * c
    x0 = (d * b0 - b_ * b1) / det
    x1 = (a * b1 - c * b0) / det
    return [x0, x1]


def trace_grads(plan: TracePlan, params: dict[Path, Any], traces, count, deltas) -> dict[Path, Any]:
    """Parameter gradients sum_s dL/dh_s * trace_s, mapped back to the weights' shapes."""
    return canonical_to_params(plan, params, trace_grads_canonical(plan, traces, count, deltas))


def trace_grads_canonical(plan: TracePlan, traces, count, deltas) -> dict[int, Any]:
    """{relation index: its trace gradient M in canonical (I[+1], O) space}, plus
    {param_traces.grad_key(k): gradient of parameter trace k, in the parameter's shape}."""
    per_rel: dict[int, Any] = {}
    traces = _grad_view(plan, traces)
    signals: dict[int, Any] = {}  # io-dim output signals by owning connection
    for c, conn in enumerate(plan.connections):
        kind = TRACE_KINDS[plan.kinds[conn.rel]]
        trace = connection_trace(plan, traces, c)
        if kind is IODimTrace:
            w = _output_signal(plan, traces, deltas, c, signals)
            M = kind.grad(trace, None, count, plan.decay, signal=w)
        else:
            M = kind.grad(trace, gather_units(conn, deltas[conn.group]), count, plan.decay)
        per_rel[conn.rel] = M if conn.rel not in per_rel else per_rel[conn.rel] + M
    if plan.spec.param_traces:
        per_rel.update(param_traces.grads(plan.spec, traces, deltas))
    return per_rel


def _output_signal(plan: TracePlan, traces, deltas, c: int, signals: dict[int, Any]):
    """Connection `c`'s io-dim output signal, computed once per output-side owner."""
    o = output_side_owner(plan, c)
    if o not in signals:
        conn = plan.connections[o]
        # per state, sliced before the gather: XLA folds a slice of the stacked delta into the
        # stacked column (no stacked array written per step); a slice after the gather's
        # reshape it does not
        delta = deltas[conn.group]
        cols = [gather_units(conn, delta[:, s]) for s in range(delta.shape[-1])]
        signals[o] = IODimTrace.output_signal(traces[trace_key(conn)], cols)
    return signals[o]


class GradFactors(NamedTuple):
    """io-dim trace gradients left uncontracted: connection c's is ``inputs[c]^T
    outputs[output_side_owner(plan, c)]`` (a shared output side: one factor for all)."""

    inputs: dict[int, Any]  # connection -> A (N, I)
    outputs: dict[int, Any]  # owning connection -> B (N, O)


def trace_grad_parts(plan: TracePlan, traces, count, deltas):
    """The trace gradient in two parts: ``GradFactors`` for io-dim connections, left
    uncontracted so a driver can contract many steps at once; {relation: M} for the rest,
    as ``trace_grads_canonical``."""
    factors = GradFactors({}, {})
    per_rel: dict[int, Any] = {}
    traces = _grad_view(plan, traces)
    signals: dict[int, Any] = {}
    for c, conn in enumerate(plan.connections):
        kind = TRACE_KINDS[plan.kinds[conn.rel]]
        if kind is IODimTrace:
            o = output_side_owner(plan, c)
            if o not in factors.outputs:
                w = _output_signal(plan, traces, deltas, c, signals)
                factors.outputs[o] = kind.output_factor(w, count, plan.decay)
            factors.inputs[c] = kind.input_factor(traces[trace_key(conn)])
            continue
        delta_y = gather_units(conn, deltas[conn.group])
        M = kind.grad(traces[trace_key(conn)], delta_y, count, plan.decay)
        per_rel[conn.rel] = M if conn.rel not in per_rel else per_rel[conn.rel] + M
    if plan.spec.param_traces:
        per_rel.update(param_traces.grads(plan.spec, traces, deltas))
    return factors, per_rel


def direct_relations(plan: TracePlan) -> frozenset[int]:
    """io-dim relations whose gradient factors a driver contracts straight into the parameters'
    layouts (``factor_grads``): their rule has ``factors_to_params`` and no other canonical
    gradient (the escape path's, ``StepSpec.escapes``) is added to theirs."""
    if plan.spec.escapes:
        return frozenset()
    rels = plan.spec.graph.hidden_param_op_relations
    return frozenset(
        k
        for k, rel in enumerate(rels)
        if plan.kinds[k] == "io" and rel.rule.factors_to_params is not None
    )


def factor_grads(plan: TracePlan, params: dict[Path, Any], k: int, A, B) -> dict[Path, Any]:
    """Relation `k`'s gradient ``A^T B`` from its factors (leading axes summed), as {parameter
    path: gradient}: ``canonical_to_params`` of ``{k: A^T B}`` without forming the canonical
    ``(I[+1], O)`` matrix (a torch ``(O, I)`` weight's gradient is contracted as ``(O, I)``)."""
    rel = plan.spec.graph.hidden_param_op_relations[k]
    dw, db = rel.rule.factors_to_params(rel.params, _rule_weight(rel, params), A, B)
    grads = {rel.weight_path: dw}
    if rel.bias_path is not None and db is not None:
        _accumulate(grads, rel.bias_path, db)
    return grads


def canonical_to_params(plan: TracePlan, params: dict[Path, Any], per_rel) -> dict[Path, Any]:
    """Map canonical gradients {relation: M} to {parameter path: gradient} (``io_to_params``).

    The map is linear in M, so a sum of canonical gradients can be mapped once (the sequence
    driver does so after its scan, instead of a transposed/sliced accumulation every step)."""
    rels = plan.spec.graph.hidden_param_op_relations
    grads: dict[Path, Any] = {}
    for k, M in per_rel.items():
        if k < 0:  # a parameter trace: already in the parameter's shape
            _accumulate(grads, plan.spec.param_traces[param_traces.trace_of_key(k)].path, M)
            continue
        rel = rels[k]
        dw, db = rel.rule.io_to_params(rel.params, _rule_weight(rel, params), M)
        _accumulate(grads, rel.weight_path, dw)
        if rel.bias_path is not None and db is not None:
            _accumulate(grads, rel.bias_path, db)
    return grads


def _rule_weight(rel, params: dict[Path, Any]):
    """The ``w`` of the relation's ``io_to_params``, read from the parameters by path (the
    weight itself; for LoRA the factors, which are parameters, and the bias if it is one)."""
    if not rel.operand_paths:
        return params[rel.weight_path]
    operands = [None if p is None else params.get(p) for p in rel.operand_paths]
    return rel.rule_weight(operands)


def _accumulate(into, path, value):
    into[path] = value if path not in into else into[path] + value


def add_grads(a: dict[Path, Any], b: dict[Path, Any]) -> dict[Path, Any]:
    out = dict(a)
    for p, v in b.items():
        out[p] = v.astype(out[p].dtype) + out[p] if p in out else v
    return out


def trace_sizes(traces) -> dict[str, int]:
    """Number of scalars each trace holds."""
    return {k: int(sum(np.prod(v.shape) for v in jax.tree.leaves(t))) for k, t in traces.items()}


def all_finite(traces):
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(traces)]))
