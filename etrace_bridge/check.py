"""The conversion checks itself: torch eagerly and the converted JAX step, side by side.

`check_conversion(tm)` runs the torch module eagerly for a few steps from a copy of the state
the converted module starts from, and the converted step in JAX, on the same random inputs.
The first output or state that differs beyond the dtype's tolerance (relative 1e-4 in float32,
1e-10 in float64) is a `ConversionCheckError` naming the step, the output or state, and the
size of the difference. The torch module's buffers, attributes, memories and the global RNGs
are left as they were; the JAX module's hidden states are put back.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import brainstate
import jax
import numpy as np
import torch
import torch.utils._pytree as pytree

from etrace_bridge.arrays import import_tensor, matmul_precision, to_torch, x64_enabled
from etrace_bridge.errors import ConversionCheckError
from etrace_bridge.shared_programs import call_jaxpr
from etrace_bridge.state_slots import all_slots, swapped_slots

__all__ = ["check_conversion", "Mismatch", "TOLERANCE"]

TOLERANCE = {
    np.dtype("float32"): 1e-4,
    np.dtype("float64"): 1e-10,
    np.dtype("float16"): 1e-2,
    np.dtype("complex64"): 1e-4,
    np.dtype("complex128"): 1e-10,
}


class Mismatch(NamedTuple):
    step: int
    what: str
    max_abs: float
    max_rel: float
    tol: float


def check_conversion(tm, steps: int = 3, seed: int = 0) -> None:
    """Raise `ConversionCheckError` when `tm` does not reproduce its torch module (see above)."""
    b = tm._bridge
    if b.lowered._uses_f64 and not x64_enabled():
        return  # the converted step refuses to run at all; its first call says why
    inputs = _random_inputs(b.layout.update_args, steps, seed)
    reference = _torch_run(b, inputs)
    param = next(b.torch_module.parameters(), None)
    # eager also when converted inside a trace (a loss); on a GPU, torch's matmul precision
    with jax.ensure_compile_time_eval(), matmul_precision("cpu" if param is None else param.device):
        converted = _jax_run(tm, inputs)
    for k, (ref, got) in enumerate(zip(reference, converted)):
        for what in ref:
            bad = _compare(k, what, ref[what], got.get(what))
            if bad is not None:
                raise _error(tm, bad, steps)


def _random_inputs(examples: tuple, steps: int, seed: int) -> list[tuple]:
    gen = torch.Generator().manual_seed(seed)

    def draw(x):
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            scale = max(1.0, float(x.detach().abs().max())) if x.numel() else 1.0
            noise = torch.randn(x.shape, generator=gen, dtype=torch.float64)
            return (2 * scale * noise).to(dtype=x.dtype, device=x.device)
        return x.detach().clone() if isinstance(x, torch.Tensor) else x

    return [tuple(pytree.tree_map(draw, x) for x in examples) for _ in range(steps)]


def _flatten(prefix: str, tree) -> dict[str, Any]:
    leaves = pytree.tree_leaves(tree)
    if len(leaves) == 1 and not isinstance(tree, (tuple, list, dict)):
        return {prefix: leaves[0]}
    return {f"{prefix}[{i}]": leaf for i, leaf in enumerate(leaves)}


def _torch_run(b, inputs: list[tuple]) -> list[dict]:
    """Eager torch steps from copies of the module's own state (its buffers, attributes and
    memories as the user left them, so lazily sized states are sized by the library itself) and
    of the example state inputs; everything is put back after."""
    by_name = {s.name: s for s in all_slots(b.torch_module)}
    slot_paths = {p: name for p, name in b.buffer_states}
    states = {p: import_tensor(v, copy=True) for p, (v, _) in b.layout.init.items()}
    records = []
    param = next(b.torch_module.parameters(), None)
    device = None if param is None else param.device
    with torch.no_grad(), torch.random.fork_rng(devices=[]), swapped_slots(b.torch_module):
        for xs in inputs:
            step_in = b.layout.step_inputs(_import(xs), states)
            out = b.torch_module(*pytree.tree_map(lambda x: _to_torch(x, device), step_in))
            y, states = b.layout.split_outputs(
                pytree.tree_map(
                    lambda t: import_tensor(t, copy=True) if isinstance(t, torch.Tensor) else t, out
                )
            )
            record = _flatten("output", y)
            record.update({f"state {'.'.join(p)}": v for p, v in states.items()})
            for p, name in slot_paths.items():
                record[f"state {name}"] = import_tensor(
                    by_name[name].get(b.torch_module), copy=True
                )
            records.append(record)
    return records


def _import(xs: tuple) -> tuple:
    return tuple(
        pytree.tree_map(
            lambda t: import_tensor(t, copy=True) if isinstance(t, torch.Tensor) else t, x
        )
        for x in xs
    )


def _to_torch(x, device=None):
    """A JAX/numpy step input as a torch tensor on the module's device (DLPack keeps a GPU
    array on the GPU)."""
    if isinstance(x, jax.Array):
        x = to_torch(x).clone()  # a torch-side copy (JAX's own copy compiles a program)
    elif isinstance(x, np.ndarray):
        x = torch.from_numpy(np.array(x))
    else:
        return x
    return x if device is None else x.to(device)


def _jax_run(tm, inputs: list[tuple]) -> list[dict]:
    """The converted steps from the module's start state, all in one compiled program (one
    XLA compile instead of one per operation and shape, shared by conversions of the same
    structure: `etrace_bridge.shared_programs`); hidden states put back after."""
    b = tm._bridge
    imported = [_import(xs) for xs in inputs]
    leaves, tree = jax.tree.flatten(imported)
    dynamic = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array)]

    def steps(arrays):
        given = list(leaves)
        for i, x in zip(dynamic, arrays):
            given[i] = x
        records = []
        for xs in jax.tree.unflatten(tree, given):
            y = tm.update(*xs)
            record = _flatten("output", y)
            record.update({f"state {'.'.join(p)}": tm._read_hidden(p) for p in b.layout.init})
            record.update({f"state {name}": tm._state(p).value for p, name in b.buffer_states})
            records.append(record)
        return records

    arrays = [leaves[i] for i in dynamic]
    with tm.states_kept():
        tm.init_state()
        fn = brainstate.transform.StatefulFunction(steps)
        fn.make_jaxpr(arrays)
        closed = fn.get_jaxpr(arrays)
        values = [st.value for st in fn.get_states(arrays)]
        out_tree = jax.tree_util.treedef_children(fn.get_out_treedef(arrays))[0]
        flat = call_jaxpr(closed, *jax.tree.leaves(arrays), *jax.tree.leaves(values))
    return jax.tree.unflatten(out_tree, flat[: out_tree.num_leaves])


def _compare(step: int, what: str, ref, got) -> Mismatch | None:
    ref = np.asarray(ref)
    if got is None:
        return Mismatch(
            step, what + " (missing in the converted step)", float("inf"), float("inf"), 0.0
        )
    got = np.asarray(got)
    tol = TOLERANCE.get(ref.dtype, 1e-4) if ref.dtype.kind in "fc" else 0.0
    if ref.shape != got.shape:
        return Mismatch(
            step, f"{what} (shape {got.shape}, torch {ref.shape})", float("inf"), float("inf"), tol
        )
    if ref.size == 0:
        return None
    # complex values compare as complex numbers (a float64 cast would drop the imaginary part)
    wide = np.complex128 if "c" in (ref.dtype.kind, got.dtype.kind) else np.float64
    diff = np.abs(ref.astype(wide) - got.astype(wide))
    scale = max(1.0, float(np.max(np.abs(ref))))
    max_abs = float(np.max(diff))
    if not np.all(np.isfinite(diff)) and not np.array_equal(np.isnan(ref), np.isnan(got)):
        return Mismatch(step, what, float("nan"), float("nan"), tol)
    if max_abs > tol * scale:
        return Mismatch(step, what, max_abs, max_abs / scale, tol)
    return None


def _error(tm, bad: Mismatch, steps: int) -> ConversionCheckError:
    name = type(tm.torch_module).__name__
    return ConversionCheckError(
        f"the converted {name} does not reproduce the torch model: at step {bad.step} (of "
        f"{steps}, from the same start state and random inputs) {bad.what} differs by "
        f"{bad.max_abs:.3g} (relative {bad.max_rel:.3g}, tolerance {bad.tol:g}). The model "
        "probably keeps state or computes in a way the bridge does not see (state outside "
        "buffers, attributes and forward arguments; randomness; Python-side branching on "
        "values). Declare the state with state=, register it as a buffer, or open an issue with "
        "this model; from_torch(..., check=False) skips this check."
    )
