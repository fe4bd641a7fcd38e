"""UORO: Unbiased Online Recurrent Optimization (Tallec & Ollivier, 2017).

RTRL carries the influence matrix ``G^t = dh^t/dtheta`` forward: ``G^t = D^t G^{t-1} + J^t``,
``D^t = dh^t/dh^{t-1}`` (the full hidden-to-hidden Jacobian, recurrent matmuls included) and
``J^t = dh^t/dtheta`` at fixed ``h^{t-1}``. UORO keeps a rank-one estimate ``G ~ s theta^T``
instead: one hidden-shaped factor ``s`` and one parameter-shaped factor ``theta`` per parameter,
memory ``O(|h| + |theta|)``. Each step draws a Rademacher vector ``nu`` (one per hidden group,
independent) and updates

    rho0 = sqrt((|theta| + eps) / (|D s| + eps)),   rho1 = sqrt((|nu^T J| + eps) / (|nu| + eps))
    s     <- rho0 D s + rho1 nu
    theta <- theta / rho0 + (nu^T J) / rho1

``E[s theta^T]`` then follows the RTRL recursion exactly (the cross terms are odd in ``nu``,
``E[nu nu^T] = I``). ``D s`` is a JVP of the step along ``s`` and ``nu^T J`` a VJP of the step's
new hidden states w.r.t. the parameters: no Jacobian is formed, any op the step uses is covered.

The gradient of a loss of the step's outputs is Tallec & Ollivier's: the exact gradient at fixed
``h^{t-1}`` plus ``(dL/dh^{t-1} . s^{t-1}) theta^{t-1}`` (the factors *before* this step's
update). A zero carrier (first step) therefore gives the exact one-step gradient, whatever
``nu``. With ``vjp_method='multi-step'`` and ``MultiStepData`` the same holds per window: exact
BPTT inside, the rank-one carrier across windows.

One rank-one pair spans every hidden group and every parameter, so the estimate is unbiased for
the full RTRL gradient (= BPTT), cross-group paths included; each group draws its own ``nu``.
The estimate is noisy: ``approximate_options`` says so, always.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Optional

import brainstate
import jax
import jax.numpy as jnp
import numpy as np

from etrace_core.compiler.errors import NotCompiledError
from etrace_core.compiler.jaxpr_tools import eval_jaxpr
from etrace_core.compiler.positions import reachable
from etrace_core.executor import data
from etrace_core.executor.step import split_outputs, step_invals

from .base import ETraceAlgorithm, ETraceState, _committed, zero_cotangent

__all__ = ["UORO"]

Path = tuple[str, ...]

S_TILDE, THETA_TILDE, KEY, STEP = "s_tilde", "theta_tilde", "key", "step"
BLOCK = 0  # index of the rank-one pair in the ``theta_tilde`` keys (etrace keeps one pair)


class Layout(NamedTuple):
    """Static layout of the rank-one carrier for one compiled graph."""

    graph: Any  # ETraceGraph
    groups: tuple  # (index, hidden paths, varshape, num_state, dtype) per hidden group
    hidden: tuple[Path, ...]  # every hidden path, group by group
    params: tuple[Path, ...]  # parameter (leaf) paths whose value reaches a hidden state


def make_layout(graph) -> Layout:
    """The carrier's layout: hidden groups as compiled, parameters reaching a hidden state."""
    minfo = graph.module_info
    groups = []
    for g in graph.hidden_groups:
        dtype = jnp.result_type(*[v.aval.dtype for v in g.hidden_outvars])
        groups.append((g.index, tuple(g.hidden_paths), tuple(g.varshape), g.num_state, dtype))
    hidden = tuple(p for g in groups for p in g[1])
    hidden_out = set(minfo.hidden_outvars)
    params = tuple(
        p
        for p, v in minfo.param_invars.items()
        if jnp.issubdtype(v.aval.dtype, jnp.inexact) and reachable(minfo.jaxpr, [v]) & hidden_out
    )
    return Layout(graph, tuple(groups), hidden, params)


def rademacher(key, step, group_index, shape, dtype):
    """The default projection draw: +-1 with equal probability (``E[nu nu^T] = I``)."""
    del step, group_index
    return jax.random.rademacher(key, shape, dtype=dtype)


