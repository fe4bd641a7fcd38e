"""Wrap a torch recurrent model as a brainstate module that runs one step in JAX.

`from_torch` exports one step (`etrace_bridge.export`), lowers it (`etrace_bridge.lowering`) and
builds a `TorchModule` whose states mirror the torch model:

- every parameter is a `brainstate.ParamState` at its dotted torch name split at dots;
- every recurrent state tensor is a `brainstate.HiddenState`; `nn.RNN/GRU/LSTM` states of shape
  `(num_layers, B, H)` are split into one state per layer (`('h', 'l0')`, `('c', 'l0')`, ...),
  because the online compiler forms one hidden group per state;
- every buffer mutated by forward (SNN style) is a `HiddenState` at its dotted buffer name.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Mapping

import brainstate
import jax
import jax.numpy as jnp
import torch
import torch.utils._pytree as pytree

from etrace_bridge.dlpack import to_jax
from etrace_bridge.export import ExportedStep, export_step
from etrace_bridge.lowering import LoweredStep, lower

__all__ = ["from_torch", "TorchModule"]

Path = tuple[str, ...]
_CELLS = (torch.nn.RNNCell, torch.nn.GRUCell, torch.nn.LSTMCell)


# ----------------------------------------------------------------------------- conventions


@dataclasses.dataclass(repr=False)
class _Layout:
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


def _cell_layout(module: torch.nn.Module, args: tuple) -> _Layout:
    """nn.RNNCell / GRUCell: state h; nn.LSTMCell: state (h, c); output = new h."""
    x = args[0]
    lstm = isinstance(module, torch.nn.LSTMCell)
    if len(args) == 1:
        shape = (x.shape[0], module.hidden_size) if x.ndim == 2 else (module.hidden_size,)
        zero = torch.zeros(shape, dtype=module.weight_ih.dtype)
        state = (zero, zero.clone()) if lstm else zero
    elif len(args) == 2:
        state = args[1]
    else:
        raise ValueError(f"{type(module).__name__} example_inputs must be (x,) or (x, state), "
                         f"got {len(args)} items")
    axis = 0 if x.ndim == 2 else None
    batch = x.shape[0] if axis == 0 else None
    if lstm:
        h, c = state
        init = {("h",): (h, axis), ("c",): (c, axis)}
        return _Layout(
            export_args=(x, (h, c)), update_args=(x,), batch_axes=(axis, (axis, axis)),
            batch=batch, init=init,
            step_inputs=lambda a, s: (a[0], (s[("h",)], s[("c",)])),
            split_outputs=lambda o: (o[0], {("h",): o[0], ("c",): o[1]}))
    return _Layout(
        export_args=(x, state), update_args=(x,), batch_axes=(axis, axis), batch=batch,
        init={("h",): (state, axis)},
        step_inputs=lambda a, s: (a[0], s[("h",)]),
        split_outputs=lambda o: (o, {("h",): o}))


def _rnn_layout(module: torch.nn.RNNBase, args: tuple) -> _Layout:
    """nn.RNN / GRU / LSTM run with sequence length 1; one hidden state per layer."""
    name = type(module).__name__
    if getattr(module, "proj_size", 0):
        raise ValueError(f"{name} with proj_size={module.proj_size} is not supported: its h and "
                         "c have different sizes. Use proj_size=0 and a Linear readout.")
    if len(args) not in (1, 2):
        raise ValueError(f"{name} example_inputs must be (x,) or (x, state), got {len(args)} items")
    x = args[0]
    time_axis = 1 if module.batch_first else 0
    if x.ndim == 3:
        if x.shape[time_axis] != 1:
            raise ValueError(f"{name} converts one time step: give x as (batch, input) or with a "
                             f"time dimension of size 1, got shape {tuple(x.shape)}")
        x = x.squeeze(time_axis)
    if x.ndim != 2:
        raise ValueError(f"{name} example x must be (batch, input_size), got {tuple(x.shape)}")
    layers, batch, hidden = module.num_layers, x.shape[0], module.hidden_size
    lstm = isinstance(module, torch.nn.LSTM)
    if len(args) == 2:
        state = args[1]
    else:
        zero = torch.zeros(layers, batch, hidden, dtype=x.dtype)
        state = (zero, zero.clone()) if lstm else zero
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
            news.update({p: t[i] for i, p in enumerate(paths[k])})
        return jnp.squeeze(out, time_axis), news

    return _Layout(
        export_args=(x.unsqueeze(time_axis), tensors if lstm else tensors[0]), update_args=(x,),
        batch_axes=(x_axis, (1, 1) if lstm else 1), batch=batch, init=init,
        step_inputs=step_inputs, split_outputs=split_outputs)


def _explicit_layout(module, args, step: ExportedStep, spec: Mapping | None) -> _Layout:
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
        raise ValueError(f"state= pairs inputs {state_in} with outputs {state_out}: they must "
                         "have the same length")
    tuple_out = isinstance(outputs_meta, (tuple, list))
    out_items = list(outputs_meta) if tuple_out else [outputs_meta]
    for i, j in zip(state_in, state_out):
        if not 0 <= i < len(args) or not 0 <= j < len(out_items):
            raise ValueError(f"state= index out of range: input {i} of {len(args)}, output {j} "
                             f"of {len(out_items)}")
        if pytree.tree_structure(args[i]) != pytree.tree_structure(out_items[j]):
            raise ValueError(f"state input {i} and output {j} have different structures")
    names = list(names) if names is not None else _input_names(module, state_in)
    init, leaf_paths = {}, {}
    for i, name in zip(state_in, names):
        leaves, _ = pytree.tree_flatten(args[i])
        paths = [(name,)] if len(leaves) == 1 and isinstance(args[i], torch.Tensor) else \
            [(name, str(k)) for k in range(len(leaves))]
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

    return _Layout(export_args=args, update_args=tuple(args[i] for i in arg_slots),
                   batch_axes=None, batch=step.batch_size, init=init,
                   step_inputs=step_inputs, split_outputs=split_outputs)


def _output_meta(step: ExportedStep):
    out = next(n for n in step.graph.nodes if n.op == "output").args[0]
    vals = [getattr(out[i], "meta", {}).get("val") for i in step.user_outputs]
    return pytree.tree_unflatten(vals, step.out_spec)


def _same_shape(a, b) -> bool:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return False
    if a.ndim != b.ndim:
        return False
    return all(isinstance(x, torch.SymInt) or isinstance(y, torch.SymInt) or x == y
               for x, y in zip(a.shape, b.shape))


def _matches(arg, out) -> bool:
    if pytree.tree_structure(arg) != pytree.tree_structure(out):
        return False
    return all(_same_shape(a, o) for a, o in zip(pytree.tree_leaves(arg), pytree.tree_leaves(out)))


def _auto_pairing(args, outputs_meta) -> tuple[list[int], list[int]]:
    if len(args) < 2:
        return [], []
    if isinstance(outputs_meta, (tuple, list)):
        if len(outputs_meta) == len(args) and all(
                _matches(args[k], outputs_meta[k]) for k in range(1, len(args))):
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
        if i < len(params) and params[i].kind in (params[i].POSITIONAL_ONLY,
                                                  params[i].POSITIONAL_OR_KEYWORD):
            names.append(params[i].name)
        else:
            names.append(f"state{i}")
    return names


# ----------------------------------------------------------------------------- module


class _Namespace(brainstate.nn.Module):
    """Holds the states under one prefix of a torch dotted name (e.g. `gru`)."""

    def update(self, *args, **kwargs):
        raise TypeError("this is a parameter container of a TorchModule; call the TorchModule")


@dataclasses.dataclass(eq=False, repr=False)
class _Bridge:
    """Everything a TorchModule needs besides its states (static for brainstate's graph)."""

    torch_module: torch.nn.Module
    step: ExportedStep
    lowered: LoweredStep
    layout: _Layout
    params: list[tuple[Path, str]]
    buffer_states: list[tuple[Path, str]]
    constants: dict[str, Any]
    state_init: dict[Path, tuple[torch.Tensor, int | None]]
    batch_size: int | None
    dynamic_batch: bool

    def __repr__(self) -> str:
        return (f"<torch {type(self.torch_module).__name__}: {len(self.params)} parameters, "
                f"{len(self.state_init)} hidden states, batch {self.batch_size}"
                f"{' (dynamic)' if self.dynamic_batch else ' (static)'}>")


class TorchModule(brainstate.nn.Module):
    """A torch model's one-step computation in JAX, with brainstate parameter/hidden states.

    Build it with `from_torch`. `update(*inputs)` runs one step and returns the model output;
    hidden states are read and written in place. `sync_from_torch()` re-imports the torch
    parameters (call it after every torch optimizer step).
    """

    def __init__(self, bridge: _Bridge):
        super().__init__()
        self._bridge = bridge
        taken: dict[Path, str] = {}
        for path, name in bridge.params:
            self._place(path, brainstate.ParamState(_import(_torch_param(bridge, name))),
                        f"parameter `{name}`", taken)
        for path, (value, _) in bridge.state_init.items():
            self._place(path, brainstate.HiddenState(_import(value, copy=True)),
                        f"state {path}", taken)

    def _place(self, path: Path, state, what: str, taken: dict) -> None:
        for k in range(1, len(path) + 1):
            if path[:k] in taken:
                raise ValueError(f"{what} at path {path} collides with {taken[path[:k]]}")
        for other, owner in taken.items():
            if other[:len(path)] == path:
                raise ValueError(f"{what} at path {path} collides with {owner}")
        taken[path] = what
        node = self
        for key in path[:-1]:
            child = node.__dict__.get(key)
            if child is None:
                self._check_free(node, key, what)
                child = _Namespace()
                setattr(node, key, child)
            node = child
        self._check_free(node, path[-1], what)
        setattr(node, path[-1], state)

    @staticmethod
    def _check_free(node, key: str, what: str) -> None:
        if key in node.__dict__ or hasattr(type(node), key):
            raise ValueError(f"{what}: the name `{key}` is already used by {type(node).__name__}; "
                             "rename the torch submodule/parameter")

    def _state(self, path: Path) -> brainstate.State:
        return functools.reduce(getattr, path, self)

    # -- running

    def update(self, *inputs):
        """Run one step on `inputs` (batch first, no time axis); returns the model output."""
        b = self._bridge
        self._check_batch(inputs)
        states = {p: self._state(p).value for p in b.state_init}
        params = {name: self._state(p).value for p, name in b.params}
        buffers = dict(b.constants)
        buffers.update({name: self._state(p).value for p, name in b.buffer_states})
        outputs, new_buffers = b.lowered(params, buffers, *b.layout.step_inputs(inputs, states))
        y, new_states = b.layout.split_outputs(outputs)
        for p, v in new_states.items():
            self._state(p).value = v
        paths = dict((name, p) for p, name in b.buffer_states)
        for name, v in new_buffers.items():
            self._state(paths[name]).value = v
        return y

    def _check_batch(self, inputs) -> None:
        b = self._bridge
        if b.batch_size is None or not inputs or jnp.ndim(inputs[0]) < 2:
            return
        size = jnp.shape(inputs[0])[0]
        if not b.dynamic_batch and size != b.batch_size:
            raise ValueError(
                f"this model was exported with a static batch size of {b.batch_size} (torch "
                f"could not keep the batch dimension dynamic), but the input has batch size "
                f"{size}. Convert it again with example inputs of batch size {size}.")
        for path, (_, axis) in b.state_init.items():
            current = jnp.shape(self._state(path).value)[axis] if axis is not None else size
            if current != size:
                raise ValueError(f"the hidden states hold batch size {current} but the input "
                                 f"has batch size {size}; call reset_state({size}) first")

    # -- states

    def init_state(self, batch_size: int | None = None, **kwargs) -> None:
        """Set every hidden state to its example value, re-made for `batch_size`."""
        b = self._bridge
        if batch_size is not None and b.batch_size is not None and not b.dynamic_batch \
                and batch_size != b.batch_size:
            raise ValueError(f"this model was exported with a static batch size of "
                             f"{b.batch_size}; batch size {batch_size} needs a new conversion "
                             f"with example inputs of batch size {batch_size}")
        for path, (value, axis) in b.state_init.items():
            self._state(path).value = _import(_resize(value, axis, batch_size, path), copy=True)

    def reset_state(self, batch_size: int | None = None, **kwargs) -> None:
        """Same as `init_state`: hidden states back to their example values."""
        self.init_state(batch_size, **kwargs)

    def example_step_inputs(self, batch_size: int | None = None) -> tuple:
        """Example inputs of `update` as JAX arrays (e.g. to compile an online algorithm).

        With another `batch_size` they are zeros of the re-batched shape: only shapes and dtypes
        are meant to be used.
        """
        b = self._bridge
        if batch_size is not None and b.batch_size is not None and not b.dynamic_batch \
                and batch_size != b.batch_size:
            raise ValueError(f"this model was exported with a static batch size of "
                             f"{b.batch_size}, not {batch_size}")
        out = []
        for x in b.layout.update_args:
            if (isinstance(x, torch.Tensor) and batch_size is not None and b.batch_size is not None
                    and x.ndim >= 1 and x.shape[0] == b.batch_size and batch_size != b.batch_size):
                x = x.new_zeros((batch_size, *x.shape[1:]))
            out.append(_import(x, copy=True) if isinstance(x, torch.Tensor) else x)
        return tuple(out)

    # -- torch side

    def torch_parameters(self) -> dict[Path, torch.nn.Parameter]:
        """`{path: torch.nn.Parameter}`, to write online gradients back to torch."""
        return {p: _torch_param(self._bridge, name) for p, name in self._bridge.params}

    def sync_from_torch(self) -> None:
        """Re-import all torch parameters and constant buffers (torch optimisers work in place)."""
        b = self._bridge
        for path, name in b.params:
            self._state(path).value = _import(_torch_param(b, name))
        for name in b.constants:
            b.constants[name] = _import(b.torch_module.get_buffer(name))

    @property
    def exported(self) -> ExportedStep:
        """The exported torch step (graph, signature) this module runs."""
        return self._bridge.step

    @property
    def torch_module(self) -> torch.nn.Module:
        return self._bridge.torch_module


def _torch_param(bridge: _Bridge, name: str) -> torch.nn.Parameter:
    return bridge.torch_module.get_parameter(name)


def _import(t: torch.Tensor, copy: bool = False):
    t = t.detach()
    if t.dtype == torch.int64 and not jax.config.read("jax_enable_x64"):
        t = t.to(torch.int32)
    return to_jax(t, copy=True) if copy else to_jax(t)


def _resize(value: torch.Tensor, axis: int | None, batch: int | None, path: Path):
    if batch is None or axis is None or value.shape[axis] == batch:
        return value
    first = value.narrow(axis, 0, 1)
    if not torch.equal(value, first.expand_as(value)):
        raise ValueError(f"state {path} has a different example value per batch row, so it "
                         f"cannot be re-made for batch size {batch}; give example states whose "
                         "rows are equal (e.g. zeros) or convert with that batch size")
    shape = list(value.shape)
    shape[axis] = batch
    return first.expand(shape).contiguous()


def _check_float64(module: torch.nn.Module, args: tuple) -> None:
    if jax.config.read("jax_enable_x64"):
        return
    tensors = [("parameter", n, t) for n, t in module.named_parameters()]
    tensors += [("buffer", n, t) for n, t in module.named_buffers()]
    tensors += [("example input", str(i), t) for i, t in enumerate(pytree.tree_leaves(args))
                if isinstance(t, torch.Tensor)]
    for kind, name, t in tensors:
        if t.dtype in (torch.float64, torch.complex128):
            raise TypeError(
                f"{kind} `{name}` is {t.dtype} but JAX 64-bit mode is off, so JAX would silently "
                "compute in float32. Enable it with jax.config.update('jax_enable_x64', True) "
                "before converting, or use a float32 model and inputs (model.float()).")


def from_torch(
    module: torch.nn.Module,
    example_inputs: Any,
    *,
    state: Mapping | None = None,
    dynamic_batch: bool = True,
    custom_ops: Mapping | None = None,
) -> TorchModule:
    """Convert a torch model to a `TorchModule` running one step in JAX.

    State conventions (detected; `state=` overrides with `{'inputs': [i..], 'outputs': [j..],
    'names': [..]}`): `nn.RNNCell/GRUCell/LSTMCell` called as `cell(x, h)` / `cell(x, (h, c))`;
    `nn.RNN/GRU/LSTM` one step at a time with per-layer states; `forward(x, *state) ->
    (y, *new_state)`; and buffers mutated in forward. `custom_ops` maps 'namespace::name' of a
    `torch.library.custom_op` to its JAX implementation.
    """
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    _check_float64(module, args)
    if state is None and isinstance(module, _CELLS):
        layout = _cell_layout(module, args)
    elif state is None and isinstance(module, torch.nn.RNNBase):
        layout = _rnn_layout(module, args)
    else:
        layout = None
    if layout is not None:
        step = export_step(module, layout.export_args, dynamic_batch=dynamic_batch,
                           batch_axes=layout.batch_axes)
    else:
        step = export_step(module, args, dynamic_batch=dynamic_batch)
        layout = _explicit_layout(module, args, step, state)
    batch = layout.batch
    lowered = lower(step, custom_ops)
    buffer_states = [(tuple(name.split(".")), name) for name in step.mutated_buffers]
    state_init = dict(layout.init)
    for path, name in buffer_states:
        buf = module.get_buffer(name)
        state_init[path] = (buf.detach().clone(),
                            0 if batch is not None and buf.ndim >= 1 and buf.shape[0] == batch
                            else None)
    constants = {name: _import(buf) for name, buf in module.named_buffers()
                 if name not in step.mutated_buffers}
    bridge = _Bridge(
        torch_module=module, step=step, lowered=lowered, layout=layout,
        params=[(tuple(n.split(".")), n) for n, _ in module.named_parameters()],
        buffer_states=buffer_states, constants=constants, state_init=state_init,
        batch_size=batch, dynamic_batch=step.dynamic_batch)
    return TorchModule(bridge)
