"""Hidden perturbation: dL/dh^t as the VJP of the step w.r.t. zero perturbations added to h^t."""
from __future__ import annotations

from typing import Any, NamedTuple, Tuple

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from .jaxpr_tools import bind_eqn, read_var
from .module_info import ModuleInfo, Path


class HiddenPerturbation(NamedTuple):
    """Perturbations `p` added to each hidden state where the step produces it (h^t + p).

    Every consumer of h^t inside the step, and the step's outputs, see h^t + p, so the VJP of the
    outputs w.r.t. `p` at p = 0 is dL/dh^t, including same-step downstream paths.
    """
    perturb_paths: Tuple[Path, ...]
    perturb_vars: Tuple[Any, ...]

    @property
    def perturb_avals(self):
        return tuple(v.aval for v in self.perturb_vars)

    def init_perturb_data(self):
        return {p: jnp.zeros(a.shape, a.dtype) for p, a in zip(self.perturb_paths, self.perturb_avals)}

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
            env[v] = o + perturbations[add[v]] if v in add else o
    return [read_var(env, v) for v in jaxpr.outvars]


def add_hidden_perturbation_from_minfo(minfo: ModuleInfo) -> HiddenPerturbation:
    """The perturbation of every hidden state the step writes."""
    outvars = minfo.state_outvars
    produced = {v for eqn in minfo.jaxpr.eqns for v in eqn.outvars}
    paths = tuple(p for p in minfo.hidden_paths if outvars[p] in produced)
    return HiddenPerturbation(perturb_paths=paths, perturb_vars=tuple(outvars[p] for p in paths))


def add_hidden_perturbation_in_module(model, *args) -> HiddenPerturbation:
    """The hidden perturbation of `model` stepped with `args`."""
    from .module_info import extract_module_info
    return add_hidden_perturbation_from_minfo(extract_module_info(model, *args))
