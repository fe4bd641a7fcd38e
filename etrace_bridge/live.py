"""The live-model contract: what the learner re-reads from the torch model at every step, and
what a conversion fixes.

Re-read at every step: the parameters (resolved by name, so a replaced `nn.Parameter` is used
and gets its `.grad`) and the buffers (an in-place or `.data` change of a buffer the step only
reads recompiles the step).
Fixed at conversion: the module structure, train/eval mode, and Python attributes (numbers,
bools, strings) that forward may read: torch.export bakes them into the graph. A change of
any of them is refused with `StaleConversionError` ("re-convert") instead of running a stale
graph; a removed, re-shaped or re-typed parameter is refused the same way.

Skipping re-import: a parameter imported without a copy shares its memory with the JAX
array, so any in-place write (optimizer.step(), `p.data.copy_()`, `load_state_dict()`) is
seen without re-importing. It is re-imported when its identity, storage pointer, shape,
strides or dtype changed (`p.data = ...`, a new `nn.Parameter`), or always when the import
needed a copy.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from etrace_bridge.arrays import import_tensor, needs_copy
from etrace_bridge.errors import StaleConversionError

__all__ = ["StaleConversionError", "LiveModel", "snapshot_attributes"]

_SCALARS = (bool, int, float, complex, str, type(None))
# torch.nn.Module's own bookkeeping (hook dicts, flags): not model configuration
_TORCH_INTERNALS = frozenset(vars(torch.nn.Module())) - {"training"}


class _Attr(NamedTuple):
    where: str  # dotted submodule name ('' for the root)
    owner: Any  # the submodule's __dict__
    name: str
    value: Any


def snapshot_attributes(module: torch.nn.Module) -> tuple[_Attr, ...]:
    """Scalar Python attributes (and `training`) of every submodule, as conversion saw them."""
    out = []
    for where, sub in module.named_modules():
        for name, value in vars(sub).items():
            if name not in _TORCH_INTERNALS and isinstance(value, _SCALARS):
                out.append(_Attr(where, vars(sub), name, value))
    return tuple(out)


def _dotted(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


class _Param(NamedTuple):
    path: tuple
    name: str
    owner: torch.nn.Module  # the submodule holding it, and its attribute name there
    attr: str
    shape: tuple
    dtype: torch.dtype


def _owner(module: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    owner, _, attr = name.rpartition(".")
    return (module.get_submodule(owner) if owner else module), attr


class _Imported(NamedTuple):
    """What a parameter looked like when it was last imported (see `needs_import`)."""

    tensor: torch.Tensor
    data_ptr: int
    shape: torch.Size
    stride: tuple
    dtype: torch.dtype
    shared: bool  # zero-copy: in-place writes reach the JAX array


class LiveModel:
    """Checks a torch model against its conversion and resolves its parameters by name."""

    def __init__(
        self, module: torch.nn.Module, params: list[tuple[tuple, str]], constants: list[str]
    ):
        self.module = module
        self._attrs = snapshot_attributes(module)
        self._children = tuple(
            (where, sub, tuple(sub._modules.items())) for where, sub in module.named_modules()
        )
        self._params = [
            _Param(
                path,
                name,
                *_owner(module, name),
                tuple(module.get_parameter(name).shape),
                module.get_parameter(name).dtype,
            )
            for path, name in params
        ]
        self._buffers = {name: module.get_buffer(name).detach().clone() for name in constants}
        self._imported: dict[tuple, _Imported] = {}

    # -- fixed at conversion

    def check(self) -> None:
        """Raise `StaleConversionError` listing every change of mode, attribute or structure."""
        changed = [
            a
            for a in self._attrs
            if a.owner.get(a.name, _MISSING) is not a.value
            and a.owner.get(a.name, _MISSING) != a.value
        ]
        moved = [
            where
            for where, sub, kids in self._children
            if len(sub._modules) != len(kids) or any(sub._modules.get(k) is not v for k, v in kids)
        ]
        if changed or moved:
            raise StaleConversionError(self._describe(changed, moved))

    def _describe(self, changed, moved) -> str:
        lines = []
        for a in changed:
            now = a.owner.get(a.name, _MISSING)
            if a.name == "training":
                mode = lambda t: "train" if t else "eval"
                lines.append(
                    f"`{a.where or type(self.module).__name__}` was converted in "
                    f"{mode(a.value)} mode and is now in {mode(now)} mode"
                )
            else:
                lines.append(
                    f"attribute `{_dotted(a.where, a.name)}` was {a.value!r} at "
                    f"conversion and is now {'deleted' if now is _MISSING else repr(now)}"
                )
        lines += [
            f"the submodules of `{w or type(self.module).__name__}` were replaced, added or removed"
            for w in moved
        ]
        return (
            "the torch model changed after conversion, and the converted step (a snapshot "
            "made by torch.export) would silently run the old one:\n"
            + "\n".join(f"  - {line}" for line in lines)
            + "\nre-convert: build a new OnlineLearner (or call from_torch again) after "
            "changing the model, or undo the change"
        )

    # -- re-read every step

    def parameters(self) -> dict[tuple, torch.nn.Parameter]:
        """`{path: parameter}` as the model holds them now (resolved by name)."""
        return self._resolve()[0]

    def imports(self, params: dict[tuple, torch.nn.Parameter]) -> dict[tuple, Any]:
        """JAX arrays for the parameters whose memory JAX does not already see."""
        return {path: self._import(path, p) for path, p in params.items() if self._stale(path, p)}

    def refresh(self) -> tuple[dict[tuple, torch.nn.Parameter], dict[tuple, Any]]:
        """`parameters()` and their `imports(...)` in one pass (once per learner call)."""
        params, stale = self._resolve()
        return params, {path: self._import(path, params[path]) for path in stale}

    def _resolve(self) -> tuple[dict[tuple, torch.nn.Parameter], list[tuple]]:
        """The parameters by path, and the paths among them that need a new import."""
        out, stale, problems = {}, [], []
        for path, name, owner, attr, shape, dtype in self._params:
            # `check()` ran first: the owner is still the submodule at that name
            p = owner._parameters.get(attr)
            if p is None:
                problems.append(
                    f"parameter `{name}` is gone (removed, or replaced by something "
                    "that is not an nn.Parameter)"
                )
                continue
            if p.shape != shape or p.dtype != dtype:
                problems.append(
                    f"parameter `{name}` is now {p.dtype} of shape "
                    f"{tuple(p.shape)}; it was converted as {dtype} of shape {shape}"
                )
            out[path] = p
            if self._stale(path, p):
                stale.append(path)
        if problems:
            raise StaleConversionError(
                "the model's parameters no longer match its conversion:\n"
                + "\n".join(f"  - {line}" for line in problems)
                + "\nre-convert: build a new OnlineLearner (or call from_torch again)"
            )
        return out, stale

    def _stale(self, path: tuple, p: torch.nn.Parameter) -> bool:
        """Whether JAX may not see `p`'s current values through its last import (read from the
        Parameter itself: a `.detach()` per parameter and call costs more than the check)."""
        seen = self._imported.get(path)
        return not (
            seen is not None
            and seen.shared
            and seen.tensor is p
            and seen.data_ptr == p.data_ptr()
            and seen.stride == p.stride()
            and seen.shape == p.shape
            and seen.dtype == p.dtype
        )

    def _import(self, path: tuple, p: torch.nn.Parameter):
        value = import_tensor(p)
        t = p.detach()
        shared = needs_copy(t) is None and t.dtype != torch.int64  # int64: int32 copy
        self._imported[path] = _Imported(p, t.data_ptr(), t.shape, t.stride(), t.dtype, shared)
        return value

    def changed_buffers(self) -> list[str]:
        """Constant buffers whose value changed since the step was compiled."""
        out = []
        for name, saved in self._buffers.items():
            try:
                now = self.module.get_buffer(name)
            except AttributeError:
                raise StaleConversionError(f"buffer `{name}` is gone from the model; re-convert")
            if now.shape != saved.shape or now.dtype != saved.dtype:
                raise StaleConversionError(
                    f"buffer `{name}` is now {now.dtype} of shape {tuple(now.shape)}; it was "
                    f"converted as {saved.dtype} of shape {tuple(saved.shape)}; re-convert"
                )
            if not torch.equal(now, saved):
                out.append(name)
        return out

    def buffers_recompiled(self, names: list[str]) -> None:
        """Record the current values of `names` as compiled in."""
        for name in names:
            self._buffers[name] = self.module.get_buffer(name).detach().clone()


_MISSING = object()
