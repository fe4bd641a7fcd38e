"""OnlineLearner: train a torch recurrent model online; gradients land in the parameters' `.grad`."""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import torch

import etrace_core

from .algorithms import make_algorithm
from .arrays import import_tensor, to_jax, to_torch
from .errors import UnsupportedModelError
from .losses import resolve_loss
from .module import TorchModule, from_torch

class OnlineLearner:
    """Online training of a torch model with eligibility traces.

    `step(x_t, target_t)` runs one time step, returns the step's loss (a torch scalar) and adds
    the online gradient to each torch parameter's `.grad` (as `loss.backward()` would), so any
    `torch.optim` optimizer can take the step. `run(xs, targets)` does a whole time-major
    sequence in one compiled call. Parameters are re-read from torch at every call, so in-place
    optimizer updates are always seen. A model returning several outputs (snntorch
    `output=True`: `(spk, mem)`) needs `output=i`, the output the loss applies to, unless
    `loss` is a torch callable that takes the whole tuple.
    """

    def __init__(self, module: torch.nn.Module, *, algorithm: str = "es_d_rtrl",
                 loss: Any = "mse", example_inputs: Any, custom_ops=None, state=None,
                 dynamic_batch: bool = True, output: Optional[int] = None,
                 **algorithm_options):
        self.torch_module = module
        _refuse_complex_parameters(module)
        self.model: TorchModule = from_torch(module, example_inputs, state=state,
                                             dynamic_batch=dynamic_batch, custom_ops=custom_ops)
        self.algorithm_name = algorithm
        self.algorithm = make_algorithm(algorithm, self.model, **algorithm_options)
        self._example = self.model.example_step_inputs()
        self.algorithm.compile_graph(*self._example)
        self.algorithm.init_etrace_state()
        self.loss_fn = select_output(_jax_loss(loss, self.model, self._example, custom_ops),
                                     loss, output, _output_shapes(self.model, self._example))
        self._params = self.model.torch_parameters()

    # -- training -------------------------------------------------------------------------------

    def step(self, x_t, target_t) -> torch.Tensor:
        """One online step; returns the loss and accumulates gradients into `p.grad`."""
        xs = jax.tree.map(lambda a: a[None], _inputs_to_jax(x_t))
        ys = jax.tree.map(lambda a: a[None], _targets_to_jax(target_t))
        return self._run(xs, ys)

    def run(self, xs, targets) -> torch.Tensor:
        """A whole time-major sequence (T, B, ...) in one compiled call; returns the summed loss."""
        return self._run(_inputs_to_jax(xs), _targets_to_jax(targets))

    def _run(self, xs, ys) -> torch.Tensor:
        self.model.sync_from_torch()
        args = xs if isinstance(xs, tuple) else (xs,)
        self._ensure_batch(args)
        result = etrace_core.run_online(self.algorithm, self.loss_fn, args, ys)
        self._accumulate(result.grads)
        return torch.from_numpy(np.array(result.loss))

    def _accumulate(self, grads) -> None:
        for path, param in self._params.items():
            g = grads.get(path)
            if g is None or not param.requires_grad:
                continue  # frozen parameters get no .grad, as with loss.backward()
            g = to_torch(g).to(device=param.device, dtype=param.dtype).reshape(param.shape)
            if param.grad is None:
                param.grad = g.clone()
            else:
                param.grad.add_(g)

    def _ensure_batch(self, args) -> None:
        """Each step's inputs must have the shapes the graph was compiled for."""
        compiled = [tuple(v.aval.shape) for v in self.algorithm.graph.module_info.arg_invars]
        given = [tuple(jnp.shape(a))[1:] for a in jax.tree.leaves(args)]
        if compiled != given:
            raise ValueError(
                f"step inputs have shapes {given} but the learner was compiled for {compiled}; "
                "for another batch size call reset_state(batch_size) first")

    # -- state ----------------------------------------------------------------------------------

    def reset_state(self, batch_size: Optional[int] = None) -> None:
        """Hidden states back to their initial values and traces to zero (for `batch_size`)."""
        self.model.reset_state(batch_size)
        if batch_size is not None and batch_size != self._graph_batch():
            self._example = self.model.example_step_inputs(batch_size)
            self.algorithm.compile_graph(*self._example)
        self.algorithm.init_etrace_state()

    def _graph_batch(self):
        groups = self.algorithm.graph.hidden_groups
        return groups[0].varshape[0] if groups and groups[0].varshape else None

    def state_dict(self) -> Dict[str, Any]:
        """Hidden/dynamic model states and eligibility traces, as torch tensors."""
        states = self.model.states().filter(lambda path, st: not isinstance(st, brainstate.ParamState))
        return {
            "algorithm": self.algorithm_name,
            "model_states": {".".join(p): _to_tensor(st.value) for p, st in states.items()},
            "etrace": jax.tree.map(_to_tensor, self.algorithm.etrace.value),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore what `state_dict` saved; the learner then continues bit for bit."""
        if state.get("algorithm") != self.algorithm_name:
            raise ValueError(f"state was saved by a {state.get('algorithm')!r} learner, this one "
                             f"runs {self.algorithm_name!r}")
        states = self.model.states()
        by_name = {".".join(p): st for p, st in states.items()}
        missing = set(state["model_states"]) - set(by_name)
        if missing:
            raise KeyError(f"state_dict holds states this model does not have: {sorted(missing)}")
        for name, value in state["model_states"].items():
            by_name[name].value = _from_tensor(value)
        shapes = [tuple(np.shape(v)) for v in jax.tree.leaves(state["etrace"])]
        if shapes and shapes != [tuple(v.shape) for v in jax.tree.leaves(
                self.algorithm.etrace.value)]:
            self.algorithm.compile_graph(*self.model.example_step_inputs(
                _batch_of_states(self.model)))
            self.algorithm.init_etrace_state()
        self.algorithm.etrace.value = jax.tree.map(_from_tensor, state["etrace"])

    # -- inspection -----------------------------------------------------------------------------

    def show_graph(self, verbose: bool = True, return_msg: bool = False):
        """The compiled graph (etrace_core's summary) plus what the bridge knows from the torch
        model's structure: parameters whose gradient is approximate, with the reason."""
        msg = self.algorithm.show_graph(verbose=False, return_msg=True)
        notes = self.model.approximations
        if notes:
            msg += "\nFrom the torch model's structure:\n" + "\n".join(
                f"  {name}: {note}" for name, note in notes.items())
        if verbose:
            print(msg)
        return msg if return_msg else None


def _refuse_complex_parameters(module: torch.nn.Module) -> None:
    names = [n for n, p in module.named_parameters() if p.is_complex()]
    if names:
        raise UnsupportedModelError(
            f"complex parameter(s) {', '.join(f'`{n}`' for n in names)}: online gradients are "
            "computed for real parameters only (a complex one would get a wrong imaginary "
            "part). Keep its real and imaginary parts as two real nn.Parameters and build it in "
            "forward with torch.complex(re, im); complex states and ops are supported.")


def _output_shapes(model: TorchModule, example) -> Any:
    """The output's shape, or a list of shapes for a tuple output (one eager step; hidden states
    put back)."""
    hidden = model.states(brainstate.HiddenState)
    saved = {k: st.value for k, st in hidden.items()}
    try:
        out = model.update(*example)
    finally:
        for k, st in hidden.items():
            st.value = saved[k]
    if isinstance(out, (tuple, list)):
        return [jax.tree.map(jnp.shape, o) for o in out]
    return jax.tree.map(jnp.shape, out)


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
                "that takes the whole tuple: loss(outputs, target).")
        return loss_fn
    if not is_tuple:
        if output != 0:
            raise ValueError(f"output={output}: the model returns a single output; use "
                             "output=0 or leave it out")
        return loss_fn
    if not -len(shapes) <= output < len(shapes):
        raise ValueError(f"output={output} is out of range: the model returns {len(shapes)} "
                         f"outputs (shapes {shapes})")
    return lambda out, target: loss_fn(out[output], target)


def _jax_loss(loss, model: TorchModule, example, custom_ops) -> Callable:
    """A JAX loss(output, target) from a name, or from a torch loss exported by the bridge."""
    if isinstance(loss, str):
        return resolve_loss(loss, backend="jax")
    if not callable(loss):
        raise TypeError(f"loss must be a name ('mse', 'cross_entropy') or a torch loss, got {loss!r}")
    return _TorchLoss(loss, custom_ops)


class _TorchLoss:
    """A torch loss module/function exported once (per output/target shape) through the bridge."""

    def __init__(self, loss, custom_ops):
        self.loss = loss if isinstance(loss, torch.nn.Module) else _LossModule(loss)
        self.custom_ops = custom_ops
        self._lowered = {}

    def __call__(self, output, target):
        key = (str(jax.tree.map(lambda a: (jnp.shape(a), jnp.result_type(a)), output)),
               jnp.shape(target), jnp.result_type(target))
        if key not in self._lowered:
            example = (jax.tree.map(_example_tensor, output), _example_tensor(target))
            try:
                self._lowered[key] = from_torch(
                    self.loss, example, state={"inputs": [], "outputs": []},
                    dynamic_batch=False, custom_ops=self.custom_ops)
            except Exception as err:
                if not isinstance(output, (tuple, list)):
                    raise
                raise ValueError(
                    f"the loss cannot take the model's {len(output)} outputs as a tuple "
                    f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
                    "Pass output=i to apply it to one output.") from err
        return jnp.sum(self._lowered[key].update(output, target))


class _LossModule(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, output, target):
        return self.fn(output, target)


def _example_tensor(a) -> torch.Tensor:
    dtype = {np.dtype("float32"): torch.float32, np.dtype("float64"): torch.float64,
             np.dtype("int32"): torch.int64, np.dtype("int64"): torch.int64}.get(
        np.dtype(jnp.result_type(a)), torch.float32)
    return torch.zeros(tuple(jnp.shape(a)), dtype=dtype)


def _inputs_to_jax(x):
    if isinstance(x, (tuple, list)):
        return tuple(_to_jax_input(t) for t in x)
    return _to_jax_input(x)


def _to_jax_input(t):
    if isinstance(t, torch.Tensor):
        return to_jax(t.detach())
    return jnp.asarray(t)


def _targets_to_jax(t):
    if isinstance(t, torch.Tensor):
        return import_tensor(t)
    return jax.tree.map(jnp.asarray, t)


def _to_tensor(v) -> torch.Tensor:
    return torch.from_numpy(np.array(v))


def _from_tensor(t):
    return jnp.asarray(t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else t)


def _batch_of_states(model):
    for st in model.states(brainstate.HiddenState).values():
        shape = jnp.shape(st.value)
        return shape[0] if shape else None
    return None
