"""How a torch recurrent model keeps its state: the one place that knows the conventions.

1. `nn.RNNCell` / `nn.GRUCell` / `nn.LSTMCell`: `cell(x, h)` / `cell(x, (h, c))`, output = new h.
2. `nn.RNN` / `nn.GRU` / `nn.LSTM`: a length-1 sequence per step (respecting `batch_first`);
   state `h` or `(h, c)` shaped `(num_layers, B, H)`; output the top layer's step output.
3. `forward(x, *state) -> (y, *new_state)`, paired automatically or declared with `state=`.
4. State kept in registered buffers updated inside `forward` (SNN style): `module(x)`.

The torch side (`torch_step`: run one step eagerly, for BPTT) and the JAX side (`StateLayout`:
how `update`'s inputs and the hidden states map onto the exported step) are both here.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import torch
import torch.utils._pytree as pytree
from torch import nn

from etrace_bridge.export import ExportedStep
from etrace_bridge.state_slots import swapped_slots

__all__ = [
    "CELLS",
    "Path",
    "StateLayout",
    "cell_layout",
    "rnn_layout",
    "explicit_layout",
    "torch_step",
    "required_positional",
    "param_like",
    "DefaultState",
    "default_state",
    "initial_state_param",
    "default_state_step",
    "size_example_states",
]

Path = tuple[str, ...]
CELLS = (nn.RNNCell, nn.GRUCell, nn.LSTMCell)


# ----------------------------------------------------------------------------- torch side


def param_like(module: nn.Module, xs: torch.Tensor):
    p = next(module.parameters(), None)
    return (p.dtype, p.device) if p is not None else (xs.dtype, xs.device)


def _cell_step(module, x, state):
    if isinstance(module, nn.LSTMCell):
        h, c = module(x, tuple(state))
        return h, (h, c)
    h = module(x, state[0] if isinstance(state, (tuple, list)) else state)
    return h, h


def _cell_zero_state(module, batch, dtype, device):
    h = torch.zeros(batch, module.hidden_size, dtype=dtype, device=device)
    return (h, h.clone()) if isinstance(module, nn.LSTMCell) else h


def _rnn_step(module, x, state):
    time_dim = 1 if module.batch_first else 0
    out, new_state = module(x.unsqueeze(time_dim), state)
    return out.squeeze(time_dim), new_state


def _rnn_zero_state(module, batch, dtype, device):
    if module.bidirectional:
        raise ValueError("a bidirectional RNN has no step-by-step (causal) form")
    h_size = getattr(module, "proj_size", 0) or module.hidden_size
    h = torch.zeros(module.num_layers, batch, h_size, dtype=dtype, device=device)
    if isinstance(module, nn.LSTM):
        return h, torch.zeros(
            module.num_layers, batch, module.hidden_size, dtype=dtype, device=device
        )
    return h


def _forward_step(module, x, state):
    out = module(x, *state)
    if not isinstance(out, (tuple, list)) or len(out) != len(state) + 1:
        raise TypeError(
            f"{type(module).__name__}.forward(x, *state) must return (y, *new_state) with "
            f"{len(state)} state tensors, got {type(out).__name__}"
        )
    return out[0], tuple(out[1:])


def _buffer_step(module, x, state):
    y = module(x)
    if isinstance(y, (tuple, list)):
        raise TypeError(
            f"{type(module).__name__} returned a tuple: for forward(x, *state) -> (y, *new_state) "
            "modules pass the initial state as state="
        )
    return y, state


def required_positional(module) -> int:
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return 0
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in kinds and p.default is inspect.Parameter.empty for p in params)


def torch_step(module, state, batch, dtype, device):
    """Return (step, initial_state) for the module's state convention."""
    if isinstance(module, CELLS):
        if state is None:
            state = _cell_zero_state(module, batch, dtype, device)
        return _cell_step, state
    if isinstance(module, nn.RNNBase):
        if state is None:
            state = _rnn_zero_state(module, batch, dtype, device)
        elif module.bidirectional:
            raise ValueError("a bidirectional RNN has no step-by-step (causal) form")
        return _rnn_step, tuple(state) if isinstance(state, list) else state
    if state is None and required_positional(module) == 1 and _none_default_slot(module, 1):
        return default_state_step, (None,)
    if state is None or (isinstance(state, (tuple, list)) and len(state) == 0):
        if required_positional(module) > 1:
            raise TypeError(
                f"{type(module).__name__}.forward takes state arguments: pass the initial state "
                "as state= (forward(x, *state) -> (y, *new_state) convention)"
            )
        return _buffer_step, ()
    return _forward_step, tuple(state) if isinstance(state, (tuple, list)) else (state,)