def init_carrier(layout: Layout, key) -> dict[str, Any]:
    """Zero factors, the projection key and the step count."""
    minfo = layout.graph.module_info
    avals = minfo.param_invars
    return {
        S_TILDE: {i: np.zeros(shape + (n,), dtype) for i, _, shape, n, dtype in layout.groups},
        THETA_TILDE: {
            (BLOCK, p): np.zeros(avals[p].aval.shape, avals[p].aval.dtype) for p in layout.params
        },
        KEY: key,
        STEP: np.zeros((), np.int32),
    }


def _step(graph, flat, values):
    """(flat outputs, new state values by path) of one step of the compiled graph."""
    minfo = graph.module_info
    outvals = eval_jaxpr(minfo.jaxpr, minfo.closed_jaxpr.consts, step_invals(graph, flat, values))
    return split_outputs(graph, outvals)


def _unstack(layout: Layout, per_group) -> dict[Path, Any]:
    """{hidden path: array} from per-group stacks ``varshape + (num_state,)``."""
    out = {}
    for i, paths, _, _, _ in layout.groups:
        for s, p in enumerate(paths):
            out[p] = per_group[i][..., s]
    return out


def _stack(layout: Layout, per_path) -> dict[int, Any]:
    return {
        i: jnp.stack([per_path[p] for p in paths], axis=-1) for i, paths, _, _, _ in layout.groups
    }


def _norm(tree, dtype):
    leaves = jax.tree.leaves(tree)
    return jnp.sqrt(
        sum(jnp.sum(jnp.square(x.astype(dtype))) for x in leaves) + jnp.zeros((), dtype)
    )


def advance(layout: Layout, eps: float, draw: Callable, flat, values, carrier):
    """One step: (flat outputs, new state values, the carrier after the step)."""
    graph = layout.graph
    params = {p: values[p] for p in layout.params}
    hidden = {p: values[p] for p in layout.hidden}

    def hidden_map(ps, hs):
        outs, new = _step(graph, flat, {**values, **ps, **hs})
        return {p: new[p] for p in layout.hidden}, (outs, new)

    s_old, theta_old = carrier[S_TILDE], carrier[THETA_TILDE]
    tangent = {p: t.astype(hidden[p].dtype) for p, t in _unstack(layout, s_old).items()}
    _, d_s, (outs, new_values) = jax.jvp(
        lambda hs: hidden_map(params, hs), (hidden,), (tangent,), has_aux=True
    )
    keys = jax.random.split(carrier[KEY], len(layout.groups) + 1)
    nu = {
        i: draw(keys[1 + k], carrier[STEP], i, shape + (n,), s_old[i].dtype)
        for k, (i, _, shape, n, _) in enumerate(layout.groups)
    }
    _, pull = jax.vjp(lambda ps: hidden_map(ps, hidden)[0], params)
    nu_flat = _unstack(layout, nu)
    (proj,) = pull({p: nu_flat[p].astype(hidden[p].dtype) for p in layout.hidden})

    d_s = _stack(layout, d_s)
    theta = {p: theta_old[(BLOCK, p)] for p in layout.params}
    acc = jnp.result_type(jnp.float32, *[x.dtype for x in jax.tree.leaves([s_old, theta])])
    rho0 = jnp.sqrt((_norm(theta, acc) + eps) / (_norm(d_s, acc) + eps))
    rho1 = jnp.sqrt((_norm(proj, acc) + eps) / (_norm(nu, acc) + eps))
    new_carrier = {
        S_TILDE: {i: (rho0 * d_s[i] + rho1 * nu[i]).astype(s_old[i].dtype) for i in s_old},
        THETA_TILDE: {
            (BLOCK, p): (theta[p] / rho0 + proj[p] / rho1).astype(theta[p].dtype)
            for p in layout.params
        },
        KEY: keys[0],
        STEP: carrier[STEP] + 1,
    }
    return outs, new_values, new_carrier


def carrier_grads(layout: Layout, carrier, dh) -> dict[Path, Any]:
    """``(dL/dh . s) theta`` by parameter path, for dL/dh by hidden path."""
    s = _unstack(layout, carrier[S_TILDE])
    scale = sum(jnp.sum(dh[p] * s[p].astype(dh[p].dtype)) for p in layout.hidden if p in dh)
    return {p: scale * carrier[THETA_TILDE][(BLOCK, p)] for p in layout.params}


