"""User `torch.autograd.Function`s in an exported step, kept with their own backward.

torch.export traces a Function's forward and drops its backward (a surrogate spike would get a
zero gradient). While a step is exported, `routed_functions()` makes every user Function call
a call of a `torch.library` op (namespace `etrace_fn`), so the exported graph keeps it as one
node. `capture_functions(program, export_fn)` then captures, for each such node, the Function's
`forward` and `backward` as graphs of their own (for the node's shapes, batch dynamic where
torch allows) — `etrace_bridge.lowering` joins the two as a `jax.custom_vjp`.

Supported: `forward(ctx, ...)` and `forward(...)` + `setup_context`, `ctx.save_for_backward`,
tensors and other values kept as `ctx` attributes (a slope, an alpha), several inputs and
outputs, `ctx.needs_input_grad`, `None` gradients, non-tensor arguments (constants of the call).
Refused, by name: Functions returning non-tensors, marking inputs dirty (in place), or whose
forward/backward torch.export cannot trace.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import re
import threading
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

from etrace_bridge.errors import UnsupportedModelError

__all__ = [
    "FunctionCall",
    "CapturedFunction",
    "routed_functions",
    "capture_functions",
    "is_user_function",
    "NAMESPACE",
]

NAMESPACE = "etrace_fn"
_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")
_COUNTER = itertools.count()
_LOCK = threading.Lock()
# One op per (Function class, constant arguments, tensor positions, outputs): keyed by the class
# object itself (weakly), so a class that is garbage collected drops its entries.
_OPS_BY_CLASS: weakref.WeakKeyDictionary[type, dict] = weakref.WeakKeyDictionary()
_CALLS_BY_NAME: weakref.WeakValueDictionary[str, FunctionCall] = weakref.WeakValueDictionary()


def is_user_function(obj: Any) -> bool:
    """A `torch.autograd.Function` subclass defined outside torch."""
    return (
        isinstance(obj, type)
        and issubclass(obj, torch.autograd.Function)
        and not obj.__module__.startswith("torch")
    )


def function_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclasses.dataclass(eq=False)
class FunctionCall:
    """One routed call signature of a Function: which arguments are tensors, the constants."""

    cls: type
    op_name: str
    n_args: int
    tensor_pos: tuple[int, ...]
    constants: tuple  # (position, value) for the non-tensor arguments
    tuple_out: bool
    n_out: int

    def full_args(self, tensors) -> list:
        args = [None] * self.n_args
        for pos, value in self.constants:
            args[pos] = value
        for pos, t in zip(self.tensor_pos, tensors):
            args[pos] = t
        return args

    @property
    def qualified(self) -> str:
        return f"{NAMESPACE}::{self.op_name}"

    @property
    def name(self) -> str:
        return function_name(self.cls)


def _new_style(cls: type) -> bool:
    base = torch.autograd.function._SingleLevelFunction.setup_context
    return getattr(cls.setup_context, "__func__", cls.setup_context) is not getattr(
        base, "__func__", base
    )


class _ForwardCtx:
    """The `ctx` a Function's forward sees while it is captured."""

    def __init__(self, needs_input_grad: tuple[bool, ...]):
        object.__setattr__(self, "_saved", None)
        object.__setattr__(self, "_dirty", False)
        self.needs_input_grad = needs_input_grad
        self.materialize_grads = True

    def save_for_backward(self, *tensors):
        object.__setattr__(self, "_saved", tuple(tensors))

    save_for_forward = save_for_backward

    def mark_dirty(self, *tensors):
        object.__setattr__(self, "_dirty", True)

    def mark_non_differentiable(self, *tensors):
        pass

    def set_materialize_grads(self, value: bool):
        self.materialize_grads = value


class _BackwardCtx:
    """The `ctx` a Function's backward sees: saved tensors and the recorded attributes."""

    def __init__(self, saved, attrs: Mapping[str, Any]):
        self.__dict__.update(attrs)
        self.saved_tensors = saved
        self.saved_variables = saved

    def mark_non_differentiable(self, *tensors):
        pass