# ----------------------------------------------------------------------------- JAX side


@dataclasses.dataclass(repr=False)
class StateLayout:
    """How `update`'s inputs and the hidden states map onto the exported step.

    `step_inputs(args, states)` builds the step's inputs; `split_outputs(outputs)` returns
    `(model output, {path: new state})`. `init` holds each state's example value and batch axis;
    `update_args` are example inputs of `update` (batch first, no time axis).
    """

    export_args: tuple
    update_args: tuple
    batch_axes: Any
    batch: int | None
    init: dict[Path, tuple[torch.Tensor, int | None]]
    step_inputs: Callable[[tuple, dict], tuple]
    split_outputs: Callable[[Any], tuple[Any, dict]]


def cell_layout(module: nn.Module, args: tuple) -> StateLayout:
    """nn.RNNCell / GRUCell: state h; nn.LSTMCell: state (h, c); output = new h."""
    x = args[0]
    lstm = isinstance(module, nn.LSTMCell)
    if len(args) == 1:
        shape = (x.shape[0], module.hidden_size) if x.ndim == 2 else (module.hidden_size,)
        zero = torch.zeros(shape, dtype=module.weight_ih.dtype, device=module.weight_ih.device)
        state = (zero, zero.clone()) if lstm else zero
    elif len(args) == 2:
        state = args[1]
    else:
        raise ValueError(
            f"{type(module).__name__} example_inputs must be (x,) or (x, state), "
            f"got {len(args)} items"
        )
    axis = 0 if x.ndim == 2 else None
    batch = x.shape[0] if axis == 0 else None
    if lstm:
        h, c = state
        init = {("h",): (h, axis), ("c",): (c, axis)}
        return StateLayout(
            export_args=(x, (h, c)),
            update_args=(x,),
            batch_axes=(axis, (axis, axis)),
            batch=batch,
            init=init,
            step_inputs=lambda a, s: (a[0], (s[("h",)], s[("c",)])),
            split_outputs=lambda o: (o[0], {("h",): o[0], ("c",): o[1]}),
        )
    return StateLayout(
        export_args=(x, state),
        update_args=(x,),
        batch_axes=(axis, axis),
        batch=batch,
        init={("h",): (state, axis)},
        step_inputs=lambda a, s: (a[0], s[("h",)]),
        split_outputs=lambda o: (o, {("h",): o}),
    )