def _add(grads, extra):
    out = dict(grads)
    for p, g in extra.items():
        out[p] = g.astype(out[p].dtype) + out[p] if out.get(p) is not None else g
    return out


def _step_grads(layout: Layout, flat, params, rest, carrier, cts):
    """(parameter gradients, input gradients) of one step for output cotangents ``cts``."""

    def outputs(ps, hs, xs):
        return _step(layout.graph, xs, {**rest, **ps, **hs})[0]

    hidden = {p: rest[p] for p in layout.hidden}
    _, pull = jax.vjp(outputs, params, hidden, list(flat))
    dparams, dh, dflat = pull(list(cts))
    return _add(dparams, carrier_grads(layout, carrier, dh)), dflat


def online_step(layout, eps, draw, params, rest, carrier, flat):
    """One online step whose VJP w.r.t. ``params`` is the UORO gradient."""

    def primal(p, r, c, f):
        return advance(layout, eps, draw, f, {**r, **p}, c)

    def fwd(p, r, c, f):
        return primal(p, r, c, f), (p, r, c, f)

    def bwd(res, cts):
        p, r, c, f = res
        grads, dflat = _step_grads(layout, f, p, r, c, cts[0])
        return grads, _zeros(r), _zeros(c), [_zero_or(a, d) for a, d in zip(f, dflat)]

    fn = jax.custom_vjp(primal)
    fn.defvjp(fwd, bwd)
    return fn(params, rest, carrier, flat)


def online_chunk(layout, eps, draw, rebuild, params, rest, carrier, seq):
    """k single steps (MultiStepData, single-step VJP): the sum of the per-step gradients."""

    def scan(p, r, c, s):
        return _scan_steps(layout, eps, draw, rebuild, p, r, c, s, keep_before=True)

    def primal(p, r, c, s):
        return scan(p, r, c, s)[:3]

    def fwd(p, r, c, s):
        outs, last, c_f, before = scan(p, r, c, s)
        return (outs, last, c_f), (p, before, s, r, c)

    def bwd(res, cts):
        p, (rs, cs), s, r, c = res

        def body(total, item):
            r_t, c_t, xs_t, ct_t = item
            flat = jax.tree.leaves(rebuild(xs_t))
            grads, _ = _step_grads(layout, flat, p, r_t, c_t, ct_t)
            return _add(total, grads), None

        zero = jax.tree.map(jnp.zeros_like, p)
        grads, _ = jax.lax.scan(body, zero, (rs, cs, s, cts[0]))
        return grads, _zeros(r), _zeros(c), _zeros(s)

    fn = jax.custom_vjp(primal)
    fn.defvjp(fwd, bwd)
    return fn(params, rest, carrier, seq)


def online_window(layout, eps, draw, executor, args, params, rest, carrier):
    """A multi-step window: exact BPTT inside, ``(dL/dh^0 . s) theta`` across windows."""
    seq, rebuild = data.split_for_scan(args)

    def scan(p, r, c, s):
        return _scan_steps(layout, eps, draw, rebuild, p, r, c, s, keep_before=False)[:3]

    def fwd(p, r, c, s):
        it = iter(s)
        window_args = tuple(
            data.MultiStepData(next(it)) if isinstance(a, data.MultiStepData) else a for a in args
        )
        window_fn = executor.window_vjp(window_args, {**r, **p}).vjp_fn
        return scan(p, r, c, s), (window_fn, p, r, c, s)

    def bwd(res, cts):
        window_fn, p, r, c, s = res
        dparams, dh0, _ = window_fn(jax.tree.leaves(cts[0]))
        grads = _add(dparams, carrier_grads(layout, c, dh0))
        return grads, _zeros(r), _zeros(c), _zeros(s)

    fn = jax.custom_vjp(scan)
    fn.defvjp(fwd, bwd)
    return fn(params, rest, carrier, seq)


def _scan_steps(layout, eps, draw, rebuild, p, r, c, s, *, keep_before):
    """k steps forward: (outputs, last written states, final carrier, before), where `before`
    holds each step's (rest, carrier) going in when `keep_before` (else None)."""

    def body(carry, xs_t):
        r, c = carry
        flat = jax.tree.leaves(rebuild(xs_t))
        outs, new, c2 = advance(layout, eps, draw, flat, {**r, **p}, c)
        r2 = dict(r)
        r2.update({q: v for q, v in new.items() if q in r})
        return (r2, c2), (outs, new, (r, c) if keep_before else None)

    (_, c_f), (outs, new, before) = jax.lax.scan(body, (r, c), s)
    return outs, jax.tree.map(lambda v: v[-1], new), c_f, before


