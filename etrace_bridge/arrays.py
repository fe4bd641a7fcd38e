"""The one torch <-> JAX array policy: dtypes, 64-bit handling, and zero-copy DLPack exchange.

Dtypes: every torch dtype maps to one JAX dtype (`jax_dtype`). 64-bit floats need JAX's x64 mode
(never a silent downcast: `to_jax` and `check_float64` refuse); int64 tensors that the bridge
imports itself (constants, labels, buffers) become int32 while x64 is off (`import_tensor`).

DLPack:
`to_jax` shares the torch tensor's memory whenever JAX can use it as it is:
row-major tensors and any permutation of them (a transposed view keeps its
layout in JAX). Other layouts need a copy, made on the torch side:

- strided views that skip elements (`t[:, ::2]`) or broadcast (`expand`);
- CPU tensors whose data pointer is not 64-byte aligned (XLA's CPU minimum;
  slices such as `t[1:]` usually are not) -- JAX would silently copy them;
- tensors with torch's lazy conjugate/negative bit set.

Both directions keep the device: a CUDA tensor becomes an array on the JAX GPU
device with the same ordinal, and back. The shared buffer is mutable from the
torch side; writing to it in place changes the JAX array too.

GPU: by default JAX grabs 75% of GPU memory when its GPU backend starts,
starving torch. Importing `etrace_bridge` sets XLA_PYTHON_CLIENT_PREALLOCATE=false
(unless the variable is already set); it only takes effect if no JAX computation
has touched the GPU before the import.

Matmul precision: torch computes float32 matmuls on CUDA in full float32 unless told otherwise
(`torch.set_float32_matmul_precision`), while JAX's GPU default is TensorFloat-32, whose error
(~1e-3) is far above the bridge's conversion check. `matmul_precision(device)` gives the JAX
setting that matches torch's, applied to every program the bridge runs on a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
import torch

__all__ = [
    "to_jax",
    "to_torch",
    "needs_copy",
    "CPU_ALIGNMENT",
    "jax_dtype",
    "import_tensor",
    "is_float64",
    "check_float64",
    "x64_enabled",
    "matmul_precision",
]

CPU_ALIGNMENT = 64
_WIDE_DTYPES = (torch.float64, torch.int64, torch.uint64, torch.complex128)
_FLOAT64 = (torch.float64, torch.complex128)

_DTYPES = {
    torch.float16: np.float16,
    torch.bfloat16: jnp.bfloat16,
    torch.float32: np.float32,
    torch.float64: np.float64,
    torch.int8: np.int8,
    torch.int16: np.int16,
    torch.int32: np.int32,
    torch.int64: np.int64,
    torch.uint8: np.uint8,
    torch.bool: np.bool_,
    torch.complex64: np.complex64,
    torch.complex128: np.complex128,
}

X64_HINT = (
    "Enable it with jax.config.update('jax_enable_x64', True) (after importing brainstate, "
    "whose import switches it off; importing etrace keeps it), or use a float32 model and "
    "inputs (model.float())."
)


_PRECISIONS = {"highest": "highest", "high": "tensorfloat32", "medium": "bfloat16"}


def matmul_precision(device: torch.device | str):
    """A context in which JAX computes float32 matmuls and convolutions as torch does on
    `device`: torch's `get_float32_matmul_precision()` ('highest' by default) on CUDA; nothing
    to match on CPU, where both compute in float32."""
    if torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    return jax.default_matmul_precision(_PRECISIONS[torch.get_float32_matmul_precision()])


def x64_enabled() -> bool:
    """Whether JAX computes in 64 bits now."""
    return bool(jax.config.read("jax_enable_x64"))


def jax_dtype(dtype: torch.dtype) -> np.dtype:
    """The JAX dtype for a torch dtype (int64 becomes int32 while JAX x64 is off)."""
    if dtype not in _DTYPES:
        raise TypeError(f"torch dtype {dtype} has no JAX equivalent in the bridge")
    return jax.dtypes.canonicalize_dtype(_DTYPES[dtype])


def is_float64(value) -> bool:
    """True for a float64/complex128 tensor, or a list/tuple holding one."""
    if isinstance(value, torch.Tensor):
        return value.dtype in _FLOAT64
    if isinstance(value, (list, tuple)):
        return any(is_float64(v) for v in value)
    return False


def check_float64(tensors: Iterable[tuple[str, str, torch.Tensor]]) -> None:
    """Refuse 64-bit float tensors (`(kind, name, tensor)`) while JAX x64 is off."""
    if x64_enabled():
        return
    for kind, name, t in tensors:
        if t.dtype in _FLOAT64:
            raise TypeError(
                f"{kind} `{name}` is {t.dtype} but JAX 64-bit mode is off, so JAX "
                f"would silently compute in float32. {X64_HINT}"
            )


def import_tensor(t: torch.Tensor, *, copy: bool = False) -> jax.Array:
    """A tensor the bridge imports itself (parameter, buffer, constant, label) as a JAX array.

    int64 becomes int32 while x64 is off (indices and labels fit; JAX would refuse them).
    """
    t = t.detach()
    if t.dtype == torch.int64 and not x64_enabled():
        t = t.to(torch.int32)
    return to_jax(t, copy=True) if copy else to_jax(t)


def _is_permuted_compact(shape, strides) -> bool:
    """True when the strides describe a dense buffer in some dimension order."""
    if any(size == 0 for size in shape):
        return True
    dims = sorted((st, size) for size, st in zip(shape, strides) if size != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def needs_copy(tensor: torch.Tensor) -> str | None:
    """Why `tensor` cannot be handed to JAX without a copy, or None if it can."""
    if tensor.is_conj() or tensor.is_neg():
        return "it has torch's lazy conjugate/negative bit set"
    if not _is_permuted_compact(tensor.shape, tensor.stride()):
        return (
            f"its strides {tuple(tensor.stride())} are not a dense layout for shape "
            f"{tuple(tensor.shape)}"
        )
    if (
        tensor.device.type == "cpu"
        and tensor.numel() > 0
        and tensor.data_ptr() % CPU_ALIGNMENT != 0
    ):
        return f"its data pointer is not {CPU_ALIGNMENT}-byte aligned (offset view)"
    return None


def to_jax(tensor: torch.Tensor, *, copy: bool | None = None) -> jax.Array:
    """Turn a torch tensor into a JAX array on the matching device.

    copy=None shares memory when possible and copies otherwise (see the module
    docstring for the layouts that need a copy); copy=False raises ValueError
    instead of copying; copy=True always returns an independent array (cloned
    on the torch side: `jax.dlpack.from_dlpack(copy=True)` still shares CPU
    memory in jax 0.10.2).
    Tensors that require grad are detached (the array carries no autograd
    history). 64-bit tensors need `jax_enable_x64`: without it JAX would
    silently downcast them, so a TypeError is raised instead.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"to_jax expects a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype in _WIDE_DTYPES and not x64_enabled():
        raise TypeError(
            f"{tensor.dtype} tensor while JAX 64-bit mode is off: JAX would silently "
            f"downcast it to 32 bits. {X64_HINT}"
        )
    tensor = tensor.detach()
    reason = needs_copy(tensor)
    if reason is not None and copy is False:
        raise ValueError(f"to_jax(copy=False): a copy is needed because {reason}")
    if reason is not None or copy:
        tensor = tensor.resolve_conj().resolve_neg().clone(memory_format=torch.contiguous_format)
    return jax.dlpack.from_dlpack(tensor, copy=False)


def to_torch(array: jax.Array, *, copy: bool | None = None) -> torch.Tensor:
    """Turn a JAX array into a torch tensor on the matching device.

    Shares memory unless copy=True (JAX buffers are always dense, so sharing
    never fails). The tensor does not require grad. Writing to it in place
    mutates the JAX array, which JAX assumes immutable: clone before writing.
    """
    if isinstance(array, jax.core.Tracer):
        raise TypeError("to_torch needs a concrete jax.Array, not a traced value inside jit/grad")
    if not isinstance(array, jax.Array):
        raise TypeError(f"to_torch expects a jax.Array, got {type(array).__name__}")
    return torch.from_dlpack(array, copy=bool(copy))