def rnn_layout(module: nn.RNNBase, args: tuple) -> StateLayout:
    """nn.RNN / GRU / LSTM run with sequence length 1; one hidden state per layer."""
    name = type(module).__name__
    if len(args) not in (1, 2):
        raise ValueError(f"{name} example_inputs must be (x,) or (x, state), got {len(args)} items")
    x = args[0]
    time_axis = 1 if module.batch_first else 0
    if x.ndim == 3:
        if x.shape[time_axis] != 1:
            raise ValueError(
                f"{name} converts one time step: give x as (batch, input) or with a "
                f"time dimension of size 1, got shape {tuple(x.shape)}"
            )
        x = x.squeeze(time_axis)
    if x.ndim != 2:
        raise ValueError(f"{name} example x must be (batch, input_size), got {tuple(x.shape)}")
    layers, batch, hidden = module.num_layers, x.shape[0], module.hidden_size
    lstm = isinstance(module, nn.LSTM)
    if len(args) == 2:
        state = args[1]
    else:  # with proj_size, h is (layers, B, proj_size) and c (layers, B, hidden_size)
        h_size = getattr(module, "proj_size", 0) or hidden
        zero = torch.zeros(layers, batch, h_size, dtype=x.dtype, device=x.device)
        state = (
            (zero, torch.zeros(layers, batch, hidden, dtype=x.dtype, device=x.device))
            if lstm
            else zero
        )
    kinds = ("h", "c") if lstm else ("h",)
    tensors = tuple(state) if lstm else (state,)
    paths = {k: [(k, f"l{i}") for i in range(layers)] for k in kinds}
    init = {p: (t[i], 0) for k, t in zip(kinds, tensors) for i, p in enumerate(paths[k])}
    x_axis = 0 if module.batch_first else 1

    def stacked(states, kind):
        return jnp.stack([states[p] for p in paths[kind]], axis=0)

    def step_inputs(a, s):
        xs = jnp.expand_dims(a[0], time_axis)
        return (xs, (stacked(s, "h"), stacked(s, "c"))) if lstm else (xs, stacked(s, "h"))

    def split_outputs(o):
        out, hn = o
        news = {}
        for k, t in zip(kinds, tuple(hn) if lstm else (hn,)):
            # torch 2.11's LSTM decomposition returns (layers, 1, B, H): keep (layers, B, H)
            t = jnp.reshape(t, (layers,) + jnp.shape(t)[-2:])
            news.update({p: t[i] for i, p in enumerate(paths[k])})
        return jnp.squeeze(out, time_axis), news

    return StateLayout(
        export_args=(x.unsqueeze(time_axis), tensors if lstm else tensors[0]),
        update_args=(x,),
        batch_axes=(x_axis, (1, 1) if lstm else 1),
        batch=batch,
        init=init,
        step_inputs=step_inputs,
        split_outputs=split_outputs,
    )


def size_example_states(module: nn.Module, args: tuple) -> tuple:
    """Example state inputs the library sizes lazily, given the size one step gives them.

    `forward(x, *state) -> (y, *new_state)` modules of SNN libraries take start states that are
    empty (snntorch `init_leaky()` is `zeros(0)`) or broadcast (norse `v = v_leak`, a scalar)
    and let the first step size them. One eager warm-up step on copies (the module's slots and
    RNG untouched) gives each state's size: an empty start value becomes zeros of that size, a
    broadcastable one is broadcast. Other inputs are returned as they are.
    """
    if len(args) < 2:
        return args
    states = [pytree.tree_leaves(a) for a in args[1:]]
    if not any(isinstance(t, torch.Tensor) and t.numel() <= 1 for leaves in states for t in leaves):
        return args
    copies = pytree.tree_map(
        lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, args
    )
    with torch.no_grad(), torch.random.fork_rng(devices=[]), swapped_slots(module):
        try:
            out = module(*copies)
        except Exception:
            return args
    if not isinstance(out, (tuple, list)) or len(out) != len(args):
        return args
    sized = [args[0]]
    for arg, new in zip(args[1:], out[1:]):
        if pytree.tree_structure(arg) != pytree.tree_structure(new):
            sized.append(arg)
            continue
        leaves = [_sized(a, n) for a, n in zip(pytree.tree_leaves(arg), pytree.tree_leaves(new))]
        sized.append(pytree.tree_unflatten(leaves, pytree.tree_structure(arg)))
    return tuple(sized)


def _sized(start, new):
    if (
        not (isinstance(start, torch.Tensor) and isinstance(new, torch.Tensor))
        or start.shape == new.shape
    ):
        return start
    if start.numel() == 0:
        return torch.zeros_like(new)
    try:
        return torch.broadcast_to(start.detach(), new.shape).to(new.dtype).clone()
    except RuntimeError:
        return start


