"""OnlineLearner: train a torch recurrent model online; gradients land in each parameter's
`.grad`."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Optional

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import torch

import etrace_core
from etrace_core.algorithms.windows import check_window

from .algorithms import make_algorithm
from .arrays import import_tensor, matmul_precision, to_jax, to_torch
from .checkpoint import load_state_dict, make_state_dict
from .errors import UnsupportedModelError
from .live import LiveModel
from .losses import resolve_loss
from .module import TorchModule, from_torch
from .step_checks import FiniteGuard, input_shape_error
from .targets import check_targets


class OnlineLearner:
    """Online training of a torch model with eligibility traces.

    `step(x_t, target_t)` runs one time step, returns the step's loss (a torch scalar) and adds
    the online gradient to each torch parameter's `.grad` (as `loss.backward()` would), so any
    `torch.optim` optimizer can take the step. `run(xs, targets)` does a whole time-major
    sequence in one compiled call. Parameters are re-read from torch at every call (by name, so
    in-place optimizer updates and replaced parameters are seen); a change of what the
    conversion fixed (train/eval mode, Python attributes, structure) raises
    `StaleConversionError` (see `etrace_bridge.live`). Calls from several threads run one at a
    time. Non-finite inputs/gradients warn once; `check_finite=True` raises instead and undoes
    the step. A model returning several outputs (snntorch `output=True`: `(spk, mem)`) needs
    `output=i`, the output the loss applies to, unless `loss` is a torch callable that takes
    the whole tuple.

    `window=K` learns in windows of K steps inside `run`: exact BPTT through each window, the
    eligibility traces carrying the gradient across windows (the algorithm runs with
    ``vjp_method='multi-step'``; K = T is BPTT, K = 1 one step of exact backprop + traces; a
    last window shorter than K when K does not divide T). `vjp_method='multi-step'` without
    `window` makes each `run` call one window. `step` is a window of one step.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        algorithm: str = "es_d_rtrl",
        loss: Any = "mse",
        example_inputs: Any,
        custom_ops=None,
        state=None,
        dynamic_batch: bool = True,
        output: Optional[int] = None,
        check_finite: bool = False,
        window: Optional[int] = None,
        **algorithm_options,
    ):
        self.window = _window_option(window, algorithm_options)
        self.torch_module = module
        _refuse_complex_parameters(module)
        self.model: TorchModule = from_torch(
            module, example_inputs, state=state, dynamic_batch=dynamic_batch, custom_ops=custom_ops
        )
        self.algorithm_name = algorithm
        self.algorithm = make_algorithm(algorithm, self.model, **algorithm_options)
        self._example = self.model.example_step_inputs()
        self.algorithm.compile_graph(*self._example)
        self.algorithm.init_etrace_state()
        self.loss_fn = select_output(
            _jax_loss(loss, self.model, self._example, custom_ops),
            loss,
            output,
            _output_shapes(self.algorithm.graph.module_info),
        )
        self._loss_name = loss if isinstance(loss, str) else None
        self._lock = threading.RLock()  # one step at a time (see docs/limitations.md)
        paths = list(self.model.torch_parameters())
        constants = [
            n for n, _ in module.named_buffers() if n not in self.model.exported.mutated_buffers
        ]
        self._live = LiveModel(module, [(p, ".".join(p)) for p in paths], constants)
        self._param_states = dict(self.model.states(brainstate.ParamState).items())
        self._finite = FiniteGuard(strict=check_finite)
        self._compiled_shapes = (None, [])  # (module_info, its step input shapes)

    # -- training -------------------------------------------------------------------------------

    def step(self, x_t, target_t) -> torch.Tensor:
        """One online step; returns the loss and accumulates gradients into `p.grad`."""
        if self.window is not None and self.window > 1:
            raise ValueError(
                f"step() runs one time step, but this learner learns in windows of "
                f"{self.window} steps: pass the window's steps to run(xs, targets), or build "
                "the learner with window=1"
            )
        return self._run(
            x_t,
            _inputs_to_jax(x_t, step=True),
            _targets_to_jax(target_t, step=True),
            sequence=False,
        )

    def run(self, xs, targets) -> torch.Tensor:
        """A whole time-major sequence (T, B, ...) in one compiled call; returns the summed loss."""
        return self._run(xs, _inputs_to_jax(xs), _targets_to_jax(targets), sequence=True)

    def _run(self, given, xs, ys, sequence: bool) -> torch.Tensor:
        with self._lock:
            params = self._prepare()
            args = xs if isinstance(xs, tuple) else (xs,)
            self._ensure_batch(args, sequence)
            check_targets(self._loss_name, self._output_shape(), ys, leading=1)
            undo = self._undo_point() if self._finite.strict else None
            device = next(iter(params.values())).device if params else "cpu"
            with matmul_precision(device):
                result = etrace_core.run_online(
                    self.algorithm, self.loss_fn, args, ys, window=self.window
                )
            loss = torch.from_numpy(np.array(result.loss))
            grads = _torch_grads(result.grads, params)
            problem = self._finite.check(
                _torch_leaves(given), loss, grads, self.algorithm.etrace.value
            )
            if problem is not None:
                if undo is not None:
                    undo()
                self._finite.report(problem)
            _accumulate(grads, params)
            return loss

    def _prepare(self) -> dict:
        """The live-model contract: refuse a stale conversion, re-read parameters and buffers."""
        self._live.check()
        params, imports = self._live.refresh()
        for path, value in imports.items():
            self._param_states[path].value = value
        changed = self._live.changed_buffers()
        if changed:  # buffers are compiled into the step: compile it again with their values
            self.model.sync_from_torch()
            self.algorithm.compile_graph(*self._example)
            self._live.buffers_recompiled(changed)
        return params

    def _undo_point(self):
        states = self.model.states().filter(
            lambda path, st: not isinstance(st, brainstate.ParamState)
        )
        saved = {st: st.value for st in states.values()}
        # a copy: the sequence program donates (consumes) the traces it is given
        etrace = jax.tree.map(jnp.copy, self.algorithm.etrace.value)

        def undo():
            for st, v in saved.items():
                st.value = v
            self.algorithm.etrace.value = etrace

        return undo

    def _output_shape(self):
        outs = self.algorithm.graph.module_info.output_vars
        return tuple(outs[0].aval.shape) if len(outs) == 1 else None

    def _ensure_batch(self, args, sequence: bool) -> None:
        """Each step's inputs must have the shapes the graph was compiled for."""
        info = self.algorithm.graph.module_info
        if self._compiled_shapes[0] is not info:
            self._compiled_shapes = (info, [tuple(v.aval.shape) for v in info.arg_invars])
        compiled = self._compiled_shapes[1]
        given = [tuple(jnp.shape(a)) for a in jax.tree.leaves(args)]
        problem = input_shape_error(compiled, given, sequence=sequence)
        if problem is not None:
            raise ValueError(problem)

    # -- state ----------------------------------------------------------------------------------

    def reset_state(self, batch_size: Optional[int] = None) -> None:
        """Hidden states back to their initial values and traces to zero (for `batch_size`)."""
        with self._lock:
            self.model.reset_state(batch_size)
            if batch_size is not None and batch_size != self._graph_batch():
                self._example = self.model.example_step_inputs(batch_size)
                self.algorithm.compile_graph(*self._example)
            self.algorithm.init_etrace_state()

    def _graph_batch(self):
        groups = self.algorithm.graph.hidden_groups
        return groups[0].varshape[0] if groups and groups[0].varshape else None

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue: algorithm and options, model signature, hidden/dynamic
        model states and eligibility traces (torch tensors; see `etrace_bridge.checkpoint`)."""
        with self._lock:
            return make_state_dict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` saved; the learner then continues bit for bit. The whole
        checkpoint is validated first: on any mismatch nothing is changed (CheckpointError)."""
        with self._lock:
            load_state_dict(self, state)

    # -- inspection -----------------------------------------------------------------------------

    def show_graph(self, verbose: bool = True, return_msg: bool = False):
        """The compiled graph (etrace_core's summary) plus what the bridge knows from the torch
        model's structure: parameters whose gradient is approximate, with the reason."""
        msg = self.algorithm.show_graph(verbose=False, return_msg=True)
        notes = self.model.approximations
        if notes:
            msg += "\nFrom the torch model's structure:\n" + "\n".join(
                f"  {name}: {note}" for name, note in notes.items()
            )
        if verbose:
            print(msg)
        return msg if return_msg else None