def _schema(op_name: str, n_tensors: int, n_out: int, tuple_out: bool) -> str:
    args = ", ".join(f"Tensor a{i}" for i in range(n_tensors))
    ret = "(" + ", ".join(["Tensor"] * n_out) + ")" if tuple_out else "Tensor"
    return f"{op_name}({args}) -> {ret}"


def _call_outputs(cls: type, args: list):
    """Run the Function eagerly without autograd (the op's implementation)."""
    with torch.no_grad():
        out = _ORIGINAL_APPLY.__func__(cls, *args)
    return out


def _as_op_output(out, call: FunctionCall):
    outs = tuple(out) if call.tuple_out else (out,)
    outs = tuple(o.clone() for o in outs)  # a custom op may not return its inputs
    return outs if call.tuple_out else outs[0]


def _register(cls: type, args: tuple, outputs) -> FunctionCall:
    tensor_pos = tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor))
    constants = tuple((i, a) for i, a in enumerate(args) if not isinstance(a, torch.Tensor))
    tuple_out = isinstance(outputs, (tuple, list))
    outs = tuple(outputs) if tuple_out else (outputs,)
    bad = [type(o).__name__ for o in outs if not isinstance(o, torch.Tensor)]
    if bad:
        raise UnsupportedModelError(
            f"the torch.autograd.Function `{function_name(cls)}` returns non-tensor values "
            f"({', '.join(bad)}); the bridge converts Functions whose outputs are tensors. "
            "Return tensors only (keep other values on ctx)."
        )
    key = (tensor_pos, _constant_key(constants), tuple_out, len(outs))
    with _LOCK:
        table = _OPS_BY_CLASS.setdefault(cls, {})
        call = table.get(key)
        if call is not None:
            return call
        op_name = re.sub(r"\W", "_", cls.__qualname__) + f"_{next(_COUNTER)}"
        call = FunctionCall(cls, op_name, len(args), tensor_pos, constants, tuple_out, len(outs))
        _LIB.define(_schema(op_name, len(tensor_pos), len(outs), tuple_out))

        def impl(*tensors, _call=call):
            return _as_op_output(_call_outputs(_call.cls, _call.full_args(tensors)), _call)

        def fake(*tensors, _call=call):
            return _as_op_output(_call_outputs(_call.cls, _call.full_args(tensors)), _call)

        _LIB.impl(op_name, impl, "CompositeExplicitAutograd")
        torch.library.register_fake(call.qualified, fake, lib=_LIB)
        table[key] = call
        _CALLS_BY_NAME[op_name] = call
        return call


def _constant_key(constants: tuple) -> tuple:
    key = []
    for pos, value in constants:
        try:
            hash(value)
            key.append((pos, type(value), value))
        except TypeError:
            key.append((pos, type(value), id(value)))
    return tuple(key)


_ORIGINAL_APPLY = torch.autograd.Function.__dict__["apply"]
_ROUTING = threading.local()


def _routed_apply(cls, *args, **kwargs):
    if kwargs or not is_user_function(cls) or not getattr(_ROUTING, "active", False):
        return _ORIGINAL_APPLY.__func__(cls, *args, **kwargs)
    try:
        with disable_proxy_modes_tracing():
            shapes = _call_outputs(cls, list(args))
    except Exception as err:
        raise UnsupportedModelError(
            f"the torch.autograd.Function `{function_name(cls)}` cannot be converted with its "
            f"backward: its forward cannot be traced ({_first_line(err)}). Write it with "
            "tensor operations only (no .item()/float() of tensors, no Python branches on "
            "tensor values)."
        ) from None
    call = _register(cls, args, shapes)
    op = getattr(getattr(torch.ops, NAMESPACE), call.op_name).default
    out = op(*[args[i] for i in call.tensor_pos])
    return tuple(out) if call.tuple_out else out


