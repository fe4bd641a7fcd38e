"""Wrap a torch recurrent model as a brainstate module that runs one step in JAX.

`from_torch` exports one step (`etrace_bridge.export`), lowers it (`etrace_bridge.lowering`) and
builds a `TorchModule` whose states mirror the torch model:

- every parameter is a `brainstate.ParamState` at its dotted torch name split at dots;
- every recurrent state tensor is a `brainstate.HiddenState`; `nn.RNN/GRU/LSTM` states of shape
  `(num_layers, B, H)` are split into one state per layer (`('h', 'l0')`, `('c', 'l0')`, ...),
  because the online compiler forms one hidden group per state;
- every buffer mutated by forward (SNN style) is a `HiddenState` at its dotted buffer name;
- a complex state is two real `HiddenState`s, `path + ('re',)` and `path + ('im',)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import torch
import torch.utils._pytree as pytree
from jax import lax

from etrace_bridge.arrays import check_float64, import_tensor
from etrace_bridge.check import check_conversion
from etrace_bridge.conventions import (
    CELLS,
    Path,
    StateLayout,
    cell_layout,
    cross_layer_notes,
    default_state,
    explicit_layout,
    initial_state_param,
    rnn_layout,
    size_example_states,
)
from etrace_bridge.export import ExportedStep, export_step
from etrace_bridge.lowering import LoweredStep, lower
from etrace_bridge.lowering.complex import make_complex

__all__ = ["from_torch", "TorchModule"]


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
    layout: StateLayout
    params: list[tuple[Path, str]]
    buffer_states: list[tuple[Path, str]]
    constants: dict[str, Any]
    state_init: dict[Path, tuple[torch.Tensor, int | None]]
    batch_size: int | None
    dynamic_batch: bool
    complex_states: frozenset = frozenset()
    state_params: dict = dataclasses.field(default_factory=dict)
    notes: dict = dataclasses.field(default_factory=dict)

    def __repr__(self) -> str:
        return (
            f"<torch {type(self.torch_module).__name__}: {len(self.params)} parameters, "
            f"{len(self.state_init)} hidden states, batch {self.batch_size}"
            f"{' (dynamic)' if self.dynamic_batch else ' (static)'}>"
        )


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
            self._place(
                path,
                brainstate.ParamState(import_tensor(_torch_param(bridge, name))),
                f"parameter `{name}`",
                taken,
            )
        for path, (value, _) in bridge.state_init.items():
            for part, v in _state_parts(path, import_tensor(value, copy=True)):
                self._place(part, brainstate.HiddenState(v), f"state {part}", taken)
        if bridge.state_params:
            dtype = _torch_param(bridge, next(iter(bridge.state_params.values()))).dtype
            dtype = import_tensor(torch.zeros((), dtype=dtype)).dtype
            self._place(
                _FIRST_STEP,
                brainstate.ShortTermState(jnp.ones((), dtype)),
                "the first-step flag of learnable initial states",
                taken,
            )

    def _place(self, path: Path, state, what: str, taken: dict) -> None:
        for k in range(1, len(path) + 1):
            if path[:k] in taken:
                raise ValueError(f"{what} at path {path} collides with {taken[path[:k]]}")
        for other, owner in taken.items():
            if other[: len(path)] == path:
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
            raise ValueError(
                f"{what}: the name `{key}` is already used by {type(node).__name__}; "
                "rename the torch submodule/parameter"
            )

    def _state(self, path: Path) -> brainstate.State:
        return functools.reduce(getattr, path, self)

    def _read_hidden(self, path: Path):
        """The value of hidden state `path` (a complex state from its real and imaginary
        parts)."""
        if path in self._bridge.complex_states:
            return make_complex(
                self._state(path + ("re",)).value, self._state(path + ("im",)).value
            )
        return self._state(path).value

    def _write_hidden(self, path: Path, value) -> None:
        for part, v in _state_parts(path, value, self._bridge.complex_states):
            self._state(part).value = v

    # -- running

    def update(self, *inputs):
        """Run one step on `inputs` (batch first, no time axis); returns the model output."""
        b = self._bridge
        self._check_batch(inputs)
        states = {p: self._read_hidden(p) for p in b.state_init}
        params = {name: self._state(p).value for p, name in b.params}
        if b.state_params:
            first = self._state(_FIRST_STEP)
            for p, name in b.state_params.items():
                states[p] = _from_initial_param(states[p], params[name], first.value)
            first.value = jnp.zeros_like(first.value)
        buffers = dict(b.constants)
        buffers.update({name: self._state(p).value for p, name in b.buffer_states})
        outputs, new_buffers = b.lowered(params, buffers, *b.layout.step_inputs(inputs, states))
        y, new_states = b.layout.split_outputs(outputs)
        for p, v in new_states.items():
            self._write_hidden(p, v)
        paths = dict((name, p) for p, name in b.buffer_states)
        for name, v in new_buffers.items():
            self._state(paths[name]).value = v
        return y

    @contextlib.contextmanager
    def states_kept(self):
        """Run a block of trial steps, then put every non-parameter state back (hidden states
        and step flags), so probing the module leaves it as it was."""
        kept = {
            k: st for k, st in self.states().items() if not isinstance(st, brainstate.ParamState)
        }
        saved = {k: st.value for k, st in kept.items()}
        try:
            yield
        finally:
            for k, st in kept.items():
                st.value = saved[k]

    def _check_batch(self, inputs) -> None:
        b = self._bridge
        first = jax.tree.leaves(inputs)[:1]  # an input may be a tuple (a loss's outputs)
        if b.batch_size is None or not first or jnp.ndim(first[0]) < 2:
            return
        size = jnp.shape(first[0])[0]
        if not b.dynamic_batch and size != b.batch_size:
            raise ValueError(
                f"this model was exported with a static batch size of {b.batch_size} (torch "
                f"could not keep the batch dimension dynamic), but the input has batch size "
                f"{size}. Convert it again with example inputs of batch size {size}."
            )
        for path, (_, axis) in b.state_init.items():
            current = jnp.shape(self._read_hidden(path))[axis] if axis is not None else size
            if current != size:
                raise ValueError(
                    f"the hidden states hold batch size {current} but the input "
                    f"has batch size {size}; call reset_state({size}) first"
                )

    # -- states

    def init_state(self, batch_size: int | None = None, **kwargs) -> None:
        """Set every hidden state to its example value, re-made for `batch_size`."""
        b = self._bridge
        if (
            batch_size is not None
            and b.batch_size is not None
            and not b.dynamic_batch
            and batch_size != b.batch_size
        ):
            raise ValueError(
                f"this model was exported with a static batch size of "
                f"{b.batch_size}; batch size {batch_size} needs a new conversion "
                f"with example inputs of batch size {batch_size}"
            )
        for path, (value, axis) in b.state_init.items():
            if path in b.state_params:  # a learnable initial state: its current value
                value = _torch_param(b, b.state_params[path]).detach().expand(value.shape)
            self._write_hidden(
                path, import_tensor(_resize(value, axis, batch_size, path), copy=True)
            )
        if b.state_params:
            first = self._state(_FIRST_STEP)
            first.value = jnp.ones_like(first.value)

    def reset_state(self, batch_size: int | None = None, **kwargs) -> None:
        """Same as `init_state`: hidden states back to their example values."""
        self.init_state(batch_size, **kwargs)

    def example_step_inputs(self, batch_size: int | None = None) -> tuple:
        """Example inputs of `update` as JAX arrays (e.g. to compile an online algorithm).

        With another `batch_size` they are zeros of the re-batched shape: only shapes and dtypes
        are meant to be used.
        """
        b = self._bridge
        if (
            batch_size is not None
            and b.batch_size is not None
            and not b.dynamic_batch
            and batch_size != b.batch_size
        ):
            raise ValueError(
                f"this model was exported with a static batch size of "
                f"{b.batch_size}, not {batch_size}"
            )
        out = []
        for x in b.layout.update_args:
            if (
                isinstance(x, torch.Tensor)
                and batch_size is not None
                and b.batch_size is not None
                and x.ndim >= 1
                and x.shape[0] == b.batch_size
                and batch_size != b.batch_size
            ):
                x = x.new_zeros((batch_size, *x.shape[1:]))
            out.append(import_tensor(x, copy=True) if isinstance(x, torch.Tensor) else x)
        return tuple(out)

    # -- torch side

    def torch_parameters(self) -> dict[Path, torch.nn.Parameter]:
        """`{path: torch.nn.Parameter}`, to write online gradients back to torch."""
        return {p: _torch_param(self._bridge, name) for p, name in self._bridge.params}

    def sync_from_torch(self) -> None:
        """Re-import all torch parameters and constant buffers (torch optimisers work in place)."""
        b = self._bridge
        for path, name in b.params:
            self._state(path).value = import_tensor(_torch_param(b, name))
        for name in b.constants:
            b.constants[name] = import_tensor(b.torch_module.get_buffer(name))

    @property
    def exported(self) -> ExportedStep:
        """The exported torch step (graph, signature) this module runs."""
        return self._bridge.step

    @property
    def torch_module(self) -> torch.nn.Module:
        return self._bridge.torch_module

    @property
    def approximations(self) -> dict[str, str]:
        """{torch parameter name: 'approximate: reason'} known from the torch model's structure
        (lower layers of stacked nn.RNN/GRU/LSTM), in addition to the online compiler's notes."""
        return dict(self._bridge.notes)