def _window_option(window, options: dict) -> Optional[int]:
    """Check `window` and set the algorithm's `vjp_method` to match (in `options`)."""
    if window is None:
        return None
    window = check_window(window)
    method = options.setdefault("vjp_method", "multi-step")
    if method != "multi-step":
        raise ValueError(
            f"window={window} learns with exact BPTT inside windows, which needs "
            f"vjp_method='multi-step', not {method!r} (leave vjp_method out)"
        )
    return window


def _refuse_complex_parameters(module: torch.nn.Module) -> None:
    names = [n for n, p in module.named_parameters() if p.is_complex()]
    if names:
        raise UnsupportedModelError(
            f"complex parameter(s) {', '.join(f'`{n}`' for n in names)}: online gradients are "
            "computed for real parameters only (a complex one would get a wrong imaginary "
            "part). Keep its real and imaginary parts as two real nn.Parameters and build it in "
            "forward with torch.complex(re, im); complex states and ops are supported."
        )


def _output_shapes(info) -> Any:
    """The output's shape, or a list of shapes for a tuple output, from the compiled step graph
    (`etrace_core`'s module info: no step is run, nothing is compiled)."""
    out = jax.tree.unflatten(
        info.out_tree, [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in info.output_vars]
    )
    shape = lambda a: tuple(a.shape)
    if isinstance(out, (tuple, list)):
        return [jax.tree.map(shape, o) for o in out]
    return jax.tree.map(shape, out)


