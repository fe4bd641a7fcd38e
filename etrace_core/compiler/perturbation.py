"""Hidden perturbation: dL/dh^t as the VJP of the step w.r.t. zero perturbations added to h^t."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from .jaxpr_tools import RELABEL, bind_eqn, read_var
from .module_info import ModuleInfo, Path
from .positions import MANY, relabel_table, static_values


class HiddenPerturbation(NamedTuple):
    """Perturbations `p` added to each hidden state where the step produces it (h^t + p).

    Every consumer of h^t inside the step, and the step's outputs, see h^t + p, so the VJP of the
    outputs w.r.t. `p` at p = 0 is dL/dh^t, including same-step downstream paths.
    """

    perturb_paths: tuple[Path, ...]
    perturb_vars: tuple[Any, ...]

    @property
    def perturb_avals(self):
        return tuple(v.aval for v in self.perturb_vars)

    def init_perturb_data(self):
        return {
            p: jnp.zeros(a.shape, a.dtype) for p, a in zip(self.perturb_paths, self.perturb_avals)
        }

    def perturbed_jaxpr(self, minfo: ModuleInfo) -> jcore.ClosedJaxpr:
        """The step as a jaxpr taking the perturbations as extra trailing inputs."""
        n = len(minfo.jaxpr.invars)

        def run(*flat):
            return perturbed_eval(minfo, self, flat[:n], dict(zip(self.perturb_paths, flat[n:])))

        avals = [v.aval for v in minfo.jaxpr.invars] + list(self.perturb_avals)
        return jax.make_jaxpr(run)(*[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals])


def perturbed_eval(minfo: ModuleInfo, perturb: HiddenPerturbation, invals, perturbations):
    """Evaluate the step, adding `perturbations[path]` to each hidden state where it is made."""
    jaxpr = minfo.jaxpr
    add = dict(zip(perturb.perturb_vars, perturb.perturb_paths))
    env = dict(zip(jaxpr.constvars, minfo.closed_jaxpr.consts))
    env.update(zip(jaxpr.invars, invals))
    for eqn in jaxpr.eqns:
        outs = bind_eqn(eqn, [read_var(env, v) for v in eqn.invars])
        for v, o in zip(eqn.outvars, outs):
            if isinstance(v, jcore.DropVar):
                continue
            env[v] = o + jnp.reshape(perturbations[add[v]], jnp.shape(o)) if v in add else o
    return [read_var(env, v) for v in jaxpr.outvars]


def add_hidden_perturbation_from_minfo(minfo: ModuleInfo) -> HiddenPerturbation:
    """The perturbation of every hidden state the step writes, placed where the state is made.

    A state that reaches the output only through copies (stacked with others, then sliced back,
    as torch's multi-layer RNN states are) is perturbed at the value it copies, so consumers of
    that value inside the step (the next layer) are included in dL/dh.
    """
    outvars = minfo.state_outvars
    produced = {v for eqn in minfo.jaxpr.eqns for v in eqn.outvars}
    paths = tuple(p for p in minfo.hidden_paths if outvars[p] in produced)
    static = static_values(minfo.closed_jaxpr)
    return HiddenPerturbation(
        perturb_paths=paths,
        perturb_vars=tuple(production_point(minfo, outvars[p], static) for p in paths),
    )


def production_point(minfo: ModuleInfo, var, static):
    """The earliest variable of which `var` is an exact copy (same elements in the same flat
    order, possibly reshaped) through relabelling ops.

    Walks back from `var` through its producers while all of its elements come from one
    operand (pulling positions back through each op's relabelling table): linear in the length
    of the copy chain.
    """
    producer = {v: eqn for eqn in minfo.jaxpr.eqns for v in eqn.outvars}
    size = int(np.prod(var.aval.shape, dtype=int))
    best, current, positions = var, var, np.arange(size)
    while True:
        eqn = producer.get(current)
        if eqn is None or eqn.primitive.name not in RELABEL:
            return best
        out = eqn.outvars.index(current)
        table = relabel_table(eqn, static)
        if table is None:
            return best
        out_size = int(np.prod(current.aval.shape, dtype=int))
        operand, position = np.full(out_size, -1), np.full(out_size, -1)
        for i, target in table[out]:
            if np.any(target == MANY):
                continue  # one element copied to several places: no single pull-back
            hit = target >= 0
            operand[target[hit]], position[target[hit]] = i, np.nonzero(hit)[0]
        sources = operand[positions]
        if np.any(sources < 0) or np.any(sources != sources[0]):
            return best
        current, positions = eqn.invars[int(sources[0])], position[positions]
        if isinstance(current, jcore.Literal):
            return best
        if (
            int(np.prod(current.aval.shape, dtype=int)) == size
            and current.aval.dtype == var.aval.dtype
            and np.array_equal(positions, np.arange(size))
            and current in producer
        ):
            best = current


def add_hidden_perturbation_in_module(model, *args) -> HiddenPerturbation:
    """The hidden perturbation of `model` stepped with `args`."""
    from .module_info import extract_module_info

    return add_hidden_perturbation_from_minfo(extract_module_info(model, *args))
