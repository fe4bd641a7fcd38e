"""The interpreter: run an exported torch step (ATen FX graph) as a JAX function.

Each node is resolved once, before any tracing, to a user lowering (`custom_ops`) or to its
record in `OP_TABLE`; every node that cannot be lowered is reported in one error, with the model
source line. Results are cast to the dtype torch recorded for each node, so torch's promotion
rules hold.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax.numpy as jnp
import torch
import torch.utils._pytree as pytree

from etrace_bridge.arrays import X64_HINT, import_tensor, is_float64, jax_dtype, x64_enabled
from etrace_bridge.errors import UnsupportedOpError
from etrace_bridge.export import ExportedStep, user_frame

from .functions import function_vjp
from .param_views import find_param_views
from .record import weight_positions
from .table import OP_TABLE

__all__ = ["lower", "LoweredStep"]

_IGNORED_KWARGS = frozenset(
    {"device", "layout", "pin_memory", "memory_format", "non_blocking", "requires_grad"}
)

_SYMBOLIC = (torch.SymInt, torch.SymFloat, torch.SymBool)


def _op_key(target) -> tuple[str, ...]:
    """Names a custom_ops key may use for `target`: 'ns::name' and 'ns::name.overload'."""
    if isinstance(target, torch._ops.OpOverload):
        base = target._schema.name
        return (base, f"{base}.{target._overloadname}")
    return ()


def _custom_table(custom_ops) -> dict[str, Callable]:
    table = {}
    for key, fn in (custom_ops or {}).items():
        if isinstance(key, str):
            name = key
        elif isinstance(key, torch._ops.OpOverload):
            name = f"{key._schema.name}.{key._overloadname}"
        elif isinstance(key, torch._ops.OpOverloadPacket):
            name = key._qualified_op_name
        elif hasattr(key, "_qualname"):
            name = key._qualname
        else:
            raise TypeError(
                f"custom_ops keys must be 'namespace::name' strings or torch ops, got {key!r}"
            )
        if not callable(fn):
            raise TypeError(f"custom_ops[{name!r}] must be a JAX function, got {fn!r}")
        table[name] = fn
    return table


def _where(node) -> str:
    where = user_frame(node.meta.get("stack_trace"))
    return f" (from {where})" if where else ""


def _resolve(node, custom: Mapping[str, Callable], views) -> tuple[Callable, tuple]:
    """The JAX function for one graph node -- a user lowering, else the op table's record --
    and `(position, parameter placeholder)` when it takes a parameter itself at `position`."""
    for key in _op_key(node.target):
        if key in custom:
            return custom[key], ()
    record = OP_TABLE.get(node.target)
    if record is None:
        if getattr(node.target, "__module__", None) == "_operator":
            return node.target, ()
        name = _op_key(node.target)[0] if _op_key(node.target) else str(node.target)
        raise UnsupportedOpError(
            f"`{node.target}`{_where(node)}: no JAX lowering (pass "
            f"custom_ops={{'{name}': jax_fn}} or rewrite that line)"
        )
    if record.check is not None:
        reason = record.check(node)
        if reason is not None:
            raise UnsupportedOpError(f"`{node.target}`{_where(node)}: {reason}")
    for position in weight_positions(record):
        w = node.args[position] if len(node.args) > position else None
        view = views.get(w.name) if isinstance(w, torch.fx.Node) else None
        fn = record.param_fn(view, position) if view is not None else None
        if fn is not None:
            return fn, (position, view.param)
    return record.fn, ()


def _unsupported_error(problems: list[str]) -> UnsupportedOpError:
    listing = "\n".join(f"  - {p}" for p in problems)
    return UnsupportedOpError(
        f"{len(problems)} op(s) of this model cannot be lowered to JAX by etrace_bridge:\n"
        f"{listing}\nFor an op with no lowering, pass a JAX implementation with "
        "`custom_ops={'namespace::name': jax_fn}` (jax_fn takes the op's arguments as JAX "
        "arrays; use jax.custom_vjp for a custom gradient), rewrite those lines with supported "
        "tensor operations, or open an issue naming the op."
    )


class LoweredStep:
    """JAX callable for one exported step: `(params, buffers, *inputs) -> (outputs, new_buffers)`.

    `params` / `buffers` map dotted torch names to arrays; `inputs` mirror the example inputs;
    `outputs` mirror forward's return value; `new_buffers` holds the mutated buffers by name.
    """

    def __init__(self, step: ExportedStep, custom_ops: Mapping | None = None):
        self.step = step
        custom = _custom_table(custom_ops)
        functions = {}  # one jax.custom_vjp per captured torch.autograd.Function (and shape)
        for captured in step.functions.values():
            if captured not in functions:
                functions[captured] = function_vjp(captured, LoweredStep)
        by_node = {n: functions[c] for n, c in step.functions.items()}
        nodes = list(step.graph.nodes)
        self._placeholders = [n for n in nodes if n.op == "placeholder"]
        self._output = next(n for n in nodes if n.op == "output")
        views = find_param_views(nodes, set(step.parameters))
        self._plan, problems = [], []
        for node in nodes:
            if node.op != "call_function":
                if node.op not in ("placeholder", "output"):
                    problems.append(f"graph node kind `{node.op}` ({node.target})")
                continue
            if node.name in by_node:
                self._plan.append((node, by_node[node.name], ()))
                continue
            try:
                self._plan.append((node, *_resolve(node, custom, views)))
            except UnsupportedOpError as err:
                problems.append(str(err))
        if problems:
            raise _unsupported_error(problems)
        self._uses_f64 = any(is_float64(n.meta.get("val")) for n in nodes)

    def __call__(self, params: Mapping, buffers: Mapping, *inputs):
        if self._uses_f64 and not x64_enabled():
            raise TypeError(
                "this torch model computes in float64 but JAX 64-bit mode is off, "
                f"so JAX would silently compute in float32. {X64_HINT}"
            )
        env = self._bind(params, buffers, inputs)
        for node, fn, param in self._plan:
            args = torch.fx.node.map_arg(node.args, lambda n: env[n.name])
            if param:  # the parameter itself, not the view of it the graph passes
                position, name = param
                args = args[:position] + (env[name],) + args[position + 1 :]
            kwargs = {k: v for k, v in node.kwargs.items() if k not in _IGNORED_KWARGS}
            kwargs = torch.fx.node.map_arg(kwargs, lambda n: env[n.name])
            try:
                out = fn(*args, **kwargs)
            except UnsupportedOpError:
                raise
            except Exception as err:
                raise RuntimeError(
                    f"lowering of `{node.target}`{_where(node)} failed: {type(err).__name__}: {err}"
                ) from err
            env[node.name] = _match_meta(out, node.meta.get("val"), node)
        flat = [env[a.name] if isinstance(a, torch.fx.Node) else a for a in self._output.args[0]]
        outputs = pytree.tree_unflatten(
            [flat[i] for i in self.step.user_outputs], self.step.out_spec
        )
        new_buffers = {name: flat[i] for i, name in self.step.buffers_to_mutate.items()}
        return outputs, new_buffers

    def _bind(self, params, buffers, inputs) -> dict:
        leaves = pytree.tree_leaves(inputs)
        step = self.step
        if len(leaves) != len(step.user_inputs):
            raise ValueError(
                f"the exported step takes {len(step.user_inputs)} input tensors "
                f"(structure {step.in_spec}), got {len(leaves)}"
            )
        users = dict(zip(step.user_inputs, leaves))
        env = {}
        for node in self._placeholders:
            name = node.name
            if name in users:
                env[name] = jnp.asarray(users[name])
            elif name in step.parameters:
                env[name] = params[step.parameters[name]]
            elif name in step.buffers:
                env[name] = buffers[step.buffers[name]]
            elif name in step.constants:
                env[name] = import_tensor(step.constants[name], copy=True)
            else:
                raise KeyError(f"graph input `{name}` has no value")
        return env


def lower(exported_step: ExportedStep, custom_ops: Mapping | None = None) -> LoweredStep:
    """Lower `exported_step` to `fn(params, buffers, *inputs) -> (outputs, new_buffers)`.

    Unsupported ops are reported here, before any tracing, with the model source line.
    `custom_ops` maps 'namespace::name' (or the op object) to a JAX function; it also overrides
    the built-in lowering of an ATen op ('aten::name').
    """
    return LoweredStep(exported_step, custom_ops)


def _match_meta(out, val, node):
    """Cast `out` to the dtype torch recorded for the node and check static shapes."""
    if isinstance(val, torch.Tensor):
        if out is None:
            return out
        out = jnp.asarray(out)
        dtype = jax_dtype(val.dtype)
        if out.dtype != dtype:
            out = out.astype(dtype)
        expect = tuple(val.shape)
        if len(expect) != out.ndim or any(
            not isinstance(e, _SYMBOLIC) and e != s for e, s in zip(expect, out.shape)
        ):
            raise RuntimeError(
                f"lowering of `{node.target}` produced shape {tuple(out.shape)} where torch "
                f"expects {expect}; please open an issue with this model"
            )
        return out
    if isinstance(val, (list, tuple)) and isinstance(out, (list, tuple)) and len(val) == len(out):
        return type(out)(_match_meta(o, v, node) for o, v in zip(out, val))
    return out