@contextlib.contextmanager
def routed_functions():
    """While active, user `torch.autograd.Function.apply` calls become `etrace_fn` ops."""
    previous = getattr(_ROUTING, "active", False)
    _ROUTING.active = True
    patched = torch.autograd.Function.__dict__["apply"] is _ORIGINAL_APPLY
    if patched:
        torch.autograd.Function.apply = classmethod(_routed_apply)
    try:
        yield
    finally:
        _ROUTING.active = previous
        if patched:
            torch.autograd.Function.apply = _ORIGINAL_APPLY


def routed_call(target) -> FunctionCall | None:
    """The FunctionCall behind an `etrace_fn` graph target, or None for other targets."""
    if not isinstance(target, torch._ops.OpOverload) or target.namespace != NAMESPACE:
        return None
    return _CALLS_BY_NAME.get(target._schema.name.split("::", 1)[1])


# ----------------------------------------------------------------------------- capture


@dataclasses.dataclass(frozen=True, eq=False)
class CapturedFunction:
    """A Function's forward and backward as exported steps, and how to join them.

    forward step: `(tensor args,) -> (outputs, saved tensors, tensor ctx attributes)`;
    backward step: `((*saved, *tensor attributes, *grad outputs),) -> grads` for `grad_pos`
    (indices into the tensor arguments; the others get no gradient).
    """

    call: FunctionCall
    forward: Any
    backward: Any
    n_saved: int
    n_attrs: int
    grad_pos: tuple[int, ...]


class _ForwardGraph(torch.nn.Module):
    def __init__(self, call: FunctionCall, needs: tuple[bool, ...]):
        super().__init__()
        self.call, self.needs = call, needs
        self.record: dict = {}

    def forward(self, tensors):
        call = self.call
        ctx = _ForwardCtx(self.needs)
        args = call.full_args(tensors)
        if _new_style(call.cls):
            out = call.cls.forward(*args)
            call.cls.setup_context(ctx, tuple(args), out)
        else:
            out = call.cls.forward(ctx, *args)
        if ctx._dirty:
            raise _Refusal("it marks inputs dirty (modifies them in place)")
        outs = tuple(out) if call.tuple_out else (out,)
        saved = ctx._saved or ()
        saved_slots = [isinstance(s, torch.Tensor) for s in saved]
        attrs = {k: v for k, v in vars(ctx).items() if not k.startswith("_")}
        tensor_attrs = {k: v for k, v in attrs.items() if isinstance(v, torch.Tensor)}
        self.record = dict(
            saved_slots=saved_slots,
            tensor_attrs=list(tensor_attrs),
            attrs={k: v for k, v in attrs.items() if k not in tensor_attrs},
        )
        # fresh tensors: an output that is also an input would be merged away by export
        fresh = lambda t: t.clone() if any(t is a for a in tensors) else t
        return (
            tuple(fresh(o) for o in outs),
            tuple(fresh(s) for s in saved if isinstance(s, torch.Tensor)),
            tuple(fresh(v) for v in tensor_attrs.values()),
        )


class _BackwardGraph(torch.nn.Module):
    def __init__(self, call: FunctionCall, record: dict, n_saved: int, n_attrs: int):
        super().__init__()
        self.call, self.record, self.n_saved, self.n_attrs = call, record, n_saved, n_attrs
        self.grad_pos: tuple[int, ...] = ()

    def forward(self, flat):
        saved_iter = iter(flat[: self.n_saved])
        attrs_t = flat[self.n_saved : self.n_saved + self.n_attrs]
        grads_out = flat[self.n_saved + self.n_attrs :]
        saved = tuple(next(saved_iter) if is_t else None for is_t in self.record["saved_slots"])
        attrs = dict(self.record["attrs"])
        attrs.update(zip(self.record["tensor_attrs"], attrs_t))
        ctx = _BackwardCtx(saved, attrs)
        grads = self.call.cls.backward(ctx, *grads_out)
        grads = tuple(grads) if isinstance(grads, (tuple, list)) else (grads,)
        if len(grads) < self.call.n_args:
            grads = grads + (None,) * (self.call.n_args - len(grads))
        per_tensor = [grads[p] for p in self.call.tensor_pos]
        self.grad_pos = tuple(i for i, g in enumerate(per_tensor) if isinstance(g, torch.Tensor))
        return tuple(per_tensor[i] for i in self.grad_pos)


