"""A learner's checkpoint: everything needed to continue, validated before anything is touched.

A checkpoint holds the algorithm (canonical name: aliases such as `pp_prop` / `es_d_rtrl` accept
each other's checkpoints) and the options that shape its traces (decay, trace kind per weight),
the model signature (parameter and state names, shapes, dtypes), the hidden/dynamic model
states and the eligibility traces. `load` checks all of it against the learner first and lists
every problem in one `CheckpointError`; a checkpoint made at another batch size re-builds the
learner for that size, and is rolled back if it still does not fit (all-or-nothing).
Plain containers, strings, numbers and tensors only, so `torch.load(weights_only=True)` reads it.
"""

from __future__ import annotations

from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import torch

from etrace_bridge.algorithms import canonical_name
from etrace_bridge.errors import CheckpointError

__all__ = ["CheckpointError", "FORMAT", "make_state_dict", "load_state_dict"]

FORMAT = 2
_KEYS = ("format", "algorithm", "options", "signature", "batch_size", "model_states", "etrace")


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _options(learner) -> dict:
    algo = learner.algorithm
    rels = algo.graph.hidden_param_op_relations
    kinds = {".".join(r.weight_path): k for r, k in zip(rels, algo._plan.kinds)}
    return {"decay": float(algo.decay), "trace_kinds": kinds, "vjp_method": algo.vjp_method}


def _signature(learner) -> dict:
    params = {
        name: (tuple(p.shape), _dtype_name(p.dtype))
        for name, p in learner.torch_module.named_parameters()
    }
    states = {
        name: (tuple(np.shape(v)), _dtype_name(jnp.result_type(v)))
        for name, v in _state_values(learner).items()
    }
    return {"parameters": params, "states": states}


def _model_states(learner) -> dict:
    states = learner.model.states().filter(
        lambda path, st: not isinstance(st, brainstate.ParamState)
    )
    return {".".join(p): st for p, st in states.items()}


def _state_values(learner) -> dict:
    return {name: st.value for name, st in _model_states(learner).items()}


def _to_tensor(v) -> torch.Tensor:
    return torch.from_numpy(np.array(v))


def _from_tensor(t):
    return jnp.asarray(t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else t)


def make_state_dict(learner) -> dict[str, Any]:
    """The learner's checkpoint (see the module docstring)."""
    return {
        "format": FORMAT,
        "algorithm": canonical_name(learner.algorithm_name),
        "options": _options(learner),
        "signature": _signature(learner),
        "batch_size": learner._graph_batch(),
        "model_states": {n: _to_tensor(v) for n, v in _state_values(learner).items()},
        "etrace": jax.tree.map(_to_tensor, learner.algorithm.etrace.value),
    }


# ----------------------------------------------------------------------------- loading


def _leaf_info(tree) -> tuple[Any, list[tuple[tuple, str]]]:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, [(tuple(np.shape(v)), _dtype_name(_dtype(v))) for v in leaves]


def _dtype(v):
    return v.dtype if isinstance(v, torch.Tensor) else jnp.result_type(v)


def _static_problems(learner, state) -> list[str]:
    """Everything that does not depend on the batch size."""
    if not isinstance(state, dict):
        return [
            f"a checkpoint is a dict made by OnlineLearner.state_dict(), got {type(state).__name__}"
        ]
    missing = [k for k in _KEYS if k not in state]
    if missing:
        return [
            f"the checkpoint lacks {missing} (it was not made by this version's "
            "OnlineLearner.state_dict())"
        ]
    problems = []
    try:
        saved_algo = canonical_name(str(state["algorithm"]))
    except ValueError:
        saved_algo = str(state["algorithm"])
    mine = canonical_name(learner.algorithm_name)
    if saved_algo != mine:
        problems.append(
            f"it was saved by a {state['algorithm']!r} learner; this one runs "
            f"{learner.algorithm_name!r}"
        )
    saved_opts, my_opts = state["options"], _options(learner)
    for key, mine_v in my_opts.items():
        if saved_opts.get(key) != mine_v:
            problems.append(f"its {key} is {saved_opts.get(key)!r}; this learner's is {mine_v!r}")
    sig_saved, sig_mine = state["signature"], _signature(learner)
    problems += _compare_named("parameter", sig_saved.get("parameters", {}), sig_mine["parameters"])
    names_saved, names_mine = set(state["model_states"]), set(sig_mine["states"])
    for name in sorted(names_mine - names_saved):
        problems.append(f"it holds no value for the model state `{name}`")
    for name in sorted(names_saved - names_mine):
        problems.append(f"it holds a state `{name}` that this model does not have")
    return problems