def select_output(loss_fn: Callable, loss: Any, output: Optional[int], shapes) -> Callable:
    """The loss on output `output` of a multi-output model; the whole output otherwise.

    A multi-output model with a named loss and no `output=` is ambiguous: a clear error.
    """
    is_tuple = isinstance(shapes, list)
    if output is None:
        if is_tuple and isinstance(loss, str):
            raise ValueError(
                f"the model returns {len(shapes)} outputs (shapes {shapes}), so the "
                f"loss {loss!r} does not know which one it applies to. Pass output=i "
                "(e.g. output=0 for the spikes of snntorch's (spk, mem)), or a loss callable "
                "that takes the whole tuple: loss(outputs, target)."
            )
        return loss_fn
    if not is_tuple:
        if output != 0:
            raise ValueError(
                f"output={output}: the model returns a single output; use output=0 or leave it out"
            )
        return loss_fn
    if not -len(shapes) <= output < len(shapes):
        raise ValueError(
            f"output={output} is out of range: the model returns {len(shapes)} "
            f"outputs (shapes {shapes})"
        )
    return lambda out, target: loss_fn(out[output], target)


def _jax_loss(loss, model: TorchModule, example, custom_ops) -> Callable:
    """A JAX loss(output, target) from a name, or from a torch loss exported by the bridge."""
    if isinstance(loss, str):
        return resolve_loss(loss, backend="jax")
    if not callable(loss):
        raise TypeError(
            f"loss must be a name ('mse', 'cross_entropy') or a torch loss, got {loss!r}"
        )
    return _TorchLoss(loss, custom_ops)


