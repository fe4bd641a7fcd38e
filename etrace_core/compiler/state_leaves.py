"""States whose value is a pytree (a dict of arrays, a brainunit Quantity, ...), leaf by leaf.

The one-step jaxpr sees one variable per *leaf* of a state's value. The compiler therefore names
every leaf by a path: the state's own path when its value has exactly one leaf (an array, or a
Quantity whose leaf is its mantissa), else the state's path followed by the leaf's keys, e.g.
``('layer', 'weight', 'bias')`` for ``layer.weight = ParamState({'weight': W, 'bias': b})``.
Reading and writing go through the same table, so units and containers are rebuilt on write.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

Path = tuple[Any, ...]

_ARRAYS = (jax.Array, np.ndarray)  # values that are a single leaf of their own

__all__ = ["LeafRef", "leaf_refs", "read_leaves", "write_leaves", "state_of"]


class LeafRef(NamedTuple):
    """Where one leaf lives: its state's path, its index among the value's leaves, and how many."""

    state_path: Path
    index: int
    count: int


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def leaf_refs(state_path: Path, value) -> dict[Path, LeafRef]:
    """{leaf path: LeafRef} for one state's value (see the module docstring for the names)."""
    leaves = jax.tree_util.tree_flatten_with_path(value)[0]
    if len(leaves) == 1:
        return {tuple(state_path): LeafRef(tuple(state_path), 0, 1)}
    out = {}
    for i, (kp, _) in enumerate(leaves):
        path = tuple(state_path) + tuple(_key_name(k) for k in kp)
        out[path] = LeafRef(tuple(state_path), i, len(leaves))
    return out


def read_leaves(states, refs: dict[Path, LeafRef], paths: Sequence[Path]) -> dict[Path, Any]:
    """{leaf path: leaf value} of `paths`, read from `states` ({state path: State})."""
    cache: dict[Path, list] = {}
    out = {}
    for p in paths:
        ref = refs.get(p)
        if ref is None:  # a single-leaf state at its own path
            value = states[p].value
            # a plain array is its own leaf (the streaming step reads every state per call)
            out[p] = value if isinstance(value, _ARRAYS) else jax.tree.leaves(value)[0]
            continue
        if ref.state_path not in cache:
            cache[ref.state_path] = jax.tree.leaves(states[ref.state_path].value)
        out[p] = cache[ref.state_path][ref.index]
    return out


def write_leaves(states, refs: dict[Path, LeafRef], values: dict[Path, Any]) -> None:
    """Write leaf values back into their states, rebuilding each state's container/units."""
    by_state: dict[Path, dict[int, Any]] = {}
    for p, v in values.items():
        ref = refs.get(p)
        if ref is None and isinstance(v, _ARRAYS):
            st = states[p]
            if isinstance(st.value, _ARRAYS):  # array for array: nothing to rebuild
                st.value = v
                continue
        ref = ref or LeafRef(p, 0, 1)
        by_state.setdefault(ref.state_path, {})[ref.index] = v
    for sp, new in by_state.items():
        st = states[sp]
        leaves, tree = jax.tree.flatten(st.value)
        leaves = [new.get(i, leaf) for i, leaf in enumerate(leaves)]
        st.value = jax.tree.unflatten(tree, leaves)


def state_of(states, refs: dict[Path, LeafRef], path: Path):
    """The State object holding the leaf `path`."""
    return states[refs[path].state_path if path in refs else path]
