"""Export ONE time step of a torch model with `torch.export` and split its signature.

The step is brought down to core ATen minus `aten.linear` / `aten.convolution` (`decompose`), so
every parameter reaches the graph as a direct argument of those two ops (the lowering routes them
to ETP ops). Buffers the step mutates (SNN-style state) are lifted to explicit graph
inputs/outputs so their batch dimension can be dynamic like the other states.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import threading
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.export.graph_signature import InputKind, OutputKind

from etrace_bridge.autograd_functions import (
    NAMESPACE,
    capture_functions,
    routed_call,
    routed_functions,
)
from etrace_bridge.decompose import decompose
from etrace_bridge.errors import ExportError, UnsupportedModelError
from etrace_bridge.state_slots import ABSENT, Slot, discover_slots

__all__ = ["ExportedStep", "export_step", "user_frame"]

aten = torch.ops.aten
_LIFT_PREFIX = "inner."
_TORCH_DIR = os.path.dirname(torch.__file__)
_BRIDGE_DIR = os.path.dirname(os.path.abspath(__file__))
# torch.export is not thread-safe (its tracing state is global): conversions run one at a time
_EXPORT_LOCK = threading.RLock()
_FRAME_RE = re.compile(r'File "([^"]+)", line (\d+), in ([^\n]+)\n([^\n]*)')


@dataclasses.dataclass(frozen=True)
class ExportedStep:
    """One exported, decomposed model step and its graph signature, split by role.

    `user_outputs` and `buffers_to_mutate` index the flat tuple returned by the graph's output
    node. Buffers lifted to inputs appear in `buffers` under their own placeholder, so a lowering
    only needs the buffer values by name.
    """

    program: torch.export.ExportedProgram
    user_inputs: tuple[str, ...]
    parameters: Mapping[str, str]
    buffers: Mapping[str, str]
    constants: Mapping[str, Any]
    buffers_to_mutate: Mapping[int, str]
    user_outputs: tuple[int, ...]
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    dynamic_batch: bool
    batch_size: int | None
    mutated_buffers: tuple[str, ...]
    functions: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    state_values: Mapping[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    @property
    def graph(self) -> torch.fx.Graph:
        return self.program.graph

    def aten_targets(self) -> list[str]:
        """Sorted names of the call_function targets in the graph (for inspection and docs)."""
        return sorted({str(n.target) for n in self.graph.nodes if n.op == "call_function"})


def user_frame(stack_trace: str | None) -> str | None:
    """The last frame of `stack_trace` outside torch and this bridge, as 'file:line in fn: code'."""
    if not stack_trace:
        return None
    frames = _FRAME_RE.findall(stack_trace)
    user = [f for f in frames if not _is_library_file(f[0])]
    if not user:
        return None
    path, line, fn, code = user[-1]
    return f"{path}:{line} in {fn}: {code.strip()}"


def _is_library_file(path: str) -> bool:
    path = os.path.abspath(path)
    return path.startswith(_TORCH_DIR + os.sep) or path.startswith(_BRIDGE_DIR + os.sep)


def export_step(
    module: torch.nn.Module,
    example_inputs: Any,
    *,
    dynamic_batch: bool = True,
    batch_axes: Any = None,
) -> ExportedStep:
    """Export one step `module(*example_inputs)` as a decomposed ATen graph.

    `batch_axes` mirrors `example_inputs` with an int (the batch axis) or None per tensor; by
    default axis 0 of every tensor whose first dimension equals the first input's. With
    `dynamic_batch`, that axis is a shared `torch.export.Dim`; if torch cannot keep it dynamic
    the step is exported with static shapes and `dynamic_batch=False` is recorded.
    Conversions from several threads run one at a time.
    """
    with _EXPORT_LOCK:
        return _export_step(module, example_inputs, dynamic_batch, batch_axes)


def _export_step(module, example_inputs, dynamic_batch, batch_axes) -> ExportedStep:
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"export_step needs a torch.nn.Module, got {type(module).__name__}")
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    _refuse_module_structure(module)
    slot_states = discover_slots(module, lambda: _eager_call(module, args))
    axes = _batch_axes(args, batch_axes)
    batch = _batch_size(args, axes)
    lifted = tuple(slot_states)
    lift_axes = tuple(_state_axis(s.init, batch) for s in lifted)

    program, is_dynamic = None, False
    if dynamic_batch and batch is not None:
        try:
            program = _export(module, args, lifted, axes, lift_axes, batch)
            is_dynamic = True
        except Exception as err:
            if _is_data_dependent(err):
                raise _export_error(module, err) from err
            program = None
    if program is None:
        try:
            program = _export(module, args, lifted, None, None, batch)
        except ExportError:
            raise
        except Exception as err:
            raise _export_error(module, err) from err
    with_autograd = _custom_ops_with_autograd(program)
    try:
        # Functions inside decompositions (a custom op's reference implementation) are routed
        # too, so they keep their backward.
        with warnings.catch_warnings(), routed_functions():
            warnings.simplefilter("ignore")
            program = decompose(program)
    except Exception as err:
        raise ExportError(
            f"torch.export captured {type(module).__name__}, but decomposing it to core ATen "
            f"failed: {err}. Simplify the offending operation or open an issue with this message."
        ) from err
    _fold_fused_cell_biases(program.graph_module.graph)
    _refuse_graph(program, module)
    _refuse_lost_backward(with_autograd, program, module)
    _refuse_new_state(program, args, lifted, module)
    functions = capture_functions(program, export_step)
    step = _split_signature(program, args, lifted)
    return dataclasses.replace(
        step,
        dynamic_batch=is_dynamic and _has_symbolic_shape(program),
        batch_size=batch,
        functions=functions,
    )


_FUSED_CELLS = (aten._thnn_fused_gru_cell.default, aten._thnn_fused_lstm_cell.default)


def _fold_fused_cell_biases(graph: torch.fx.Graph) -> None:
    """Give CUDA's fused GRU/LSTM cells the graph CPU export gives them.

    On CUDA `nn.GRUCell`/`nn.LSTMCell` export as `mm(x, W.T)` + `_thnn_fused_*_cell(gates, ...,
    b_ih, b_hh)`, the biases added inside the kernel; on CPU as `linear(x, W, b)`. The online
    compiler traces a bias inside a matmul with the matmul (io-dim in ES-D-RTRL) and a separate
    bias with its own trace, so without this fold the same model would learn with different
    gradients on the two devices. Each bias moves into the bias-less matmul that computes its
    gates (rewritten as `linear(x, W, b)`) when that matmul feeds only the cell.
    """
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in _FUSED_CELLS:
            continue
        args = list(node.args) + [None] * (5 - len(node.args))
        for gates_at, bias_at in ((0, 3), (1, 4)):
            gates, bias = args[gates_at], args[bias_at]
            if not (isinstance(bias, torch.fx.Node) and bias.op == "placeholder"):
                continue
            operands = _biasless_linear(gates) if isinstance(gates, torch.fx.Node) else None
            if operands is not None:
                old = gates.args[1]
                gates.target = aten.linear.default
                gates.args = (*operands, bias)
                gates.kwargs = {}
                args[bias_at] = None
                if old is not operands[1] and not old.users:
                    graph.erase_node(old)  # the transpose `mm` took
        node.args = tuple(args)
    graph.lint()


def _biasless_linear(gates: torch.fx.Node) -> tuple | None:
    """`(x, W)` when `gates` is `linear(x, W)` or `mm(x, W.T)` used once, W a graph input."""
    if len(gates.users) != 1 or gates.kwargs:
        return None
    if gates.target == aten.linear.default:
        if len(gates.args) == 2 or gates.args[2] is None:
            return gates.args[0], gates.args[1]
        return None
    if gates.target != aten.mm.default:
        return None
    x, w_t = gates.args
    is_transpose = isinstance(w_t, torch.fx.Node) and (
        w_t.target == aten.t.default
        or (w_t.target == aten.permute.default and list(w_t.args[1]) == [1, 0])
    )
    if not is_transpose or w_t.args[0].op != "placeholder":
        return None
    return x, w_t.args[0]


def _custom_ops_with_autograd(program) -> dict:
    """Custom (non-ATen) op nodes with their own autograd formula: {op name: node}."""
    found = {}
    for node in program.graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        if target.namespace in ("aten", "prims", NAMESPACE):
            continue
        name = target.name()
        if any(
            torch._C._dispatch_has_kernel_for_dispatch_key(name, key)
            for key in ("Autograd", "AutogradCPU")
        ):
            found[f"{target.namespace}::{target._schema.name.split('::')[-1]}"] = node
    return found


def _refuse_lost_backward(with_autograd: dict, program, module) -> None:
    """A custom op with its own backward that torch decomposed: its backward is gone, unless the
    decomposition (its reference implementation) computes through routed Functions."""
    remaining = {
        f"{n.target.namespace}::{n.target._schema.name.split('::')[-1]}"
        for n in program.graph.nodes
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
    }
    lost = [name for name in with_autograd if name not in remaining]
    routed = any(
        routed_call(n.target) is not None for n in program.graph.nodes if n.op == "call_function"
    )
    if lost and not routed:
        raise UnsupportedModelError(
            f"{type(module).__name__}: the custom op(s) {', '.join(sorted(lost))} define their "
            "own backward, but torch.export decomposed them into plain ATen ops, which would "
            "give the converted step their forward with an autodiff gradient instead of that "
            "backward. Pass a JAX implementation with custom_ops={'namespace::name': jax_fn} "
            "(a jax.custom_vjp), or open an issue naming the op."
        )


def _refuse_new_state(program, args, lifted, module) -> None:
    """A slot the step reads but that did not exist before it: its start value is unknown."""
    unread = _unread_slots(program, args, lifted)
    bad = [s.slot for s in lifted if s.new and s.slot.name not in unread]
    if bad:
        listing = ", ".join(slot.describe() for slot in bad)
        raise UnsupportedModelError(
            f"{type(module).__name__}: the step reads {listing} before writing it, but the "
            "attribute does not exist until the first step runs, so its start value is "
            "unknown. Create it in __init__ (e.g. self.register_buffer(name, torch.zeros(0)) "
            "or an initial tensor), or pass it as a forward argument."
        )


def _unread_slots(program, args, lifted) -> set[str]:
    """Lifted slots whose incoming value the step never reads: not state (see state_slots)."""
    users = [
        spec.arg.name
        for spec in program.graph_signature.input_specs
        if spec.kind == InputKind.USER_INPUT
    ]
    n_model = len(pytree.tree_leaves(args))
    nodes = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    return {s.slot.name for s, ph in zip(lifted, users[n_model:]) if not nodes[ph].users}


# ----------------------------------------------------------------------------- refusals


def _refuse_module_structure(module: torch.nn.Module) -> None:
    """Refuse module configurations whose one-step export would be wrong (before exporting)."""
    for name, sub in module.named_modules():
        where = f"`{name}` ({type(sub).__name__})" if name else type(sub).__name__
        if isinstance(sub, torch.nn.RNNBase):
            if sub.bidirectional:
                raise UnsupportedModelError(
                    f"{where} is bidirectional: its backward direction reads future inputs, so it "
                    "cannot run one step at a time. Use bidirectional=False for online learning."
                )
            if sub.training and sub.dropout > 0 and sub.num_layers > 1:
                raise UnsupportedModelError(
                    f"{where} has dropout={sub.dropout} between layers in train mode, which "
                    "torch's exported RNN decomposition silently ignores. Set dropout=0, or call "
                    ".eval() "
                    "before converting."
                )
        if isinstance(sub, torch.nn.modules.batchnorm._BatchNorm) and sub.training:
            raise _batch_norm_error(where)
        if isinstance(sub, torch.nn.modules.dropout._DropoutNd) and sub.training and sub.p > 0:
            raise UnsupportedModelError(
                f"{where} with p={sub.p} is in train mode: a random mask cannot be reproduced by "
                "the JAX step. Call .eval() on the model (or the dropout module) before "
                "converting, or set p=0."
            )


def _batch_norm_error(where: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{where} is batch normalisation in train mode: it normalises each step with the "
        "statistics of the current batch and updates its running statistics, which a one-step "
        "online graph cannot reproduce. Call .eval() on the model (or the BatchNorm module) "
        "before converting, so it uses its running statistics."
    )


def _eager_call(module: torch.nn.Module, args: tuple) -> Any:
    """forward on the example inputs (with grad, as the model will be trained)."""

    def grad_arg(x):
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            return x.detach().clone().requires_grad_(True).clone()
        return x.detach().clone() if isinstance(x, torch.Tensor) else x

    with torch.random.fork_rng(devices=[]):
        try:
            with torch.enable_grad():
                return module(*pytree.tree_map(grad_arg, args))
        except UnsupportedModelError:
            raise
        except Exception:
            pass
        try:
            with torch.no_grad():
                return module(
                    *pytree.tree_map(
                        lambda x: x.clone() if isinstance(x, torch.Tensor) else x, args
                    )
                )
        except Exception as err:
            raise ExportError(
                f"{type(module).__name__} failed when run eagerly on the example inputs: "
                f"{type(err).__name__}: {err}. Check the example inputs' shapes and dtypes "
                "(one time step, batch first) before converting."
            ) from err


_TRAIN_BATCH_NORM = (
    torch.ops.aten._native_batch_norm_legit_functional.default,
    torch.ops.aten._native_batch_norm_legit.default,
    torch.ops.aten._native_batch_norm_legit.no_stats,
)


def _refuse_graph(program: torch.export.ExportedProgram, module: torch.nn.Module) -> None:
    """Refuse graph-level problems that module inspection cannot see (functional dropout)."""
    for node in program.graph.nodes:
        if node.op == "call_function" and node.target in _TRAIN_BATCH_NORM:
            where = user_frame(node.meta.get("stack_trace")) or type(module).__name__
            raise _batch_norm_error(f"`{where}`")
        if node.op == "call_function" and node.target is torch.ops.aten.native_dropout.default:
            train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train")
            if train is None or train:
                where = user_frame(node.meta.get("stack_trace")) or type(module).__name__
                raise UnsupportedModelError(
                    f"dropout in train mode at {where}: a random mask cannot be reproduced by "
                    "the JAX step. Call .eval() on the model (or pass training=False) before "
                    "converting."
                )


def _is_data_dependent(err: Exception) -> bool:
    return type(err).__name__ == "GuardOnDataDependentSymNode" or "data-dependent" in str(err)


def _export_error(module: torch.nn.Module, err: Exception) -> ExportError:
    text = str(err)
    name = type(module).__name__
    if _is_data_dependent(err):
        problem = (
            f"{name}.forward branches in Python on a tensor's value (data-dependent "
            "control flow), which torch.export cannot trace"
        )
        fix = (
            "replace the branch by tensor operations (torch.where, masks, clamp) or "
            "torch.cond, or move the decision out of forward"
        )
    elif "mutated in the forward" in text and "Constant" in text:
        problem = (
            f"{name}.forward mutates a plain tensor attribute, which export treats as a constant"
        )
        fix = "register it with self.register_buffer(name, tensor) in __init__"
    else:
        problem = f"torch.export could not trace one step of {name}"
        fix = (
            "keep forward to tensor operations on its inputs, parameters and buffers (no "
            "Python branching on tensor values, no .item()/.tolist(), no unsupported "
            "Python-side state), or open an issue with this message"
        )
    lines = [text.strip().splitlines()[0]] if text.strip() else []
    lines += [
        f"{path}:{line} in {fn}: {code.strip()}"
        for path, line, fn, code in _FRAME_RE.findall(text)
        if not _is_library_file(path)
    ][-1:]
    return ExportError(
        f"{problem}; fix: {fix}. Original error: {type(err).__name__}: " + " | ".join(lines)
    )


# ----------------------------------------------------------------------------- export


class _LiftedSlots(torch.nn.Module):
    """Wraps a module so the listed state slots are explicit inputs and their new values outputs.

    The module's own objects are put back after the call (attributes it created are removed).
    """

    def __init__(self, inner: torch.nn.Module, slots: Sequence[Slot]):
        super().__init__()
        self.inner = inner
        self.slots = tuple(slots)

    def forward(self, inputs, states):
        originals = [slot.get(self.inner, None) for slot in self.slots]
        present = [slot.get(self.inner, ABSENT) is not ABSENT for slot in self.slots]
        try:
            for slot, value in zip(self.slots, states):
                slot.set(self.inner, value)
            out = self.inner(*inputs)
            new = [slot.get(self.inner) for slot in self.slots]
            new = [n.clone() if n is v else n for n, v in zip(new, states)]
        finally:
            for slot, original, was in zip(self.slots, originals, present):
                slot.set(self.inner, original if was else ABSENT)
        return out, new


def _batch_axes(args: tuple, batch_axes: Any) -> Any:
    if batch_axes is not None:
        return tuple(batch_axes)
    leaves = [x for x in pytree.tree_leaves(args) if isinstance(x, torch.Tensor)]
    if not leaves or leaves[0].ndim == 0:
        return pytree.tree_map(lambda x: None, args)
    size = leaves[0].shape[0]
    return pytree.tree_map(
        lambda x: 0 if isinstance(x, torch.Tensor) and x.ndim >= 1 and x.shape[0] == size else None,
        args,
    )


def _batch_size(args: tuple, axes: Any) -> int | None:
    sizes = {
        x.shape[a]
        for x, a in zip(
            pytree.tree_leaves(args), pytree.tree_leaves(axes, is_leaf=lambda v: v is None)
        )
        if isinstance(x, torch.Tensor) and a is not None
    }
    if len(sizes) > 1:
        raise ValueError(f"example inputs disagree on the batch size: {sorted(sizes)}")
    return sizes.pop() if sizes else None


def _state_axis(buf: torch.Tensor, batch: int | None) -> int | None:
    return 0 if batch is not None and buf.ndim >= 1 and buf.shape[0] == batch else None


def _export(module, args, lifted, axes, lift_axes, batch) -> torch.export.ExportedProgram:
    """One torch.export call; dynamic on the batch axes when `axes` is given."""
    target = _LiftedSlots(module, [s.slot for s in lifted]) if lifted else module
    # Fresh tensors: export merges inputs that alias each other (LSTM (h, h) would read h twice).
    args = pytree.tree_map(lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x, args)
    states = [s.init.detach().clone() for s in lifted]
    call_args = (args, states) if lifted else args
    dynamic = None
    if axes is not None:
        if batch == 1:
            args = pytree.tree_map(_widen, args, axes, is_leaf=lambda v: v is None)
            states = [_widen(s, a) for s, a in zip(states, lift_axes)]
            call_args = (args, states) if lifted else args
        dim = torch.export.Dim("batch")
        shape = lambda a: None if a is None else {a: dim}
        in_dyn = pytree.tree_map(shape, axes, is_leaf=lambda v: v is None)
        dynamic = (in_dyn, [shape(a) for a in lift_axes]) if lifted else in_dyn
    # torch prints the partial graph of a failed export to stderr; the error we raise carries it.
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), routed_functions():
        warnings.simplefilter("ignore")
        return torch.export.export(target, tuple(call_args), dynamic_shapes=dynamic)


def _widen(x, axis):
    """Batch 1 is specialised by torch.export; export with two copies so it stays dynamic."""
    if isinstance(x, torch.Tensor) and axis is not None:
        return torch.cat([x, x], dim=axis)
    return x


def _split_signature(program, args, lifted) -> ExportedStep:
    sig = program.graph_signature
    strip = (
        (lambda n: n[len(_LIFT_PREFIX) :] if n.startswith(_LIFT_PREFIX) else n)
        if lifted
        else (lambda n: n)
    )
    users, params, buffers, constants = [], {}, {}, {}
    for spec in sig.input_specs:
        name = spec.arg.name
        if spec.kind == InputKind.USER_INPUT:
            users.append(name)
        elif spec.kind == InputKind.PARAMETER:
            params[name] = strip(spec.target)
        elif spec.kind == InputKind.BUFFER:
            buffers[name] = strip(spec.target)
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            constants[name] = program.constants[spec.target]
        else:
            raise ExportError(
                f"unsupported graph input kind {spec.kind} for `{spec.target}`; "
                "open an issue with this model"
            )
    n_model = len(pytree.tree_leaves(args))
    unread = _unread_slots(program, args, lifted)
    if lifted:
        for placeholder, slot in zip(users[n_model:], lifted):
            if slot.slot.name in unread:
                constants[placeholder] = slot.init
            else:
                buffers[placeholder] = slot.slot.name
        users = users[:n_model]

    outputs, mutations = [], {}
    for i, spec in enumerate(sig.output_specs):
        if spec.kind == OutputKind.USER_OUTPUT:
            outputs.append(i)
        elif spec.kind == OutputKind.BUFFER_MUTATION:
            mutations[i] = strip(spec.target)
        elif spec.kind != OutputKind.USER_INPUT_MUTATION:
            raise ExportError(f"unsupported graph output kind {spec.kind}; open an issue")
    out_spec = program.call_spec.out_spec
    in_spec = pytree.tree_structure(args)
    if lifted:
        n_state = len(lifted)
        for pos, slot in zip(outputs[len(outputs) - n_state :], lifted):
            if slot.slot.name not in unread:
                mutations[pos] = slot.slot.name
        outputs = outputs[: len(outputs) - n_state]
        out_spec = out_spec.child(0)
    return ExportedStep(
        program=program,
        user_inputs=tuple(users),
        parameters=params,
        buffers=buffers,
        constants=constants,
        buffers_to_mutate=mutations,
        user_outputs=tuple(outputs),
        in_spec=in_spec,
        out_spec=out_spec,
        dynamic_batch=False,
        batch_size=None,
        mutated_buffers=tuple(dict.fromkeys(mutations.values())),
        state_values={s.slot.name: s.init for s in lifted if s.slot.name not in unread},
    )


def _has_symbolic_shape(program) -> bool:
    for node in program.graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(val, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in val.shape):
            return True
    return False
