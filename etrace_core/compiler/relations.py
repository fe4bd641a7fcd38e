"""Hidden-parameter-operation relations: which ETP weight reaches which hidden units, and how."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import numpy as np
from jax.extend import core as jcore

from etrace_core.ops import bias_operand, is_etp_primitive, rule_for, weight_operands

from .hidden_groups import HiddenGroup
from .module_info import ModuleInfo, Path
from .perturbation import production_point
from .positions import MANY, NONE, propagate, reachable, static_values
from .recurrence import recurrence_notes


class HiddenParamOpRelation(NamedTuple):
    """One use of a weight through an ETP op whose output reaches hidden states.

    `y_to_hidden[k]` is an int array shaped like the op's canonical output `L + (O,)`: the flat
    index, within `hidden_groups[k].varshape`, of the hidden unit each output element lands in
    (-1: it lands in none of that group's units). An op with several traced weights (LoRA's
    two factors) gives one relation per weight, told apart by `weight_operand`.
    """

    weight_path: Path
    bias_path: Optional[Path]
    primitive: Any
    eqn: Any
    x: Any
    y: Any
    hidden_groups: tuple[HiddenGroup, ...]
    y_to_hidden: tuple[np.ndarray, ...]
    approximations: tuple[str, ...]
    weight_operand: int = 1  # the weight's operand position in `eqn` (0: element-wise ops)
    operand_paths: tuple = ()  # per operand of `eqn`: its parameter path, or None

    @property
    def rule(self):
        """The op's canonical-form rule for this relation's weight (ops.rules.OpRule)."""
        return rule_for(self.primitive, self.weight_operand)

    def rule_weight(self, operands):
        """The ``w`` the rule's functions take, from the op's operands in equation order."""
        return self.rule.weight_arg(operands, self.weight_operand)

    @property
    def path(self) -> Path:
        return self.weight_path

    @property
    def x_var(self):
        """The op's input var (braintrace's name for ``x``)."""
        return self.x

    @property
    def y_var(self):
        """The op's output var (braintrace's name for ``y``)."""
        return self.y

    @property
    def connected_hidden_paths(self) -> tuple[Path, ...]:
        """The paths of every hidden state this op's output reaches (braintrace's name)."""
        return tuple(p for g in self.hidden_groups for p in g.hidden_paths)

    @property
    def trainable_paths(self) -> dict[str, Path]:
        """{'weight': path[, 'bias': path]} of the parameters this op trains (leaf paths)."""
        out = {"weight": self.weight_path}
        if self.bias_path is not None:
            out["bias"] = self.bias_path
        return out

    @property
    def params(self) -> dict:
        return self.eqn.params

    @property
    def has_x(self) -> bool:
        return self.primitive.name != "etp_elemwise"

    def is_identity_map(self, k: int) -> bool:
        m = self.y_to_hidden[k]
        return m.size == self.hidden_groups[k].size and bool(
            np.all(m.reshape(-1) == np.arange(m.size))
        )

    def __repr__(self):
        groups = [g.index for g in self.hidden_groups]
        return (
            f"HiddenParamOpRelation(weight_path={self.weight_path}, "
            f"primitive={self.primitive.name}, hidden_groups={groups})"
        )


class UntracedUse(NamedTuple):
    """A parameter use that is not online-traced, and why (it gets its same-step gradient)."""

    path: Path
    reason: str


def etp_operands(eqn) -> tuple[Any, Any, Any]:
    """(x, w, b) operands of an ETP equation (w: its first traced weight); x is None for
    element-wise weights."""
    w = eqn.invars[weight_operands(eqn.primitive)[0]]
    b_at = bias_operand(eqn.primitive, eqn.params)
    b = None if b_at is None else eqn.invars[b_at]
    if eqn.primitive.name == "etp_elemwise":
        return None, w, None
    return eqn.invars[0], w, b


def analyse_relations(minfo: ModuleInfo, hid_path_to_group: dict[Path, HiddenGroup]):
    """All relations of the step, plus every parameter use that is not online-traced."""
    jaxpr = minfo.jaxpr
    param_of = {v: p for p, v in minfo.param_invars.items()}
    hidden_out = {}
    for path, group in hid_path_to_group.items():
        hidden_out.setdefault(minfo.state_outvars[path], []).append((group, path))
    hidden_out_vars = set(hidden_out)
    static = static_values(minfo.closed_jaxpr)
    relations, untraced = [], []
    traced_vars = set()
    after_group = {
        g.index: _depends_on(jaxpr, g.hidden_invars, static) for g in hid_path_to_group.values()
    }
    feeds_memory = _groups_feeding_memory(minfo, hid_path_to_group)
    made_at = hidden_out_vars | {production_point(minfo, v, static) for v in hidden_out_vars}
    groups_all = list({g.index: g for g in hid_path_to_group.values()}.values())
    made_by_path = {
        p: production_point(minfo, minfo.state_outvars[p], static) for p in hid_path_to_group
    }
    rec_notes = recurrence_notes(minfo, groups_all, made_by_path, static)

    for eqn in jaxpr.eqns:
        if not is_etp_primitive(eqn.primitive):
            continue
        paths = tuple(None if isinstance(v, jcore.Literal) else param_of.get(v) for v in eqn.invars)
        weights, partnerless = _traced_weights(eqn, paths)
        untraced += partnerless
        if not weights:
            continue  # no weight that is a parameter: nothing to learn through this op
        b_at = bias_operand(eqn.primitive, eqn.params)
        b_path = None if b_at is None else paths[b_at]
        prop = propagate(jaxpr, eqn.outvars[0], static)
        groups, maps, problems = _landing(eqn, prop, hidden_out, static)
        if not groups:
            # a broadcast/duplication found by _landing says more than the generic reason
            reason = (
                f"{problems[0]}: same-step gradient"
                if problems
                else _why_not_traced(jaxpr, eqn, prop, hidden_out_vars)
            )
            untraced += [
                UntracedUse(p, reason) for p in (*(paths[k] for k in weights), b_path) if p
            ]
            continue
        traced_vars.update(eqn.invars[k] for k in (*weights, b_at) if k is not None)
        before_hidden = propagate(jaxpr, eqn.outvars[0], static, stop=made_at)
        approx = list(problems) + _approximations(jaxpr, before_hidden, hidden_out_vars)
        x = eqn.invars[0] if eqn.primitive.name != "etp_elemwise" else None
        recurrent_input = (
            x is not None
            and not isinstance(x, jcore.Literal)
            and any(x in after_group[g.index] for g in groups)
        )
        if recurrent_input:
            approx.append(
                "its input depends on the previous states of the hidden group it "
                "drives; that hidden-to-hidden path is not in the trace (diagonal "
                "approximation)"
            )
        if not recurrent_input:
            approx += [rec_notes[g.index] for g in groups if g.index in rec_notes]
        approx += [feeds_memory[g.index] for g in groups if g.index in feeds_memory]
        for n, k in enumerate(weights):
            relations.append(
                HiddenParamOpRelation(
                    weight_path=paths[k],
                    bias_path=b_path if n == 0 else None,  # the bias rides with one weight
                    primitive=eqn.primitive,
                    eqn=eqn,
                    x=x,
                    y=eqn.outvars[0],
                    hidden_groups=tuple(groups),
                    y_to_hidden=tuple(maps),
                    approximations=tuple(dict.fromkeys(approx)),
                    weight_operand=k,
                    operand_paths=paths,
                )
            )

    untraced += _plain_uses(minfo, param_of, traced_vars)
    return relations, untraced


def _traced_weights(eqn, paths) -> tuple[list[int], list[UntracedUse]]:
    """The op's weight operands that are parameters and can be traced; a weight whose rule
    reads another weight operand (a LoRA factor's partner) that is not a parameter cannot map
    its trace back to itself, and keeps its same-step gradient."""
    weights, untraced = [], []
    all_weights = weight_operands(eqn.primitive)
    for k in all_weights:
        if paths[k] is None:
            continue
        needs = rule_for(eqn.primitive, k).operands or ()
        missing = [i for i in needs if i in all_weights and i != k and paths[i] is None]
        if missing:
            untraced.append(
                UntracedUse(
                    paths[k],
                    f"its {eqn.primitive.name} partner factor (operand {missing[0]}) is not a "
                    "parameter, so its trace cannot be mapped back to it: same-step gradient",
                )
            )
            continue
        weights.append(k)
    return weights, untraced


def _depends_on(jaxpr, sources, static) -> set:
    """Variables that depend on some element of `sources`: through position maps where elements
    can be followed (so a slice of a stack sees only what it takes), conservatively after."""
    hit, mixed = set(), []
    for src in sources:
        prop = propagate(jaxpr, src, static)
        hit.update(v for v, m in prop.maps.items() if np.any(m != NONE))
        mixed += [v for eqn in prop.blocked for v in eqn.outvars]
    return hit | reachable(jaxpr, mixed)


def _groups_feeding_memory(minfo, hid_path_to_group) -> dict[int, str]:
    """group index -> note, for groups whose states reach another group that has memory."""
    groups = {g.index: g for g in hid_path_to_group.values()}
    outs = {i: set(g.hidden_outvars) for i, g in groups.items()}
    with_memory = {
        i for i, g in groups.items() if reachable(minfo.jaxpr, g.hidden_invars) & outs[i]
    }
    notes = {}
    for i, g in groups.items():
        downstream = reachable(minfo.jaxpr, g.hidden_outvars)
        fed = [j for j in sorted(with_memory) if j != i and downstream & outs[j]]
        if fed:
            notes[i] = (
                f"hidden group {i} feeds hidden group(s) {fed}, which keep memory; the "
                "trace does not follow that path over time"
            )
    return notes


def _landing(eqn, prop, hidden_out, static):
    """Per reached hidden group, the unit each output element lands in."""
    per_group: dict[int, list] = {}
    problems = []
    for var, owners in hidden_out.items():
        m = prop.maps.get(var)
        if m is None or not np.any(m != NONE):
            continue
        for group, path in owners:
            entry = per_group.setdefault(group.index, [group, np.full(m.size, NONE)])
            unit = entry[1]
            if unit is None:
                continue
            clash = (m == MANY) | ((unit >= 0) & (m >= 0) & (unit != m))
            if np.any(clash):
                problems.append(
                    f"an output element of {eqn.primitive.name} reaches several units of hidden "
                    f"state {path} (broadcast or duplication); that relation is dropped"
                )
                entry[1] = None
                continue
            entry[1] = np.where(m >= 0, m, unit)
    rule = rule_for(eqn.primitive)
    y_shape = eqn.outvars[0].aval.shape
    groups, maps = [], []
    for index in sorted(per_group):
        g, unit = per_group[index]
        if unit is None:
            continue
        groups.append(g)
        # the rule's jnp code runs on numpy position maps: evaluate it now, not as ops of a
        # transformation that compile may run inside (compile inside jit or vmap_new_states)
        with jax.ensure_compile_time_eval():
            maps.append(np.asarray(rule.y_canon(eqn.params, unit.reshape(y_shape))))
    return groups, maps, problems


def _why_not_traced(jaxpr, eqn, prop, hidden_out_vars) -> str:
    downstream = reachable(jaxpr, [eqn.outvars[0]])
    if not downstream & hidden_out_vars:
        return "its output reaches no hidden state (e.g. a readout): same-step gradient"
    first = prop.blocked[0].primitive.name if prop.blocked else "an op"
    return (
        f"its output reaches hidden states only through {first}, which mixes positions: "
        "same-step gradient"
    )


def _approximations(jaxpr, prop, hidden_out_vars):
    notes = []
    for eqn in prop.blocked:
        if reachable(jaxpr, eqn.outvars) & hidden_out_vars:
            notes.append(
                f"part of the output reaches hidden states through "
                f"{eqn.primitive.name}; that path is ignored by the trace"
            )
    return notes


def _plain_uses(minfo, param_of, traced_vars):
    """Parameters read by the step but not as the weight/bias of a traced ETP op."""
    used = {}
    for eqn in minfo.jaxpr.eqns:
        for i, v in enumerate(eqn.invars):
            if isinstance(v, jcore.Literal) or v not in param_of:
                continue
            if is_etp_primitive(eqn.primitive) and v in traced_vars:
                continue
            if is_etp_primitive(eqn.primitive):
                continue  # reported by the relation analysis
            used.setdefault(param_of[v], eqn.primitive.name)
    return [
        UntracedUse(p, f"used through {prim}, not an ETP op: same-step gradient")
        for p, prim in used.items()
    ]


def find_hidden_param_op_relations_from_minfo(minfo: ModuleInfo, hid_path_to_group):
    """The relations of a ModuleInfo, given its hidden groups."""
    return analyse_relations(minfo, hid_path_to_group)[0]


def find_hidden_param_op_relations_from_module(model, *args):
    """The relations of `model` stepped with `args`."""
    from .hidden_groups import find_hidden_groups_from_minfo
    from .module_info import extract_module_info

    minfo = extract_module_info(model, *args)
    _, by_path = find_hidden_groups_from_minfo(minfo)
    return find_hidden_param_op_relations_from_minfo(minfo, by_path)