class _TorchLoss:
    """A torch loss module/function exported once (per output/target shape) through the bridge."""

    def __init__(self, loss, custom_ops):
        self.loss = loss if isinstance(loss, torch.nn.Module) else _LossModule(loss)
        self.custom_ops = custom_ops
        self._lowered = {}

    def __call__(self, output, target):
        key = (
            str(jax.tree.map(lambda a: (jnp.shape(a), jnp.result_type(a)), output)),
            jnp.shape(target),
            jnp.result_type(target),
        )
        if key not in self._lowered:
            example = (jax.tree.map(_example_tensor, output), _example_tensor(target))
            try:
                self._lowered[key] = from_torch(
                    self.loss,
                    example,
                    state={"inputs": [], "outputs": []},
                    dynamic_batch=False,
                    custom_ops=self.custom_ops,
                )
            except Exception as err:
                if not isinstance(output, (tuple, list)):
                    raise
                raise ValueError(
                    f"the loss cannot take the model's {len(output)} outputs as a tuple "
                    f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
                    "Pass output=i to apply it to one output."
                ) from err
        return jnp.sum(self._lowered[key].update(output, target))


class _LossModule(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, output, target):
        return self.fn(output, target)


def _example_tensor(a) -> torch.Tensor:
    dtype = {
        np.dtype("float32"): torch.float32,
        np.dtype("float64"): torch.float64,
        np.dtype("int32"): torch.int64,
        np.dtype("int64"): torch.int64,
    }.get(np.dtype(jnp.result_type(a)), torch.float32)
    return torch.zeros(tuple(jnp.shape(a)), dtype=dtype)


def _torch_grads(grads, params) -> dict:
    """The online gradients of the parameters that take one, as torch tensors of their own."""
    out = {}
    for path, param in params.items():
        g = grads.get(path)
        if g is None or not param.requires_grad:
            continue  # frozen parameters get no .grad, as with loss.backward()
        if param.is_cpu and param.dtype in _HOST_COPY:
            # one host copy straight into a new tensor: cheaper than DLPack + clone
            t = torch.from_numpy(np.array(g, dtype=_HOST_COPY[param.dtype]))
        else:
            t = to_torch(g).to(device=param.device, dtype=param.dtype).clone()
        out[path] = t if t.shape == param.shape else t.reshape(param.shape)
    return out


_HOST_COPY = {torch.float32: np.float32, torch.float64: np.float64}


def _accumulate(grads, params) -> None:
    """Add to `.grad` as `loss.backward()` would."""
    for path, g in grads.items():
        param = params[path]
        if param.grad is None:
            param.grad = g
        else:
            param.grad.add_(g)


def _torch_leaves(x) -> list:
    leaves = x if isinstance(x, (tuple, list)) else [x]
    return [t if isinstance(t, torch.Tensor) else torch.as_tensor(np.asarray(t)) for t in leaves]


def _inputs_to_jax(x, step: bool = False):
    if isinstance(x, (tuple, list)):
        return tuple(_to_jax_input(t, step) for t in x)
    return _to_jax_input(x, step)


def _to_jax_input(t, step: bool):
    if isinstance(t, torch.Tensor):
        t = t.detach().unsqueeze(0) if step else t.detach()
        return _small_copy(t) if _copy_is_cheaper(t) else to_jax(t)
    return jnp.asarray(t)[None] if step else jnp.asarray(t)


def _targets_to_jax(t, step: bool = False):
    if isinstance(t, torch.Tensor):
        t = t.detach().unsqueeze(0) if step else t.detach()
        return _small_copy(t) if _copy_is_cheaper(t) else import_tensor(t)
    return jax.tree.map(lambda a: jnp.asarray(a)[None] if step else jnp.asarray(a), t)


# Small CPU inputs (one step) are copied into JAX-owned memory: a JAX computation takes its own
# buffers faster than DLPack-imported ones (measured: ~0.15 ms per step for GRUCell(32, 128),
# batch 32), and the copy of a few KiB costs less. Same dtypes as `to_jax` (no downcast).
_SMALL_INPUT = 1 << 16
_COPYABLE = (torch.float32, torch.int32, torch.bool)


def _copy_is_cheaper(t: torch.Tensor) -> bool:
    return (
        t.device.type == "cpu"
        and t.numel() <= _SMALL_INPUT
        and t.dtype in _COPYABLE
        and not t.is_conj()
        and not t.is_neg()
    )


def _small_copy(t: torch.Tensor):
    return t.numpy()