_FIRST_STEP = ("etrace_first_step",)


def _from_initial_param(h, theta, first):
    """`h` in value; at the first step after a reset, dh/dtheta = 1 (h is theta broadcast).

    This is how a parameter used as the initial state is trained online: the compiler sees
    theta reach the hidden state element by element and gives it an element-wise trace,
    eps^t = D^t eps^{t-1} + dh^t/dtheta|_{h^{t-1}}; the last term is dh^1/dh^0 at the first
    step and zero after, so eps^t = dh^t/dh^0 exactly wherever the recurrence is element-wise,
    and the parameter gets sum_t delta^t eps^t = dL/dh^0, summed over the batch like torch's
    expand.
    """
    theta = jnp.broadcast_to(theta, jnp.shape(h)).astype(jnp.result_type(h))
    return h + first * (theta - lax.stop_gradient(theta))


def _state_parts(path: Path, value, complex_paths=None) -> list:
    """[(state path, real value)]: a complex state is kept as two real hidden states, its real
    part at `path + ('re',)` and its imaginary part at `path + ('im',)`.

    The online compiler's traces and per-unit Jacobians are real: a complex unit is a pair of
    real states coupled element-wise (a 2x2 Jacobian per unit), which is exact whether or not
    the step is holomorphic in the state (abs, angle, real parts are not).
    """
    is_complex = jnp.iscomplexobj(value) if complex_paths is None else path in complex_paths
    if not is_complex:
        return [(path, value)]
    return [(path + ("re",), jnp.real(value)), (path + ("im",), jnp.imag(value))]