def _compare_named(kind, saved: dict, mine: dict) -> list[str]:
    problems = []
    for name in sorted(set(mine) - set(saved)):
        problems.append(f"it has no {kind} `{name}`")
    for name in sorted(set(saved) - set(mine)):
        problems.append(f"its {kind} `{name}` is not in this model")
    for name in sorted(set(saved) & set(mine)):
        (s_shape, s_dtype), (m_shape, m_dtype) = saved[name], mine[name]
        if tuple(s_shape) != tuple(m_shape):
            problems.append(
                f"its {kind} `{name}` has shape {tuple(s_shape)}; this model's has {tuple(m_shape)}"
            )
        if s_dtype != m_dtype:
            problems.append(f"its {kind} `{name}` is {s_dtype}; this model's is {m_dtype}")
    return problems


def _shape_problems(learner, state) -> list[str]:
    """States and traces against the learner as built now (same batch size)."""
    saved_states = {
        n: (tuple(t.shape), _dtype_name(_dtype(t))) for n, t in state["model_states"].items()
    }
    mine = _signature(learner)["states"]
    problems = _compare_named("state", saved_states, mine)
    s_tree, s_leaves = _leaf_info(state["etrace"])
    m_tree, m_leaves = _leaf_info(learner.algorithm.etrace.value)
    if s_tree != m_tree:
        problems.append(
            "its eligibility traces are laid out for another model or algorithm "
            f"({s_tree.num_leaves} arrays; this learner has {m_tree.num_leaves})"
        )
    else:
        bad = [(s, m) for s, m in zip(s_leaves, m_leaves) if s != m]
        if bad:
            problems.append(
                f"{len(bad)} of its eligibility traces differ in shape or dtype "
                f"from this learner's (first: {bad[0][0]} vs {bad[0][1]})"
            )
    return problems


def _raise(problems: list[str]) -> None:
    raise CheckpointError(
        "this checkpoint does not fit the learner (nothing was loaded):\n"
        + "\n".join(f"  - {p}" for p in problems)
    )


def load_state_dict(learner, state: dict) -> None:
    """Validate `state` against `learner` and restore it; on any problem nothing changes."""
    problems = _static_problems(learner, state)
    if problems:
        _raise(problems)
    old_batch = learner._graph_batch()
    saved_batch = state["batch_size"]
    rebuilt = saved_batch != old_batch and saved_batch is not None
    old_values = _state_values(learner)
    old_etrace = learner.algorithm.etrace.value
    try:
        if rebuilt:
            learner.reset_state(int(saved_batch))
        problems = _shape_problems(learner, state)
        if problems:
            _raise(problems)
        states = _model_states(learner)
        values = {n: _from_tensor(t) for n, t in state["model_states"].items()}
        etrace = jax.tree.map(_from_tensor, state["etrace"])
    except BaseException:
        if rebuilt:
            learner.reset_state(old_batch)
        for name, st in _model_states(learner).items():
            st.value = old_values[name]
        learner.algorithm.etrace.value = old_etrace
        raise
    for name, value in values.items():
        states[name].value = value
    learner.algorithm.etrace.value = etrace
