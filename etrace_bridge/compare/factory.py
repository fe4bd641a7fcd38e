"""Which model to train: a built-in name or `path/to/file.py:factory`; its initial state."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from etrace_bridge.conventions import required_positional

from .config import CompareConfig, CompareError, is_file_spec, one_line, torch_dtype
from .models import MODEL_NAMES, build_model, initial_state
from .tasks import SequenceTask


class ModelFactory(NamedTuple):
    """`build(n_in, n_out) -> nn.Module`; `spec` as given, `source` usable from another process."""

    spec: str
    source: str
    build: Callable[[int, int], nn.Module]


def resolve_model(spec: str, hidden: int) -> ModelFactory:
    """A built-in model name ('gru', 'lstm', 'lif', 'leaky') or 'path/to/file.py:factory'."""
    if not is_file_spec(spec):
        if spec not in MODEL_NAMES:
            raise CompareError(
                f"unknown model {spec!r}; expected one of {', '.join(MODEL_NAMES)} "
                "or path/to/file.py:factory"
            )
        return ModelFactory(
            spec, spec, lambda n_in, n_out: build_model(spec, n_in, n_out, n_hidden=hidden)
        )
    path_text, _, attr = spec.rpartition(":") if ":" in spec else (spec, "", "factory")
    path = Path(path_text).expanduser().resolve()
    factory = _load_factory(path, attr or "factory", spec)
    return ModelFactory(spec, f"{path}:{attr or 'factory'}", factory)


def _load_factory(path: Path, attr: str, spec: str) -> Callable:
    if not path.is_file():
        raise CompareError(f"model file {str(path)!r} not found (from --model {spec})")
    name = (
        path.stem
        if path.stem.isidentifier() and path.stem not in sys.modules
        else f"_etrace_user_model_{abs(hash(str(path)))}"
    )
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise CompareError(f"cannot import {str(path)!r} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    sys.path.insert(0, str(path.parent))
    try:
        module_spec.loader.exec_module(module)
    except BaseException as err:  # SystemExit too: a user file must not end the command
        sys.modules.pop(name, None)
        raise CompareError(f"importing model file {str(path)!r} failed: {one_line(err)}") from err
    finally:
        sys.path.remove(str(path.parent))
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise CompareError(
            f"model file {str(path)!r} has no callable {attr!r} "
            "(expected factory(n_in, n_out) -> torch.nn.Module)"
        )
    return factory


def make_model(factory: ModelFactory, task: SequenceTask, cfg: CompareConfig) -> nn.Module:
    """The seeded initial model every method starts from, in the configured dtype."""
    torch.manual_seed(cfg.seed)
    try:
        model = factory.build(task.n_in, task.n_out)
    except Exception as err:
        raise CompareError(
            f"building model {factory.spec}({task.n_in}, {task.n_out}) failed: {one_line(err)}"
        ) from err
    if not isinstance(model, nn.Module):
        raise CompareError(
            f"model factory {factory.spec} returned {type(model).__name__}, not a torch.nn.Module"
        )
    model = model.to(torch_dtype(cfg.dtype))
    if hasattr(model, "reset_state"):
        model.reset_state(1)  # buffers follow the new dtype
    return model


def zero_state(model: nn.Module, batch: int) -> tuple[torch.Tensor, ...]:
    """Initial recurrent state for `forward(x, *state)`; () for buffer-state models (reset here).

    Understood: `reset_state(batch)` (state in buffers), the model's own
    `initial_state(batch)`, the built-in models, and stateless `forward(x)` models.
    """
    if hasattr(model, "reset_state"):
        model.reset_state(batch)
        return ()
    own = getattr(model, "initial_state", None)
    if callable(own):
        state = own(batch)
        return tuple(state) if isinstance(state, (tuple, list)) else (state,)
    try:
        return initial_state(model, batch)
    except TypeError:
        pass
    if _state_arguments(model) == 0:
        return ()
    raise CompareError(
        f"{type(model).__name__}.forward takes {_state_arguments(model)} state argument(s) but the "
        "model has no initial_state(batch_size) method returning them (or, for state kept in "
        "buffers, a reset_state(batch_size) method)"
    )


def _state_arguments(model: nn.Module) -> int:
    """State arguments of `forward(x, *state)`: its required positional arguments after `x`."""
    return max(0, required_positional(model) - 1)


def torch_outputs(model: nn.Module, xs: torch.Tensor) -> torch.Tensor:
    """Run the torch model over a time-major sequence without gradients; outputs (T, B, ...)."""
    state = zero_state(model, xs.shape[1])
    outputs, training = [], model.training
    model.eval()
    try:
        with torch.no_grad():
            for x in xs:
                out = model(x, *state)
                if state:
                    out, *state = out
                outputs.append(out)
    finally:
        model.train(training)
    return torch.stack(outputs)