def _torch_param(bridge: _Bridge, name: str) -> torch.nn.Parameter:
    return bridge.torch_module.get_parameter(name)


def _resize(value: torch.Tensor, axis: int | None, batch: int | None, path: Path):
    if batch is None or axis is None or value.shape[axis] == batch:
        return value
    first = value.narrow(axis, 0, 1)
    if not torch.equal(value, first.expand_as(value)):
        raise ValueError(
            f"state {path} has a different example value per batch row, so it "
            f"cannot be re-made for batch size {batch}; give example states whose "
            "rows are equal (e.g. zeros) or convert with that batch size"
        )
    shape = list(value.shape)
    shape[axis] = batch
    return first.expand(shape).contiguous()


def _check_float64(module: torch.nn.Module, args: tuple) -> None:
    tensors = [("parameter", n, t) for n, t in module.named_parameters()]
    tensors += [("buffer", n, t) for n, t in module.named_buffers()]
    tensors += [
        ("example input", str(i), t)
        for i, t in enumerate(pytree.tree_leaves(args))
        if isinstance(t, torch.Tensor)
    ]
    check_float64(tensors)


def from_torch(
    module: torch.nn.Module,
    example_inputs: Any,
    *,
    state: Mapping | None = None,
    dynamic_batch: bool = True,
    custom_ops: Mapping | None = None,
    check: bool = True,
) -> TorchModule:
    """Convert a torch model to a `TorchModule` running one step in JAX.

    State conventions (detected; `state=` overrides with `{'inputs': [i..], 'outputs': [j..],
    'names': [..]}`): `nn.RNNCell/GRUCell/LSTMCell` called as `cell(x, h)` / `cell(x, (h, c))`;
    `nn.RNN/GRU/LSTM` one step at a time with per-layer states; `forward(x, *state) ->
    (y, *new_state)`; and buffers mutated in forward. `custom_ops` maps 'namespace::name' of a
    `torch.library.custom_op` to its JAX implementation. With `check` (default) the converted
    step is run against the torch module for a few steps (`etrace_bridge.check`); a divergence
    is a `ConversionCheckError`.
    """
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    _check_float64(module, args)
    if state is None and isinstance(module, CELLS):
        layout = cell_layout(module, args)
    elif state is None and isinstance(module, torch.nn.RNNBase):
        layout = rnn_layout(module, args)
    else:
        layout = None
        args = args if state is not None else size_example_states(module, args)
    default = default_state(module, args) if layout is None and state is None else None
    if default is not None:  # forward(x, h=None): the state the model creates for itself
        args = args + (default.value,)
        state = {"inputs": [default.slot], "outputs": [default.output], "names": [default.name]}
    if layout is not None:
        step = export_step(
            module, layout.export_args, dynamic_batch=dynamic_batch, batch_axes=layout.batch_axes
        )
    else:
        step = export_step(module, args, dynamic_batch=dynamic_batch)
        layout = explicit_layout(module, args, step, state)
    batch = layout.batch
    state_params = _initial_state_params(module, layout, default)
    lowered = lower(step, custom_ops)
    buffer_states = [(tuple(name.split(".")), name) for name in step.mutated_buffers]
    state_init = {p: (t.detach(), axis) for p, (t, axis) in layout.init.items()}
    for path, name in buffer_states:
        buf = step.state_values.get(name)
        buf = module.get_buffer(name) if buf is None else buf
        state_init[path] = (
            buf.detach().clone(),
            0 if batch is not None and buf.ndim >= 1 and buf.shape[0] == batch else None,
        )
    constants = {
        name: import_tensor(buf)
        for name, buf in module.named_buffers()
        if name not in step.mutated_buffers
    }
    bridge = _Bridge(
        torch_module=module,
        step=step,
        lowered=lowered,
        layout=layout,
        params=[(tuple(n.split(".")), n) for n, _ in module.named_parameters()],
        buffer_states=buffer_states,
        constants=constants,
        state_init=state_init,
        batch_size=batch,
        dynamic_batch=step.dynamic_batch,
        complex_states=frozenset(p for p, (v, _) in state_init.items() if v.is_complex()),
        state_params=state_params,
        notes=cross_layer_notes(module),
    )
    converted = TorchModule(bridge)
    if check:
        check_conversion(converted)
    return converted


def _initial_state_params(module, layout: StateLayout, default) -> dict[Path, str]:
    """{state path: parameter name} for states that start from a parameter (learnable h0)."""
    if default is not None:
        names = default.leaf_params
    else:
        names = [initial_state_param(module, t) for t, _ in layout.init.values()]
    out = {}
    for (path, (t, _)), name in zip(layout.init.items(), names):
        if name is None:
            continue
        if t.is_complex() or not t.is_floating_point():
            raise ValueError(
                f"state {path} starts from parameter `{name}` but is "
                f"{t.dtype}; a learnable initial state must be a real float"
            )
        out[path] = name
    return out
