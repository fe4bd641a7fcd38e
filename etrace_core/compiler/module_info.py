"""ModuleInfo: the flattened one-step jaxpr of a model and where its states live in it."""

from __future__ import annotations

from typing import Any, NamedTuple

import brainstate
import jax
from jax.extend import core as jcore

from .control_flow import ControlFlowPolicy, resolve_policy
from .errors import CompilationError
from .state_leaves import leaf_refs, read_leaves
from .unroll_scans import flatten_control_flow

Path = tuple[str, ...]


class ModuleInfo(NamedTuple):
    """The one-step program of a model and the mapping between its variables and states.

    The jaxpr's inputs are the flattened call arguments followed by the values of the states the
    step reads (in `state_paths` order); its outputs are the flattened model output followed by
    the states the step writes (in `written_paths` order).
    """

    closed_jaxpr: jcore.ClosedJaxpr
    in_tree: Any
    out_tree: Any
    num_args: int
    num_outputs: int
    state_paths: tuple[Path, ...]
    written_paths: tuple[Path, ...]
    hidden_paths: tuple[Path, ...]
    param_paths: tuple[Path, ...]
    other_paths: tuple[Path, ...]
    retrieved_model_states: Any  # brainstate.util.FlattedDict[Path, State]
    leaf_refs: Any = None  # {leaf path: LeafRef} for states with pytree values
    control_flow: Any = None  # the ControlFlowPolicy the program was canonicalised with

    @property
    def jaxpr(self) -> jcore.Jaxpr:
        return self.closed_jaxpr.jaxpr

    @property
    def arg_invars(self):
        return self.jaxpr.invars[: self.num_args]

    @property
    def state_invars(self) -> dict:
        return dict(zip(self.state_paths, self.jaxpr.invars[self.num_args :]))

    @property
    def output_vars(self):
        return self.jaxpr.outvars[: self.num_outputs]

    @property
    def state_outvars(self) -> dict:
        return dict(zip(self.written_paths, self.jaxpr.outvars[self.num_outputs :]))

    @property
    def hidden_invars(self):
        inv = self.state_invars
        return [inv[p] for p in self.hidden_paths]

    @property
    def hidden_outvars(self):
        out = self.state_outvars
        return [out[p] for p in self.hidden_paths]

    @property
    def param_invars(self) -> dict:
        inv = self.state_invars
        return {p: inv[p] for p in self.param_paths if p in inv}

    def state_values(self) -> dict:
        """Current values of every state leaf the step reads, by path."""
        return read_leaves(self.retrieved_model_states, self.leaf_refs or {}, self.state_paths)

    def state_of(self, path):
        """The State object that holds the leaf `path`."""
        refs = self.leaf_refs or {}
        return self.retrieved_model_states[refs[path].state_path if path in refs else path]


def extract_module_info(
    model: brainstate.nn.Module, *args, control_flow: ControlFlowPolicy | None = None
) -> ModuleInfo:
    """Trace one step of `model(*args)` and index its states (hidden, parameter, other).

    The program is canonicalised under `control_flow` (default ``ControlFlowPolicy()``): jit
    calls inlined, conds if-converted, inner scans that use weights unrolled up to
    ``scan_unroll_limit``; the policy is kept on the result (``minfo.control_flow``)."""
    policy = resolve_policy(control_flow)
    policy.check_supported()
    if not isinstance(model, brainstate.nn.Module):
        raise TypeError(
            f"expected a brainstate.nn.Module, got {type(model).__name__}; wrap the step in a "
            "brainstate.nn.Module whose update() runs one time step"
        )
    all_states = model.states()
    path_of = {id(st): path for path, st in all_states.items()}

    fn = brainstate.transform.StatefulFunction(model)
    fn.make_jaxpr(*args)
    closed = fn.get_jaxpr(*args)
    read = fn.get_states(*args)
    written = fn.get_write_states(*args)
    out_tree = jax.tree_util.treedef_children(fn.get_out_treedef(*args))[0]
    in_tree = jax.tree.structure(args)
    num_args = len(jax.tree.leaves(args))
    num_outputs = out_tree.num_leaves

    refs = {}

    def paths(states):
        """(leaf paths, the State of each leaf) of `states`, in the jaxpr's order."""
        missing = [st for st in states if id(st) not in path_of]
        if missing:
            raise CompilationError(
                f"the step uses {len(missing)} state(s) that are not attributes of the model "
                f"(e.g. {type(missing[0]).__name__} of shape "
                f"{jax.tree.map(jax.numpy.shape, missing[0].value)}); make "
                "every state an attribute of the module tree"
            )
        leaf_paths, owners = [], []
        for st in states:
            these = leaf_refs(path_of[id(st)], st.value)
            refs.update(these)
            leaf_paths += list(these)
            owners += [st] * len(these)
        return tuple(leaf_paths), owners

    (state_paths, read), (written_paths, written) = paths(read), paths(written)
    if num_outputs + len(written_paths) != len(closed.jaxpr.outvars):
        raise CompilationError(
            "the step's outputs do not match its written states; "
            "return plain arrays (or pytrees of arrays) from update()"
        )
    _check_states(closed, num_args, num_outputs, read, written, state_paths, written_paths)

    hidden = tuple(
        p
        for p, st in zip(written_paths, written)
        if isinstance(st, brainstate.HiddenState) and p in state_paths
    )
    params = tuple(p for p, st in zip(state_paths, read) if isinstance(st, brainstate.ParamState))
    others = tuple(p for p in state_paths + written_paths if p not in hidden and p not in params)
    weight_mask = [False] * num_args + [isinstance(st, brainstate.ParamState) for st in read]
    return ModuleInfo(
        closed_jaxpr=flatten_control_flow(closed, weight_mask, policy.scan_unroll_limit),
        in_tree=in_tree,
        out_tree=out_tree,
        num_args=num_args,
        num_outputs=num_outputs,
        state_paths=state_paths,
        written_paths=written_paths,
        hidden_paths=hidden,
        param_paths=params,
        other_paths=tuple(dict.fromkeys(others)),
        retrieved_model_states=all_states,
        leaf_refs={p: r for p, r in refs.items() if r.count > 1},
        control_flow=policy,
    )


def _check_states(closed, num_args, num_outputs, read, written, state_paths, written_paths):
    if len(state_paths) != len(closed.jaxpr.invars) - num_args:
        raise CompilationError("the step's inputs do not match the leaves of the states it reads")
    for path, st in zip(written_paths, written):
        if isinstance(st, brainstate.ParamState):
            raise CompilationError(
                f"ParamState {path} is written inside the step; parameters must be constant "
                "over a step (update them outside, e.g. with an optimizer)"
            )
    in_avals = dict(zip(state_paths, [v.aval for v in closed.jaxpr.invars[num_args:]]))
    out_avals = dict(zip(written_paths, [v.aval for v in closed.jaxpr.outvars[num_outputs:]]))
    for path, st in zip(written_paths, written):
        if isinstance(st, brainstate.HiddenState) and path in in_avals:
            a, b = in_avals[path], out_avals[path]
            if a.shape != b.shape or a.dtype != b.dtype:
                raise CompilationError(
                    f"HiddenState {path} changes from {a.dtype.name}{list(a.shape)} to "
                    f"{b.dtype.name}{list(b.shape)} over one step; a hidden state must keep "
                    "its shape and dtype (initialise it with the batch size you run with)"
                )