class _Refusal(Exception):
    """Why a Function cannot be captured (becomes an UnsupportedModelError naming it)."""


def _example(val, gen: torch.Generator) -> torch.Tensor:
    shape = [d.node.hint if isinstance(d, torch.SymInt) else int(d) for d in val.shape]
    if val.dtype.is_floating_point:
        return torch.randn(shape, dtype=val.dtype, generator=gen)
    return torch.zeros(shape, dtype=val.dtype)


def capture_functions(
    program: torch.export.ExportedProgram, export_fn: Callable
) -> dict[str, CapturedFunction]:
    """Capture forward and backward of every routed Function node of `program`.

    `export_fn(module, args)` exports a small module as an `ExportedStep` (the bridge's
    `export_step`). Returns `{graph node name: CapturedFunction}` (one capture per shape).
    """
    captured: dict[str, CapturedFunction] = {}
    by_signature: dict[tuple, CapturedFunction] = {}
    gen = torch.Generator().manual_seed(0)  # example values; the global RNG is not touched
    for node in program.graph.nodes:
        call = routed_call(node.target) if node.op == "call_function" else None
        if call is None:
            continue
        vals = [a.meta.get("val") for a in node.args]
        signature = (call.qualified,) + tuple((str(tuple(v.shape)), v.dtype) for v in vals)
        if signature not in by_signature:
            examples = tuple(_example(v, gen) for v in vals)
            try:
                by_signature[signature] = _capture(call, examples, gen, export_fn)
            except UnsupportedModelError:
                raise
            except _Refusal as err:
                raise _function_error(call, str(err)) from None
            except Exception as err:
                raise _function_error(
                    call, f"torch.export cannot trace it ({_first_line(err)})"
                ) from err
        captured[node.name] = by_signature[signature]
    return captured


def _capture(call: FunctionCall, examples: tuple, gen, export_fn) -> CapturedFunction:
    needs = tuple(
        isinstance(a, torch.Tensor) and (a.is_floating_point() or a.is_complex())
        for a in call.full_args(examples)
    )
    fwd_module = _ForwardGraph(call, needs)
    with torch.no_grad():
        outs, saved, tattrs = fwd_module(examples)
    record = fwd_module.record
    try:
        forward = export_fn(fwd_module, (examples,))
    except Exception as err:
        raise _Refusal(f"its forward cannot be traced by torch.export ({_first_line(err)})")
    bwd_module = _BackwardGraph(call, record, len(saved), len(tattrs))
    grads_out = tuple(
        torch.randn(o.shape, dtype=o.dtype, generator=gen)
        if o.is_floating_point()
        else torch.zeros_like(o)
        for o in outs
    )
    bwd_args = tuple(saved) + tuple(tattrs) + grads_out
    with torch.no_grad():
        bwd_module(tuple(t.clone() for t in bwd_args))
    try:
        backward = export_fn(bwd_module, (tuple(t.clone() for t in bwd_args),))
    except Exception as err:
        raise _Refusal(f"its backward cannot be traced by torch.export ({_first_line(err)})")
    return CapturedFunction(call, forward, backward, len(saved), len(tattrs), bwd_module.grad_pos)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def _function_error(call: FunctionCall, reason: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"the torch.autograd.Function `{call.name}` cannot be converted with its backward: "
        f"{reason}. Write its forward and backward with tensor operations only (no .item(), "
        "no Python branches on tensor values, no in-place changes of its inputs), or rewrite "
        "it as a `torch.library.custom_op` and pass its JAX twin with "
        f"`custom_ops={{'namespace::name': jax_fn}}`."
    )