def explicit_layout(module, args, step: ExportedStep, spec: Mapping | None) -> StateLayout:
    """forward(x, *state) -> (y, *new_state): state inputs/outputs paired in order.

    `spec` is `{'inputs': [i, ...], 'outputs': [j, ...], 'names': [...]}` (indices into
    example_inputs and into forward's returned tuple; a non-tuple return is index 0). Without
    `spec`, inputs 1.. pair with outputs 1.. when their structures and shapes match, and a
    single returned tensor shaped like the only state input is that state's new value.
    """
    outputs_meta = _output_meta(step)
    if spec is None:
        state_in, state_out = _auto_pairing(args, outputs_meta)
        names = None
    else:
        state_in = list(spec.get("inputs", ()))
        state_out = list(spec.get("outputs", ()))
        names = spec.get("names")
    if len(state_in) != len(state_out):
        raise ValueError(
            f"state= pairs inputs {state_in} with outputs {state_out}: they must "
            "have the same length"
        )
    tuple_out = isinstance(outputs_meta, (tuple, list))
    out_items = list(outputs_meta) if tuple_out else [outputs_meta]
    for i, j in zip(state_in, state_out):
        if not 0 <= i < len(args) or not 0 <= j < len(out_items):
            raise ValueError(
                f"state= index out of range: input {i} of {len(args)}, output {j} "
                f"of {len(out_items)}"
            )
        if pytree.tree_structure(args[i]) != pytree.tree_structure(out_items[j]):
            raise ValueError(f"state input {i} and output {j} have different structures")
    names = list(names) if names is not None else _input_names(module, state_in)
    init, leaf_paths = {}, {}
    for i, name in zip(state_in, names):
        leaves, _ = pytree.tree_flatten(args[i])
        paths = (
            [(name,)]
            if len(leaves) == 1 and isinstance(args[i], torch.Tensor)
            else [(name, str(k)) for k in range(len(leaves))]
        )
        leaf_paths[i] = paths
        for p, t in zip(paths, leaves):
            init[p] = (t, 0 if t.ndim >= 1 and t.shape[0] == step.batch_size else None)
    specs = {i: pytree.tree_structure(args[i]) for i in state_in}
    arg_slots = [i for i in range(len(args)) if i not in state_in]
    out_rest = [j for j in range(len(out_items)) if j not in state_out]

    def step_inputs(a, s):
        if len(a) != len(arg_slots):
            raise TypeError(f"update() takes {len(arg_slots)} inputs, got {len(a)}")
        full = [None] * len(args)
        for slot, value in zip(arg_slots, a):
            full[slot] = value
        for i in state_in:
            full[i] = pytree.tree_unflatten([s[p] for p in leaf_paths[i]], specs[i])
        return tuple(full)

    def split_outputs(o):
        if not state_out:
            return o, {}
        items = list(o) if tuple_out else [o]
        news = {}
        for i, j in zip(state_in, state_out):
            news.update(zip(leaf_paths[i], pytree.tree_leaves(items[j])))
        y = [items[j] for j in (out_rest or state_out)]
        return (y[0] if len(y) == 1 else tuple(y)), news

    return StateLayout(
        export_args=args,
        update_args=tuple(args[i] for i in arg_slots),
        batch_axes=None,
        batch=step.batch_size,
        init=init,
        step_inputs=step_inputs,
        split_outputs=split_outputs,
    )


def _output_meta(step: ExportedStep):
    out = next(n for n in step.graph.nodes if n.op == "output").args[0]
    vals = [getattr(out[i], "meta", {}).get("val") for i in step.user_outputs]
    return pytree.tree_unflatten(vals, step.out_spec)


def _same_shape(a, b) -> bool:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return False
    if a.ndim != b.ndim:
        return False
    return all(
        isinstance(x, torch.SymInt) or isinstance(y, torch.SymInt) or x == y
        for x, y in zip(a.shape, b.shape)
    )


def _matches(arg, out) -> bool:
    if pytree.tree_structure(arg) != pytree.tree_structure(out):
        return False
    return all(_same_shape(a, o) for a, o in zip(pytree.tree_leaves(arg), pytree.tree_leaves(out)))


def _auto_pairing(args, outputs_meta) -> tuple[list[int], list[int]]:
    if len(args) < 2:
        return [], []
    if isinstance(outputs_meta, (tuple, list)):
        if len(outputs_meta) == len(args) and all(
            _matches(args[k], outputs_meta[k]) for k in range(1, len(args))
        ):
            return list(range(1, len(args))), list(range(1, len(args)))
        return [], []
    if len(args) == 2 and _matches(args[1], outputs_meta):
        return [1], [0]
    return [], []