def _zeros(tree):
    return jax.tree.map(zero_cotangent, tree)


def _zero_or(a, d):
    return zero_cotangent(a) if d is None else d


def _initial_key(projection_key):
    """A raw PRNG key from an int seed or a key (typed keys are unwrapped)."""
    if isinstance(projection_key, (int, np.integer)):
        return jax.random.PRNGKey(int(projection_key))
    key = jnp.asarray(projection_key) if not _is_typed_key(projection_key) else projection_key
    if _is_typed_key(key):
        key = jax.random.key_data(key)
    return key


def _is_typed_key(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


class UORO(ETraceAlgorithm):
    """UORO: a rank-one, unbiased, noisy estimate of the RTRL influence matrix (see module).

    ``projection_key``: the seed (int) or PRNG key of the projection stream: the same key gives
    the same gradients; ``init_etrace_state(key=...)`` restarts the stream from another key
    (``reset_state`` from ``projection_key``). No global random state is read.
    ``projection_eps`` (> 0): added to every norm of the balancing ratios (a zero carrier would
    give 0/0). ``vjp_method='multi-step'`` (braintrace's default): MultiStepData windows get
    exact BPTT inside; ``'single-step'``: each step of a window is an online step.

    Under ``compile(..., vmap=True)`` every sample carries its own pair, all started from the
    same key (the draws are then shared across samples: still unbiased, not independent).
    ``trace_dtype`` is the factors' storage dtype.

    Memory: the factors, ``|h| + |theta|`` numbers. Each step costs about three evaluations of
    the step (forward, a JVP along ``s``, a VJP for ``nu^T J``), whatever the ops.
    """

    #: the rank-one estimate is approximate by construction; not a per-weight compiler finding
    approximate_reason = (
        "random rank-one estimate of the influence matrix (UORO): unbiased for the RTRL "
        "gradient (= BPTT), not equal to it: its variance grows with the sequence length"
    )

    #: run_online's compiled driver runs the base trace plan, not this carrier: it refuses UORO
    uses_trace_plan = False

    def __init__(
        self,
        model: brainstate.nn.Module,
        name: Optional[str] = None,
        vjp_method: str = "multi-step",
        fast_solve: bool = True,
        projection_key: Any = 42,
        projection_eps: float = 1e-12,
        **kwargs,
    ):
        eps = float(projection_eps)
        if not (eps > 0.0 and float(np.float32(eps)) > 0.0):
            raise ValueError(
                f"projection_eps must be positive (and positive in float32), got "
                f"{projection_eps!r}: it guards the 0/0 of the balancing ratios at the first "
                "step; the default is 1e-12"
            )
        super().__init__(model, name=name, vjp_method=vjp_method, fast_solve=fast_solve, **kwargs)
        self.projection_key = projection_key
        self.projection_eps = eps

    @property
    def approximate_options(self) -> tuple[str, ...]:
        """Why the gradient differs from BPTT: always the rank-one estimate."""
        return (self.approximate_reason,)

    def trace_kinds(self):
        # the base's trace plan is built but unused: UORO carries its own rank-one factors
        return ["param"] * len(self.graph.hidden_param_op_relations)

    def _build(self, args) -> None:
        super()._build(args)
        self._compiled.layout = make_layout(self.graph)

    @property
    def _layout(self) -> Optional[Layout]:
        return getattr(self._compiled, "layout", None)

    def _draw_projection(self, key, step, group_index, shape, dtype):
        """One group's projection vector ``nu`` (braintrace's name for this seam): Rademacher.

        An override must be a pure function of its arguments (it runs inside scan and jit)."""
        return rademacher(key, step, group_index, shape, dtype)

    # -- carrier --------------------------------------------------------------------------------

    def init_etrace_state(self, *args, key=None, **kwargs) -> None:
        """Zero factors; the projection stream starts from `key` (default: projection_key)."""
        self._require_plan()
        start = _initial_key(self.projection_key if key is None else key)
        value = init_carrier(self._layout, start)
        if self.trace_dtype is not None:  # storage dtype of the factors
            for part in (S_TILDE, THETA_TILDE):
                value[part] = {k: v.astype(self.trace_dtype) for k, v in value[part].items()}
        if not isinstance(start, jax.core.Tracer):
            value = _committed(value, self.model)
            self.running_index.value = _committed(np.zeros((), np.int32), self.model)
        else:
            self.running_index.value = jnp.zeros((), jnp.int32)
        if self.etrace is None:
            self.etrace = ETraceState(value)
        else:
            self.etrace.value = value

    def reset_state(self, *args, **kwargs) -> None:
        """Zero the factors and restart the projection stream from ``projection_key``."""
        if self.etrace is not None:
            self.init_etrace_state()

    def _get_etrace_data(self) -> dict[str, Any]:
        """The carrier: ``s_tilde`` {group}, ``theta_tilde`` {(0, path)}, ``key``, ``step``."""
        self._require_etrace()
        return self.etrace.value

    def get_etrace_of(self, weight) -> dict[Any, Any]:
        """The parameter factors of one weight (path or ParamState): {(0, leaf path): theta}."""
        self._require_etrace()
        path = self._weight_path(weight)
        theta = self.etrace.value[THETA_TILDE]
        out = {k: v for k, v in theta.items() if k[1][: len(path)] == path}
        if not out:
            raise KeyError(
                f"{path} has no UORO factor; parameters reaching a hidden state: "
                f"{list(self._layout.params)}"
            )
        return out

    def trace_sizes(self) -> dict[str, int]:
        """Number of scalars each factor holds: ``s_tilde`` per group, ``theta_tilde`` per path."""
        self._require_etrace()
        value = self.etrace.value
        out = {f"s_tilde{i}": int(np.prod(v.shape)) for i, v in value[S_TILDE].items()}
        out.update(
            {f"theta_tilde{k[1]}": int(np.prod(v.shape)) for k, v in value[THETA_TILDE].items()}
        )
        return out

    def show_graph(self, verbose: bool = True, return_msg: bool = False):
        msg = self.executor.show_graph(verbose=False, return_msg=True)
        if self._layout is not None:
            lay = self._layout
            lines = [
                "Algorithm UORO: one rank-one pair (s_tilde over every hidden group, theta_tilde "
                "per parameter)",
                f"  approximate: {self.approximate_reason}",
                f"  parameters with a factor: {list(lay.params)}",
            ]
            msg = msg + "\n" + "\n".join(lines)
        if verbose:
            print(msg)
        return msg if return_msg else None

    # -- stepping -------------------------------------------------------------------------------

    def _draw(self):
        return self._draw_projection

    def _run_step(self, args, states):
        params, rest = self._split_values(states)
        flat = jax.tree.leaves(args)
        outs, new_values, carrier = online_step(
            self._layout, self.projection_eps, self._draw(), params, rest, self.etrace.value, flat
        )
        self._finish(new_values, carrier, states)
        return jax.tree.unflatten(self.graph.module_info.out_tree, outs)

    def _run_chunk(self, args, states):
        seq, rebuild = data.split_for_scan(args)
        params, rest = self._split_values(states)
        outs, new_values, carrier = online_chunk(
            self._layout,
            self.projection_eps,
            self._draw(),
            rebuild,
            params,
            rest,
            self.etrace.value,
            seq,
        )
        self._finish(new_values, carrier, states)
        return jax.tree.unflatten(self.graph.module_info.out_tree, outs)

    def _run_window(self, args, states):
        params, rest = self._split_values(states)
        outs, new_values, carrier = online_window(
            self._layout,
            self.projection_eps,
            self._draw(),
            self.executor,
            args,
            params,
            rest,
            self.etrace.value,
        )
        self._finish(new_values, carrier, states)
        return jax.tree.unflatten(self.graph.module_info.out_tree, outs)

    def _finish(self, new_values, carrier, states):
        if self.check_finite:
            leaves = jax.tree.leaves([carrier[S_TILDE], carrier[THETA_TILDE]])
            ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
            brainstate.transform.jit_error_if(
                jnp.logical_not(ok),
                "non-finite value in the UORO factors; lower the learning rate or check the "
                "model's inputs",
            )
        self._write(new_values, carrier, states)

    def _require_etrace(self):
        if self._layout is None:
            raise NotCompiledError(f"{type(self).__name__} is not compiled: call .compile_graph")
        super()._require_etrace()
