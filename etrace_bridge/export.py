"""Export ONE time step of a torch model with `torch.export` and split its signature.

The step is decomposed with the core-ATen table minus `aten.linear` / `aten.convolution`, so every
parameter reaches the graph as a direct argument of those two ops (the lowering routes them to
ETP ops). Buffers the step mutates (SNN-style state) are lifted to explicit graph inputs/outputs so
their batch dimension can be dynamic like the other states.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import threading
import warnings
from typing import Any, Mapping, Sequence

import torch
import torch.utils._pytree as pytree
from torch.export.graph_signature import InputKind, OutputKind

from etrace_bridge.errors import ExportError, UnsupportedModelError

__all__ = ["ExportedStep", "export_step", "decomposition_table", "user_frame"]

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

    @property
    def graph(self) -> torch.fx.Graph:
        return self.program.graph

    def aten_targets(self) -> list[str]:
        """Sorted names of the call_function targets in the graph (for inspection and docs)."""
        return sorted({str(n.target) for n in self.graph.nodes if n.op == "call_function"})


def decomposition_table() -> dict:
    """Default core-ATen decompositions, keeping `aten.linear` and `aten.convolution` whole."""
    table = torch.export.default_decompositions()
    for op in (torch.ops.aten.linear.default, torch.ops.aten.convolution.default):
        table.pop(op, None)
    return table


def user_frame(stack_trace: str | None) -> str | None:
    """The last frame of `stack_trace` outside torch and this bridge, as 'file:line in fn: code'."""
    if not stack_trace:
        return None
    frames = _FRAME_RE.findall(stack_trace)
    user = [f for f in frames if not _is_library_file(f[0])]
    if not user:
        return None
    path, line, fn, code = user[-1]
    return f'{path}:{line} in {fn}: {code.strip()}'


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
    mutated = _trial_run(module, args)
    axes = _batch_axes(args, batch_axes)
    batch = _batch_size(args, axes)
    lifted = tuple(mutated)
    lift_axes = tuple(_state_axis(module.get_buffer(name), batch) for name in lifted)

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
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = program.run_decompositions(decomposition_table())
    except Exception as err:
        raise ExportError(
            f"torch.export captured {type(module).__name__}, but decomposing it to core ATen "
            f"failed: {err}. Simplify the offending operation or open an issue with this message."
        ) from err
    _refuse_graph(program, module)
    step = _split_signature(program, args, lifted)
    return dataclasses.replace(
        step, dynamic_batch=is_dynamic and _has_symbolic_shape(program), batch_size=batch)


# ----------------------------------------------------------------------------- refusals


def _refuse_module_structure(module: torch.nn.Module) -> None:
    """Refuse module configurations whose one-step export would be wrong (before exporting)."""
    for name, sub in module.named_modules():
        where = f"`{name}` ({type(sub).__name__})" if name else type(sub).__name__
        if isinstance(sub, torch.nn.RNNBase):
            if sub.bidirectional:
                raise UnsupportedModelError(
                    f"{where} is bidirectional: its backward direction reads future inputs, so it "
                    "cannot run one step at a time. Use bidirectional=False for online learning.")
            if sub.training and sub.dropout > 0 and sub.num_layers > 1:
                raise UnsupportedModelError(
                    f"{where} has dropout={sub.dropout} between layers in train mode, which "
                    "torch's exported RNN decomposition silently ignores. Set dropout=0, or call .eval() "
                    "before converting.")
        if isinstance(sub, torch.nn.modules.batchnorm._BatchNorm) and sub.training:
            raise _batch_norm_error(where)
        if isinstance(sub, torch.nn.modules.dropout._DropoutNd) and sub.training and sub.p > 0:
            raise UnsupportedModelError(
                f"{where} with p={sub.p} is in train mode: a random mask cannot be reproduced by "
                "the JAX step. Call .eval() on the model (or the dropout module) before "
                "converting, or set p=0.")
        _refuse_autograd_function_names(sub, where)


def _batch_norm_error(where: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{where} is batch normalisation in train mode: it normalises each step with the "
        "statistics of the current batch and updates its running statistics, which a one-step "
        "online graph cannot reproduce. Call .eval() on the model (or the BatchNorm module) "
        "before converting, so it uses its running statistics.")


def _refuse_autograd_function_names(sub: torch.nn.Module, where: str) -> None:
    """Find `SomeFunction.apply` used directly in a forward (also catches no-grad paths)."""
    forward = getattr(type(sub), "forward", None)
    code = getattr(forward, "__code__", None)
    if code is None or "apply" not in code.co_names:
        return
    scope = getattr(forward, "__globals__", {})
    for name in code.co_names:
        obj = scope.get(name)
        if _is_user_autograd_function(obj):
            raise _autograd_function_error(obj, where)


def _is_user_autograd_function(obj: Any) -> bool:
    return (isinstance(obj, type) and issubclass(obj, torch.autograd.Function)
            and not obj.__module__.startswith("torch"))


def _autograd_function_error(cls: type, where: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{where} calls the torch.autograd.Function `{cls.__module__}.{cls.__qualname__}`. "
        "torch.export keeps its forward and drops its backward, so the JAX step would get the "
        "wrong gradient (for a surrogate spike: zero). Rewrite it with "
        "`@torch.library.custom_op` plus `register_fake` and `register_autograd`, and pass its "
        "JAX twin (a jax.custom_vjp function) as `custom_ops={'namespace::name': jax_fn}`.")


def _plain_attribute_error(owner: str, cls: str, attr: str) -> UnsupportedModelError:
    dotted = f"{owner}.{attr}" if owner else attr
    return UnsupportedModelError(
        f"`{dotted}` ({cls}) is a plain tensor attribute assigned or modified in forward. "
        "torch.export turns it into a constant, so its update would be silently lost. Register "
        f"it with `self.register_buffer('{attr}', tensor)` in __init__ so it becomes state.")


def _trial_run(module: torch.nn.Module, args: tuple) -> list[str]:
    """Run forward once eagerly on private copies of the buffers; return the mutated buffers.

    The same run refuses plain tensor attributes that forward assigns and user
    `torch.autograd.Function`s found in the autograd graph. The user's tensors and RNG are
    untouched.
    """
    swapped_buffers, swapped_attrs = [], []
    for owner, sub in module.named_modules():
        for attr, buf in list(sub._buffers.items()):
            if buf is not None:
                copy = buf.detach().clone()
                swapped_buffers.append((owner, sub, attr, buf, copy, copy._version))
                sub._buffers[attr] = copy
        for attr, val in list(vars(sub).items()):
            if isinstance(val, torch.Tensor):
                copy = val.detach().clone()
                swapped_attrs.append((owner, sub, attr, val, copy, copy._version))
                sub.__dict__[attr] = copy
    before_attrs = {(id(sub), a) for _, sub, a, *_ in swapped_attrs}
    try:
        outputs = _eager_call(module, args)
        for owner, sub, attr, _, copy, version in swapped_attrs:
            now = sub.__dict__.get(attr)
            if now is not copy or copy._version != version:
                raise _plain_attribute_error(owner, type(sub).__name__, attr)
        for owner, sub in module.named_modules():
            for attr, val in vars(sub).items():
                if isinstance(val, torch.Tensor) and (id(sub), attr) not in before_attrs:
                    raise _plain_attribute_error(owner, type(sub).__name__, attr)
        mutated, roots = [], list(pytree.tree_leaves(outputs))
        for owner, sub, attr, _, copy, version in swapped_buffers:
            now = sub._buffers.get(attr)
            if now is not copy or copy._version != version:
                mutated.append(f"{owner}.{attr}" if owner else attr)
                roots.append(now)
        _refuse_autograd_functions(roots, module)
        return mutated
    finally:
        for _, sub, attr, original, *_ in swapped_buffers:
            sub._buffers[attr] = original
        for _, sub, attr, original, *_ in swapped_attrs:
            sub.__dict__[attr] = original


def _eager_call(module: torch.nn.Module, args: tuple) -> Any:
    """forward on the example inputs with grad enabled (to see autograd Functions)."""
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
                return module(*pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor)
                                               else x, args))
        except Exception as err:
            raise ExportError(
                f"{type(module).__name__} failed when run eagerly on the example inputs: "
                f"{type(err).__name__}: {err}. Check the example inputs' shapes and dtypes "
                "(one time step, batch first) before converting.") from err


def _refuse_autograd_functions(roots: Sequence[Any], module: torch.nn.Module) -> None:
    """Walk the autograd graph of the trial outputs for user `torch.autograd.Function` nodes."""
    seen, stack = set(), [t.grad_fn for t in roots
                          if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            cls = getattr(node, "_forward_cls", None)
            if _is_user_autograd_function(cls):
                raise _autograd_function_error(cls, type(module).__name__)
        stack.extend(fn for fn, _ in getattr(node, "next_functions", ()))


_TRAIN_BATCH_NORM = (torch.ops.aten._native_batch_norm_legit_functional.default,
                     torch.ops.aten._native_batch_norm_legit.default,
                     torch.ops.aten._native_batch_norm_legit.no_stats)


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
                    "converting.")


def _is_data_dependent(err: Exception) -> bool:
    return type(err).__name__ == "GuardOnDataDependentSymNode" or "data-dependent" in str(err)


def _export_error(module: torch.nn.Module, err: Exception) -> ExportError:
    text = str(err)
    name = type(module).__name__
    if _is_data_dependent(err):
        problem = (f"{name}.forward branches in Python on a tensor's value (data-dependent "
                   "control flow), which torch.export cannot trace")
        fix = ("replace the branch by tensor operations (torch.where, masks, clamp) or "
               "torch.cond, or move the decision out of forward")
    elif "mutated in the forward" in text and "Constant" in text:
        problem = (f"{name}.forward mutates a plain tensor attribute, which export treats as a "
                   "constant")
        fix = "register it with self.register_buffer(name, tensor) in __init__"
    else:
        problem = f"torch.export could not trace one step of {name}"
        fix = ("keep forward to tensor operations on its inputs, parameters and buffers (no "
               "Python branching on tensor values, no .item()/.tolist(), no unsupported "
               "Python-side state), or open an issue with this message")
    lines = [text.strip().splitlines()[0]] if text.strip() else []
    lines += [f"{path}:{line} in {fn}: {code.strip()}" for path, line, fn, code
              in _FRAME_RE.findall(text) if not _is_library_file(path)][-1:]
    return ExportError(f"{problem}; fix: {fix}. Original error: {type(err).__name__}: "
                       + " | ".join(lines))


# ----------------------------------------------------------------------------- export


class _LiftedBuffers(torch.nn.Module):
    """Wraps a module so the listed buffers are explicit inputs and their new values outputs."""

    def __init__(self, inner: torch.nn.Module, names: Sequence[str]):
        super().__init__()
        self.inner = inner
        self.names = tuple(names)

    def forward(self, inputs, states):
        slots = []
        for name, value in zip(self.names, states):
            owner, _, attr = name.rpartition(".")
            sub = self.inner.get_submodule(owner)
            slots.append((sub, attr, sub._buffers[attr]))
            sub._buffers[attr] = value
        try:
            out = self.inner(*inputs)
            new = [sub._buffers[attr] for sub, attr, _ in slots]
            new = [n.clone() if n is v else n for n, v in zip(new, states)]
        finally:
            for sub, attr, original in slots:
                sub._buffers[attr] = original
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
        args)


def _batch_size(args: tuple, axes: Any) -> int | None:
    sizes = {x.shape[a] for x, a in zip(pytree.tree_leaves(args), pytree.tree_leaves(
        axes, is_leaf=lambda v: v is None)) if isinstance(x, torch.Tensor) and a is not None}
    if len(sizes) > 1:
        raise ValueError(f"example inputs disagree on the batch size: {sorted(sizes)}")
    return sizes.pop() if sizes else None


def _state_axis(buf: torch.Tensor, batch: int | None) -> int | None:
    return 0 if batch is not None and buf.ndim >= 1 and buf.shape[0] == batch else None


def _export(module, args, lifted, axes, lift_axes, batch) -> torch.export.ExportedProgram:
    """One torch.export call; dynamic on the batch axes when `axes` is given."""
    target = _LiftedBuffers(module, lifted) if lifted else module
    # Fresh tensors: export merges inputs that alias each other (LSTM (h, h) would read h twice).
    args = pytree.tree_map(lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x, args)
    states = [module.get_buffer(n).detach().clone() for n in lifted]
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
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        return torch.export.export(target, tuple(call_args), dynamic_shapes=dynamic)


def _widen(x, axis):
    """Batch 1 is specialised by torch.export; export with two copies so it stays dynamic."""
    if isinstance(x, torch.Tensor) and axis is not None:
        return torch.cat([x, x], dim=axis)
    return x


def _split_signature(program, args, lifted) -> ExportedStep:
    sig = program.graph_signature
    strip = (lambda n: n[len(_LIFT_PREFIX):] if n.startswith(_LIFT_PREFIX) else n) if lifted \
        else (lambda n: n)
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
            raise ExportError(f"unsupported graph input kind {spec.kind} for `{spec.target}`; "
                              "open an issue with this model")
    n_model = len(pytree.tree_leaves(args))
    if lifted:
        for placeholder, buffer_name in zip(users[n_model:], lifted):
            buffers[placeholder] = buffer_name
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
        for pos, name in zip(outputs[len(outputs) - n_state:], lifted):
            mutations[pos] = name
        outputs = outputs[:len(outputs) - n_state]
        out_spec = out_spec.child(0)
    return ExportedStep(
        program=program, user_inputs=tuple(users), parameters=params, buffers=buffers,
        constants=constants, buffers_to_mutate=mutations, user_outputs=tuple(outputs),
        in_spec=in_spec, out_spec=out_spec, dynamic_batch=False, batch_size=None,
        mutated_buffers=tuple(dict.fromkeys(list(lifted) + list(mutations.values()))))


def _has_symbolic_shape(program) -> bool:
    for node in program.graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(val, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in val.shape):
            return True
    return False