def _input_names(module, indices) -> list[str]:
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    names = []
    for i in indices:
        if i < len(params) and params[i].kind in (
            params[i].POSITIONAL_ONLY,
            params[i].POSITIONAL_OR_KEYWORD,
        ):
            names.append(params[i].name)
        else:
            names.append(f"state{i}")
    return names


# ----------------------------------------------------------------------------- initial states
#
# Two idioms give a model a state it creates itself:
# - `forward(x, h=None)`: when `h` is None the model makes the initial state (zeros, or a
#   learnable `nn.Parameter` expanded to the batch) and returns the new state;
# - an example state built from a parameter, `example_inputs=(x, model.h0.expand(B, H))`.
# Both are found here, so a conversion never runs them as a stateless model, and a parameter
# used as the initial state is known by name (its current value starts every sequence).


@dataclasses.dataclass(frozen=True)
class DefaultState:
    """`forward(*args, <name>=None)` creates its state: the slot, its initial value (what the
    model uses when the argument is None), which output returns the new state, and the
    parameter each state leaf starts from (None: a constant such as zeros)."""

    name: str
    slot: int
    output: int
    value: Any
    leaf_params: tuple


def _autograd_params(module: nn.Module, tensors) -> set[str]:
    """Names of the module's parameters the autograd graph of `tensors` reaches."""
    by_id = {id(p): n for n, p in module.named_parameters()}
    seen, found = set(), set()
    stack = [t.grad_fn for t in tensors if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        var = getattr(node, "variable", None)
        if var is not None and id(var) in by_id:
            found.add(by_id[id(var)])
        stack.extend(fn for fn, _ in getattr(node, "next_functions", ()))
    return found


def initial_state_param(module: nn.Module, leaf: torch.Tensor, allowed=None) -> str | None:
    """The parameter `leaf` is (a broadcast of), e.g. `model.h0.expand(B, H)`; None if none."""
    if not isinstance(leaf, torch.Tensor):
        return None
    names = _autograd_params(module, [leaf]) if leaf.grad_fn is not None else set()
    names |= {n for n, p in module.named_parameters() if p is leaf}
    if allowed is not None:
        names &= set(allowed)
    for name in sorted(names):
        p = module.get_parameter(name)
        try:
            if torch.equal(p.detach().expand(leaf.shape), leaf.detach()):
                return name
        except RuntimeError:
            continue
    return None


def _none_default_slot(module: nn.Module, n_args: int) -> tuple[int, str] | None:
    """The first positional parameter of forward after the given ones, if it defaults to None."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    params = [p for p in params if p.kind in kinds]
    if len(params) <= n_args or params[n_args].default is not None:
        return None
    return n_args, params[n_args].name


def _same(a, b) -> bool:
    la, lb = pytree.tree_leaves(a), pytree.tree_leaves(b)
    return len(la) == len(lb) and all(
        isinstance(x, torch.Tensor)
        and isinstance(y, torch.Tensor)
        and x.shape == y.shape
        and torch.equal(x.detach(), y.detach())
        for x, y in zip(la, lb)
    )


def default_state(module: nn.Module, args: tuple) -> DefaultState | None:
    """Recognise `forward(x, h=None) -> (y, new_h)` called without its state.

    Returns None when forward has no such argument or returns no new state for it. Raises a
    `ValueError` naming the fix when the state it creates cannot be reproduced (then the
    conversion would otherwise silently drop the memory).
    """
    if isinstance(module, (nn.RNNBase, *CELLS)):
        return None
    found = _none_default_slot(module, len(args))
    if found is None:
        return None
    slot, name = found
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        out = module(*args)
        if not isinstance(out, (tuple, list)) or len(out) < 2:
            return None
        for j in range(1, len(out)):
            candidate = pytree.tree_map(
                lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, out[j]
            )
            if not all(isinstance(t, torch.Tensor) for t in pytree.tree_leaves(candidate)):
                continue
            try:
                again = module(*args, candidate)
            except Exception:
                continue
            if not (
                isinstance(again, (tuple, list))
                and len(again) == len(out)
                and _matches(candidate, again[j])
            ):
                continue
            return _default_value(module, args, out, j, name, slot, candidate)
    return None


def _default_value(module, args, out, j, name, slot, shaped) -> DefaultState:
    """The initial state the model makes for argument `name`: a parameter broadcast to each
    state leaf (the parameters the None path uses and the explicit path does not) or zeros,
    checked by running forward with it."""
    used_default = _autograd_params(module, pytree.tree_leaves(out))
    used_given = _autograd_params(module, pytree.tree_leaves(module(*args, shaped)))
    spare = sorted(used_default - used_given)
    leaves, spec = pytree.tree_flatten(shaped)
    values, params = [], []
    for leaf in leaves:
        pick = next((n for n in spare if _broadcasts(module.get_parameter(n), leaf)), None)
        if pick is not None:
            spare.remove(pick)
            values.append(module.get_parameter(pick).detach().expand(leaf.shape).clone())
        else:
            values.append(torch.zeros_like(leaf))
        params.append(pick)
    value = pytree.tree_unflatten(values, spec)
    if not _same(module(*args, value), out) and len(leaves) == 1:
        # a frozen parameter or a buffer is no autograd leaf: try them by value
        tensors = [(n, p, True) for n, p in module.named_parameters()]
        tensors += [(n, b, False) for n, b in module.named_buffers()]
        for n, t, is_param in tensors:
            if _broadcasts(t, leaves[0]):
                trial = pytree.tree_unflatten([t.detach().expand(leaves[0].shape).clone()], spec)
                if _same(module(*args, trial), out):
                    value, params = trial, [n if is_param else None]
                    break
    if not _same(module(*args, value), out):
        raise ValueError(
            f"{type(module).__name__}.forward creates its state `{name}` when it is None, but "
            "the bridge cannot tell its initial value (it is neither zeros nor a parameter "
            f"broadcast to the batch). Pass it explicitly: example_inputs=(..., {name}0), "
            f"or state={{'inputs': [{slot}], 'outputs': [{j}]}} with that example state."
        )
    return DefaultState(name, slot, j, value, tuple(params))


def _broadcasts(p: torch.Tensor, leaf: torch.Tensor) -> bool:
    try:
        torch.broadcast_shapes(p.shape, leaf.shape)
    except RuntimeError:
        return False
    return torch.broadcast_shapes(p.shape, leaf.shape) == leaf.shape


def default_state_step(module, x, state):
    """BPTT step for `forward(x, h=None)`: the first call passes None, as the user's code does;
    a forward that returns no `(y, new_state)` pair keeps running with None (the argument was
    not a state)."""
    out = module(x, *state)
    if isinstance(out, (tuple, list)):
        if len(out) != 2:
            raise TypeError(
                f"{type(module).__name__}.forward(x, state=None) must return "
                f"(y, new_state), got a tuple of {len(out)}; pass state= and a "
                "step= to bptt_gradients"
            )
        return out[0], (out[1],)
    return out, state


# ----------------------------------------------------------------------------- stacked layers


def cross_layer_notes(module: nn.Module) -> dict[str, str]:
    """{parameter name: 'approximate: ...'} for the lower layers of `nn.RNN/GRU/LSTM` with
    num_layers > 1: layer l's new state feeds layers l+1.. in the same step, and those keep
    memory; a trace of layer l's parameters follows layer l's own recurrence only, so the path
    through the upper layers' memory is dropped."""
    notes = {}
    for owner, sub in module.named_modules():
        if not isinstance(sub, nn.RNNBase) or sub.num_layers < 2:
            continue
        where = f"`{owner}` ({type(sub).__name__})" if owner else type(sub).__name__
        for name, _ in sub.named_parameters(recurse=False):
            layer = int(name.rsplit("_l", 1)[1].split("_")[0])
            if layer < sub.num_layers - 1:
                top = sub.num_layers - 1
                upper = f"layer {top}" if layer + 1 == top else f"layers {layer + 1}..{top}"
                notes[f"{owner}.{name}" if owner else name] = (
                    f"approximate: cross-layer memory: layer {layer} of {where} feeds {upper}, "
                    f"which keep memory; its trace follows "
                    f"layer {layer}'s own recurrence only and drops the path through the upper "
                    "layers' states over time"
                )
    return notes
