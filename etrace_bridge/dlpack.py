"""Zero-copy exchange of arrays between torch and JAX through DLPack.

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
"""
from __future__ import annotations

import jax
import torch

__all__ = ["to_jax", "to_torch", "needs_copy", "CPU_ALIGNMENT"]

CPU_ALIGNMENT = 64
_WIDE_DTYPES = (torch.float64, torch.int64, torch.uint64, torch.complex128)


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
        return f"its strides {tuple(tensor.stride())} are not a dense layout for shape {tuple(tensor.shape)}"
    if (tensor.device.type == "cpu" and tensor.numel() > 0
            and tensor.data_ptr() % CPU_ALIGNMENT != 0):
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
    if tensor.dtype in _WIDE_DTYPES and not jax.config.read("jax_enable_x64"):
        raise TypeError(
            f"{tensor.dtype} tensor while JAX 64-bit mode is off: JAX would silently "
            "downcast it to 32 bits. Enable it with jax.config.update('jax_enable_x64', True) "
            "before creating arrays (after importing brainstate, whose import switches it off; "
            "importing etrace keeps it), or convert the model/data to float32 (module.float())."
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
