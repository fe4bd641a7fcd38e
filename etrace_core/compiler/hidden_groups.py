"""Hidden groups: hidden states coupled element-wise within one unit (LSTM h and c; LIF V and a)."""

from __future__ import annotations

from typing import Any, NamedTuple

import brainunit as u
import jax.numpy as jnp
import numpy as np

from .errors import CompilationError
from .module_info import ModuleInfo, Path
from .positions import NONE, propagate, static_values


class HiddenGroup(NamedTuple):
    """States that evolve together: state s of unit j depends on the states of unit j only.

    The group's transition h^{t-1} -> h^t keeps ETP-op outputs fixed; its Jacobian is therefore
    block-diagonal over units, one `num_state x num_state` block per element of `varshape`.
    """

    index: int
    hidden_paths: tuple[Path, ...]
    hidden_states: tuple[Any, ...]
    hidden_invars: tuple[Any, ...]
    hidden_outvars: tuple[Any, ...]
    varshape: tuple[int, ...]

    @property
    def num_state(self) -> int:
        return len(self.hidden_paths)

    @property
    def size(self) -> int:
        return int(np.prod(self.varshape, dtype=int))

    def concat_hidden(self, values):
        """The group's state values, one per ``hidden_paths`` entry (each of shape `varshape`),
        stacked on a new last axis: ``varshape + (num_state,)``; Quantities give their
        mantissas (braintrace's ``HiddenGroup.concat_hidden``)."""
        values = list(values)
        if len(values) != self.num_state:
            raise ValueError(
                f"HiddenGroup {self.index}: concat_hidden needs one value per hidden state "
                f"({self.num_state}: {list(self.hidden_paths)}), got {len(values)}"
            )
        return jnp.stack([jnp.asarray(u.get_mantissa(v)) for v in values], axis=-1)

    def __repr__(self):
        return (
            f"HiddenGroup(index={self.index}, hidden_paths={list(self.hidden_paths)}, "
            f"varshape={self.varshape})"
        )


def find_hidden_groups_from_minfo(minfo: ModuleInfo):
    """Group the model's hidden states; returns (groups, {hidden path: group})."""
    paths = list(minfo.hidden_paths)
    invars, outvars = minfo.state_invars, minfo.state_outvars
    static = static_values(minfo.closed_jaxpr)
    parent = {p: p for p in paths}

    def root(p):
        while parent[p] != p:
            parent[p] = parent[parent[p]]
            p = parent[p]
        return p

    for src in paths:
        prop = propagate(minfo.jaxpr, invars[src], static)
        for dst in paths:
            m = prop.maps.get(outvars[dst])
            if m is None or not np.any(m != NONE):
                continue
            same_shape = invars[src].aval.shape == outvars[dst].aval.shape
            reached = m != NONE
            if not same_shape or np.any(m[reached] != np.arange(m.size)[reached]):
                raise CompilationError(
                    f"hidden state {src} reaches hidden state {dst} through ops that move "
                    "elements between units (roll, transpose, broadcast, ...); eligibility "
                    "traces need each unit's next state to depend element-wise on the same "
                    "unit's states. Route that coupling through a weight (an ETP op) instead"
                )
            parent[root(src)] = root(dst)

    members: dict[Path, list] = {}
    for p in paths:
        members.setdefault(root(p), []).append(p)
    groups, by_path = [], {}
    for index, group_paths in enumerate(members.values()):
        g = HiddenGroup(
            index=index,
            hidden_paths=tuple(group_paths),
            hidden_states=tuple(minfo.state_of(p) for p in group_paths),
            hidden_invars=tuple(invars[p] for p in group_paths),
            hidden_outvars=tuple(outvars[p] for p in group_paths),
            varshape=tuple(invars[group_paths[0]].aval.shape),
        )
        groups.append(g)
        by_path.update({p: g for p in group_paths})
    return groups, by_path


def find_hidden_groups_from_module(model, *args):
    """Group the hidden states of `model` stepped with `args`."""
    from .module_info import extract_module_info

    return find_hidden_groups_from_minfo(extract_module_info(model, *args))
