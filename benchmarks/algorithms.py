"""Online algorithms of etrace_core against JAX BPTT and (when installed) braintrace.

Timing: time per training sequence (T = 100 by default) of

- ``etrace_core.run_online`` (one jitted ``lax.scan``) with ES-D-RTRL, D-RTRL and hybrid;
- JAX BPTT: ``jax.jit(jax.value_and_grad(...))`` through a ``lax.scan`` of the same model's pure
  one-step function (the model's own jaxpr, from ``etrace_core.extract_module_info``), same loss;
- braintrace 0.2.x ``pp_prop`` (ES-D-RTRL) and ``D_RTRL`` on the same network written with
  ``braintrace.nn`` layers, driven by braintrace's own sequence driver
  (``learner.etrace_grad``: the whole sequence in one ``brainstate.transform.jit`` + scan).

All cases of one model run in the same process, interleaved round by round, after warm-up;
the median is reported. braintrace is an optional peer, never a dependency: without it its
columns read ``n/a`` and its goals ``SKIP``.

Models (batch 32, input 32, hidden 128, 10 outputs, MSE loss summed over time):

- ``gru``: ``etrace_core.nn.GRUCell`` (torch's fused-gate GRU) + ``Linear`` readout;
- ``gru_bt``: the GRU of ``braintrace.nn.GRUCell`` (three ``Linear`` maps on ``[x, h]`` /
  ``[x, r*h]``) + ``Linear`` readout, written once with ``etrace_core.nn.Linear`` and once with
  ``braintrace.nn`` -- identical math, the braintrace comparison for the GRU (braintrace cannot
  trace the fused-gate GRU: its compiler drops weights whose output is split into gates);
- ``lif``: ``etrace_core.nn.LIF(recurrent=True)`` + ``LeakyRateReadout`` (and the same equations
  over ``braintrace.nn.Linear`` on the braintrace side).

Memory: peak RSS of a fresh process per (model, method, T) that builds the model and runs one
training sequence of T steps; inputs and targets are drawn inside the scan from a per-step PRNG
key (the same for every method), so no O(T) input storage counts.
"""

from __future__ import annotations

from . import common

if __name__ == "__main__":
    common.pin_threads()

import math
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import numpy as np

import etrace_core
from etrace_core import nn as enn
from etrace_core.nn.base import RecurrentModule

BATCH, N_IN, N_HID, N_OUT = 32, 32, 128, 10
MODELS = ("gru", "gru_bt", "gru_bt_frozen", "lif")
SLOW = ("d_rtrl", "bt_d_rtrl")  # timed in their own interleaved group
ETRACE_METHODS = ("es_d_rtrl", "d_rtrl", "hybrid")
BT_METHODS = ("bt_pp_prop", "bt_d_rtrl")
DECAY = 0.9

# ----------------------------------------------------------------------------------------------
# etrace_core models


class GRUNet(brainstate.nn.Module):
    """``etrace_core.nn.GRUCell`` + ``Linear`` readout."""

    def __init__(self, n_in=N_IN, n_hid=N_HID, n_out=N_OUT, seed=0):
        super().__init__()
        self.rnn = enn.GRUCell(n_in, n_hid, key=seed)
        self.out = enn.Linear(n_hid, n_out, key=seed + 1)

    def update(self, x):
        return self.out(self.rnn(x))


class ConcatGRUCell(RecurrentModule):
    """braintrace's GRU: ``z = sig(Wz [x,h])``, ``r = sig(Wr [x,h])``,
    ``h~ = tanh(Wh [x, r*h])``, ``h' = (1-z) h + z h~``, on ``etrace_core.nn.Linear``."""

    state_names = ("h",)

    def __init__(self, n_in, n_hid, seed=0):
        super().__init__((n_hid,))
        k = jax.random.split(jax.random.PRNGKey(seed), 3)
        self.Wz = enn.Linear(n_in + n_hid, n_hid, key=k[0])
        self.Wr = enn.Linear(n_in + n_hid, n_hid, key=k[1])
        self.Wh = enn.Linear(n_in + n_hid, n_hid, key=k[2])

    def update(self, x):
        h = self.h.value
        xh = jnp.concatenate([x, h], axis=-1)
        z = jax.nn.sigmoid(self.Wz(xh))
        r = jax.nn.sigmoid(self.Wr(xh))
        cand = jnp.tanh(self.Wh(jnp.concatenate([x, r * h], axis=-1)))
        h = (1 - z) * h + z * cand
        self.h.value = h
        return h


class GRUBTNet(brainstate.nn.Module):
    """``ConcatGRUCell`` + ``Linear`` readout. ``frozen=True`` turns ``Wr`` and the readout into
    constants (plain ``brainstate.State``, no gradient): the set of weights braintrace 0.2.6
    returns non-zero gradients for on this model, for a like-for-like timing."""

    def __init__(self, n_in=N_IN, n_hid=N_HID, n_out=N_OUT, seed=0, frozen=False):
        super().__init__()
        self.rnn = ConcatGRUCell(n_in, n_hid, seed=seed)
        self.out = enn.Linear(n_hid, n_out, key=seed + 1)
        if frozen:
            for lin in (self.rnn.Wr, self.out):
                lin.weight = brainstate.State(lin.weight.value)
                lin.bias = brainstate.State(lin.bias.value)

    def update(self, x):
        return self.out(self.rnn(x))


class LIFNet(brainstate.nn.Module):
    """``etrace_core.nn.LIF(recurrent=True)`` + ``LeakyRateReadout``."""

    def __init__(self, n_in=N_IN, n_hid=N_HID, n_out=N_OUT, seed=0):
        super().__init__()
        self.lif = enn.LIF(
            n_in,
            n_hid,
            recurrent=True,
            key=seed,
            w_rec_init=enn.init.normal(0.5 / math.sqrt(n_hid)),
        )
        self.out = enn.LeakyRateReadout(n_hid, n_out, key=seed + 1)

    def update(self, x):
        return self.out(self.lif(x))


ETRACE_MODELS = {
    "gru": GRUNet,
    "gru_bt": GRUBTNet,
    "gru_bt_frozen": partial(GRUBTNet, frozen=True),
    "lif": LIFNet,
}
INPUT_SCALE = {"gru": 1.0, "gru_bt": 1.0, "gru_bt_frozen": 1.0, "lif": 3.0}
BT_TWIN = {"gru_bt": "gru_bt", "gru_bt_frozen": "gru_bt", "lif": "lif"}  # braintrace twin


class KeyDriven(brainstate.nn.Module):
    """Wraps a network so one step takes a PRNG key and draws its own input from it."""

    def __init__(self, net, batch, n_in, scale=1.0):
        super().__init__()
        self.net, self.batch, self.n_in, self.scale = net, batch, n_in, scale

    def update(self, key):
        return self.net(self.scale * jax.random.normal(key, (self.batch, self.n_in)))


def mse(out, y):
    return jnp.mean((out - y) ** 2)


def key_mse(out, key):
    """MSE against a target drawn from the step's key (the targets of the memory runs)."""
    y = jax.random.normal(jax.random.fold_in(key, 1), out.shape, out.dtype)
    return jnp.mean((out - y) ** 2)


# ----------------------------------------------------------------------------------------------
# braintrace models (built only when braintrace imports)


def have_braintrace() -> bool:
    try:
        import braintrace  # noqa: F401

        return True
    except Exception:
        return False


def _braintrace_models():
    import braintrace

    class BTGRUNet(brainstate.nn.Module):
        def __init__(self, n_in=N_IN, n_hid=N_HID, n_out=N_OUT, seed=0):
            super().__init__()
            self.rnn = braintrace.nn.GRUCell(n_in, n_hid)
            self.out = braintrace.nn.Linear(n_hid, n_out)

        def update(self, x):
            return self.out(self.rnn(x))

    class BTLIF(brainstate.nn.Module):
        """etrace_core.nn.LIF's equations (beta=0, no detach) over braintrace.nn.Linear."""

        def __init__(self, n_in, n_hid, tau_mem=20.0, tau_adapt=100.0, threshold=1.0, beta=0.0):
            super().__init__()
            self.n_hid, self.beta = n_hid, beta
            self.alpha, self.rho = math.exp(-1 / tau_mem), math.exp(-1 / tau_adapt)
            self.threshold = threshold
            self.W_in = braintrace.nn.Linear(n_in, n_hid, b_init=None)
            self.W_rec = braintrace.nn.Linear(n_hid, n_hid, b_init=None)

        def init_state(self, batch_size=None, **kwargs):
            shape = (self.n_hid,) if batch_size is None else (batch_size, self.n_hid)
            self.V = brainstate.HiddenState(jnp.zeros(shape))
            self.a = brainstate.HiddenState(jnp.zeros(shape))

        def spike(self, V, a):
            return enn.spike_fn((V - self.threshold - self.beta * a) / self.threshold)

        def update(self, x):
            V, a = self.V.value, self.a.value
            s = self.spike(V, a)
            current = self.W_in(x) + self.W_rec(s)
            V = self.alpha * V + (1.0 - self.alpha) * current - self.threshold * s
            a = self.rho * a + s
            self.V.value = V
            self.a.value = a
            return self.spike(V, a)

    class BTReadout(brainstate.nn.Module):
        def __init__(self, n_in, n_out, tau=5.0):
            super().__init__()
            self.n_out, self.decay = n_out, math.exp(-1 / tau)
            self.W = braintrace.nn.Linear(n_in, n_out, b_init=None)

        def init_state(self, batch_size=None, **kwargs):
            shape = (self.n_out,) if batch_size is None else (batch_size, self.n_out)
            self.r = brainstate.HiddenState(jnp.zeros(shape))

        def update(self, x):
            r = self.decay * self.r.value + (1.0 - self.decay) * self.W(x)
            self.r.value = r
            return r

    class BTLIFNet(brainstate.nn.Module):
        def __init__(self, n_in=N_IN, n_hid=N_HID, n_out=N_OUT, seed=0):
            super().__init__()
            self.lif = BTLIF(n_in, n_hid)
            self.out = BTReadout(n_hid, n_out)

        def update(self, x):
            return self.out(self.lif(x))

    return {"gru_bt": BTGRUNet, "lif": BTLIFNet}


def copy_params_to_braintrace(model_name: str, et_model, bt_model) -> None:
    """Give the braintrace twin the etrace model's weights (to check both compute the same)."""

    def lin(src, dst, bias=True):
        v = {"weight": src.weight.value}
        if bias:
            v["bias"] = src.bias.value
        dst.weight.value = v

    if model_name == "gru_bt":
        for n in ("Wz", "Wr", "Wh"):
            lin(getattr(et_model.rnn, n), getattr(bt_model.rnn, n))
        lin(et_model.out, bt_model.out)
    elif model_name == "lif":
        lin(et_model.lif.W_in, bt_model.lif.W_in, bias=False)
        lin(et_model.lif.W_rec, bt_model.lif.W_rec, bias=False)
        lin(et_model.out.W, bt_model.out.W, bias=False)


def braintrace_grads_by_etrace_path(model_name: str, grads) -> dict[tuple, Any]:
    """braintrace's {('rnn','Wz','weight'): {'weight','bias'}} as etrace paths."""
    out = {}
    for path, g in grads.items():
        base = tuple(path[:-1])
        if model_name == "lif" and base == ("out", "W"):
            base = ("out", "W")
        if isinstance(g, dict):
            for k, v in g.items():
                out[base + (k,)] = v
        else:
            out[tuple(path)] = g
    return out


# ----------------------------------------------------------------------------------------------
# runners: each returns a zero-argument callable that trains over one sequence and returns
# (summed loss, grads) as JAX arrays


def make_etrace_model(model_name: str, batch: int, key_driven: bool = False, seed: int = 0):
    net = ETRACE_MODELS[model_name](seed=seed)
    model = KeyDriven(net, batch, N_IN, INPUT_SCALE[model_name]) if key_driven else net
    brainstate.nn.init_all_states(model, batch_size=batch)
    return model, net


def make_algorithm(method: str, model, model_name: str, prefix: tuple = ()):
    if method == "es_d_rtrl":
        return etrace_core.ES_D_RTRL(model, decay_or_rank=DECAY)
    if method == "d_rtrl":
        return etrace_core.D_RTRL(model)
    if method == "hybrid":
        # D-RTRL (param-dim) for the input weight, ES-D-RTRL (io-dim) for the recurrent ones.
        # (With the default size threshold the hybrid picks io-dim for every weight of these
        # models and is then identical to ES-D-RTRL.)
        param = {
            "gru": [("rnn", "W_ih", "weight")],
            "gru_bt": [],
            "lif": [("lif", "W_in", "weight")],
        }[model_name]
        return etrace_core.HybridDimVjpAlgorithm(
            model, decay_or_rank=DECAY, mode={prefix + p: "param" for p in param}
        )
    raise ValueError(method)


def etrace_runner(model_name: str, method: str, xs, ys, *, key_driven=False, loss_fn=mse):
    model, _ = make_etrace_model(model_name, xs.shape[1] if not key_driven else BATCH, key_driven)
    algo = make_algorithm(method, model, model_name, ("net",) if key_driven else ())
    algo.compile_graph(xs[0])
    algo.init_etrace_state()

    def run():
        res = etrace_core.run_online(algo, loss_fn, xs, ys)
        return res.loss, res.grads

    run.algo = algo
    run.model = model
    return run


def pure_step(model, example_x):
    """The model's one-step function as a pure function (args, states) -> (out, new states)."""
    minfo = etrace_core.extract_module_info(model, example_x)
    closed = minfo.closed_jaxpr
    values = minfo.state_values()
    params = {p: values[p] for p in minfo.param_paths}
    rest = {p: v for p, v in values.items() if p not in params}

    def step(params, rest, x):
        vals = {**rest, **params}
        outs = jax.core.eval_jaxpr(
            closed.jaxpr, closed.consts, *jax.tree.leaves(x), *[vals[p] for p in minfo.state_paths]
        )
        out = jax.tree.unflatten(minfo.out_tree, outs[: minfo.num_outputs])
        new = dict(zip(minfo.written_paths, outs[minfo.num_outputs :]))
        rest = {p: new.get(p, v) for p, v in rest.items()}
        return out, rest

    return step, params, rest


def bptt_runner(model_name: str, xs, ys, *, key_driven=False, loss_fn=mse):
    model, _ = make_etrace_model(model_name, xs.shape[1] if not key_driven else BATCH, key_driven)
    step, params, rest = pure_step(model, xs[0])

    def total_loss(params, rest, xs, ys):
        def body(rest, inp):
            x, y = inp
            out, rest = step(params, rest, x)
            return rest, loss_fn(out, y)

        _, losses = jax.lax.scan(body, rest, (xs, ys))
        return jnp.sum(losses)

    grad_fn = jax.jit(jax.value_and_grad(total_loss))

    def run():
        return grad_fn(params, rest, xs, ys)

    run.params, run.rest, run.model = params, rest, model
    return run


def braintrace_runner(model_name: str, method: str, xs, ys, *, key_driven=False, copy_from=None):
    """braintrace's learner on the braintrace.nn twin of the model, driven by its own
    ``etrace_grad`` over the sequence inside one ``brainstate.transform.jit``."""
    import braintrace

    bt_net = _braintrace_models()[BT_TWIN[model_name]]()
    if copy_from is not None:
        copy_params_to_braintrace(BT_TWIN[model_name], copy_from, bt_net)
    batch = BATCH if key_driven else xs.shape[1]
    scale = INPUT_SCALE[model_name]
    example = jnp.zeros((batch, N_IN)) if key_driven else xs[0]
    algo, opts = {"bt_pp_prop": ("pp_prop", {"decay_or_rank": DECAY}), "bt_d_rtrl": ("d_rtrl", {})}[
        method
    ]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learner = braintrace.compile(bt_net, algo, example, batch_size=batch, **opts)

    if key_driven:

        def step_loss(key, _):
            out = learner(scale * jax.random.normal(key, (batch, N_IN)))
            return key_mse(out, key)
    else:

        def step_loss(x, y):
            return mse(learner(x), y)

    @brainstate.transform.jit
    def run_seq(xs, ys):
        grads, loss = learner.etrace_grad(
            xs, ys, step_fn=step_loss, reduction="sum", loss_output="scalar", return_value=True
        )
        return loss, grads

    def run():
        return run_seq(xs, ys)

    run.learner, run.model = learner, bt_net
    return run


# ----------------------------------------------------------------------------------------------
# timing


def sequence_data(T: int, batch: int = BATCH, seed: int = 0, scale: float = 1.0):
    kx, ky = jax.random.split(jax.random.PRNGKey(seed))
    xs = scale * jax.random.normal(kx, (T, batch, N_IN))
    ys = jax.random.normal(ky, (T, batch, N_OUT))
    return xs, ys


def _rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def time_model(
    model_name: str,
    *,
    T: int = 100,
    repeats: int = 7,
    warmup: int = 2,
    methods=None,
    with_braintrace: bool = True,
    progress=None,
) -> dict[str, Any]:
    """Interleaved timings of every method on one model: per-call times, medians, minima, the
    first call's time (trace + compile + run) and the etrace methods' trace sizes."""
    methods = list(methods or (ETRACE_METHODS + ("bptt",) + BT_METHODS))
    bt = with_braintrace and have_braintrace() and model_name in BT_TWIN
    if not bt:
        methods = [m for m in methods if m not in BT_METHODS]
    xs, ys = sequence_data(T, scale=INPUT_SCALE[model_name])
    runners: dict[str, Callable] = {}
    compile_s: dict[str, float] = {}
    for m in methods:
        if m in ETRACE_METHODS:
            runners[m] = etrace_runner(model_name, m, xs, ys)
        elif m == "bptt":
            runners[m] = bptt_runner(model_name, xs, ys)
        else:  # the braintrace twin gets the etrace model's weights
            src = runners.get("es_d_rtrl") or runners.get("d_rtrl")
            runners[m] = braintrace_runner(
                model_name, m, xs, ys, copy_from=None if src is None else src.model
            )
        compile_s[m] = common.time_once(runners[m])  # first call: trace + compile + run
    # the fast methods and the slow (param-dim) ones in separate interleaved groups, so that each
    # ratio compares calls of similar length taken under the same load
    timings = {}
    for group in ([m for m in methods if m not in SLOW], [m for m in methods if m in SLOW]):
        if group:
            reps = repeats if group[0] in SLOW else 2 * repeats
            timings.update(
                common.time_interleaved(
                    {m: runners[m] for m in group}, repeats=reps, warmup=warmup, progress=progress
                )
            )
    out = {
        "T": T,
        "batch": xs.shape[1],
        "first_call_s": compile_s,
        "times": {m: t.as_dict() for m, t in timings.items()},
        "median_s": {m: t.median for m, t in timings.items()},
        "min_s": {m: t.best for m, t in timings.items()},
    }
    for m in methods:
        if m in ETRACE_METHODS:
            out.setdefault("trace_sizes", {})[m] = runners[m].algo.trace_sizes()
    return out


def agreement_checks(model_name: str, T: int = 20) -> dict[str, Any]:
    """The timed runs compute what they claim, on a short sequence (T=20: spiking networks in
    float32 drift apart over long ones): D-RTRL's and ES-D-RTRL's gradients against braintrace's
    on the same weights, and every method's summed loss against BPTT's."""
    xs, ys = sequence_data(T, scale=INPUT_SCALE[model_name])
    res, checks = {}, {}
    base = {}
    for m in ("es_d_rtrl", "d_rtrl"):
        run = etrace_runner(model_name, m, xs, ys)
        base[m] = run.model
        res[m] = run()
    res["bptt"] = bptt_runner(model_name, xs, ys)()
    bt = have_braintrace() and model_name in BT_TWIN
    if bt:
        for et, btm in (("es_d_rtrl", "bt_pp_prop"), ("d_rtrl", "bt_d_rtrl")):
            res[btm] = braintrace_runner(model_name, btm, xs, ys, copy_from=base[et])()
    for m in res:
        if m != "bptt":
            checks[f"loss_rel_diff_{m}_vs_bptt"] = _rel_err(res[m][0], res["bptt"][0])
    if bt:
        for et, btm in (("es_d_rtrl", "bt_pp_prop"), ("d_rtrl", "bt_d_rtrl")):
            g_et = res[et][1]
            g_bt = braintrace_grads_by_etrace_path(model_name, res[btm][1])
            zero = [p for p in g_bt if not np.any(np.asarray(g_bt[p]))]
            checks[f"grad_rel_diff_{et}_vs_{btm}"] = {
                "/".join(p): _rel_err(g_et[p], g_bt[p]) for p in g_et if p in g_bt and p not in zero
            }
            checks[f"braintrace_zero_grads_{btm}"] = sorted("/".join(p) for p in zero)
    return checks


# ----------------------------------------------------------------------------------------------
# memory (run in a fresh subprocess through benchmarks.memory)


def memory_case(model: str, method: str, T: int) -> dict[str, Any]:
    """Build `model`, train one sequence of `T` key-driven steps with `method`, block."""
    keys = jax.random.split(jax.random.PRNGKey(0), T)
    if jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key):
        keys = jax.random.key_data(keys)
    if method in ETRACE_METHODS:
        run = etrace_runner(model, method, keys, keys, key_driven=True, loss_fn=key_mse)
    elif method == "bptt":
        run = bptt_runner(model, keys, keys, key_driven=True, loss_fn=key_mse)
    else:
        run = braintrace_runner(model, method, keys, keys, key_driven=True)
    loss, _ = common.block(run())
    return {"loss": float(loss)}


def measure_memory(models, methods, Ts, *, progress=None) -> dict[str, Any]:
    from .memory import peak_rss

    out: dict[str, Any] = {}
    for model in models:
        for method in methods:
            if method in BT_METHODS and (not have_braintrace() or model not in BT_TWIN):
                continue
            for T in Ts:
                r = peak_rss(
                    "benchmarks.algorithms:memory_case", {"model": model, "method": method, "T": T}
                )
                out.setdefault(model, {}).setdefault(method, {})[str(T)] = r
                if progress:
                    progress(f"{model}/{method}/T={T}")
    return out


# ----------------------------------------------------------------------------------------------
# the whole set


def methods_for(model: str, quick: bool = False):
    if model == "gru_bt_frozen":
        return ("es_d_rtrl", "bt_pp_prop")
    if quick:
        return ("es_d_rtrl", "d_rtrl", "bptt") + BT_METHODS
    return ETRACE_METHODS + ("bptt",) + BT_METHODS


def run(*, quick: bool = False, progress=None, log=print) -> dict[str, Any]:
    cfg = dict(T=100, repeats=5 if quick else 11, warmup=1 if quick else 2)
    models = ("gru_bt", "gru_bt_frozen", "lif") if quick else MODELS
    mem_models = ("gru",) if quick else ("gru", "gru_bt", "lif")
    mem_Ts = (100, 1000) if quick else (100, 1000, 10000)
    bt = have_braintrace()
    result: dict[str, Any] = {
        "config": {
            **cfg,
            "models": list(models),
            "batch": BATCH,
            "n_in": N_IN,
            "n_hid": N_HID,
            "n_out": N_OUT,
            "decay": DECAY,
            "memory_T": list(mem_Ts),
            "memory_models": list(mem_models),
            "braintrace": bt,
        },
        "timing": {},
        "memory": {},
        "ratios": {},
        "goals": [],
    }
    if not bt:
        log("braintrace is not importable here: its columns and goals are skipped")
    for model in models:
        methods = methods_for(model, quick)
        log(
            f"\n== timing: {model} (T={cfg['T']}, batch {BATCH}; median [min] of "
            f"{2 * cfg['repeats']} calls, {cfg['repeats']} for D-RTRL) =="
        )
        r = time_model(
            model,
            methods=methods,
            progress=progress,
            T=cfg["T"],
            repeats=cfg["repeats"],
            warmup=cfg["warmup"],
        )
        result["timing"][model] = r
        med = r["median_s"]
        for m, t in med.items():
            log(
                f"  {m:12s} {common.fmt_ms(t)} [{common.fmt_ms(r['min_s'][m]).strip()}] / sequence"
                f"   (first call {r['first_call_s'][m]:.2f} s)"
            )
        ratios = {}
        for m in ETRACE_METHODS:
            if m in med:
                ratios[f"{m}/bptt"] = common.ratio(med[m], med.get("bptt"))
        ratios["es_d_rtrl/bt_pp_prop"] = common.ratio(med.get("es_d_rtrl"), med.get("bt_pp_prop"))
        ratios["d_rtrl/bt_d_rtrl"] = common.ratio(med.get("d_rtrl"), med.get("bt_d_rtrl"))
        ratios = {k: v for k, v in ratios.items() if v is not None}
        result["ratios"][model] = ratios
        for k, v in ratios.items():
            log(f"  ratio {k:22s} {v:6.3f}")
        if model != "gru_bt_frozen":
            r["checks"] = agreement_checks(model)
            for k, v in r["checks"].items():
                log(f"  check {k}: {_short(v)}")

    mem_methods = ("es_d_rtrl", "bptt") if quick else ETRACE_METHODS + ("bptt",) + BT_METHODS
    log(
        f"\n== peak RSS (VmHWM), fresh process per (model, method, T); T = {list(mem_Ts)}; "
        "inputs drawn inside the scan =="
    )
    mem = measure_memory(mem_models, mem_methods, mem_Ts, progress=progress)
    result["memory"] = mem
    for model, per in mem.items():
        for method, byT in per.items():
            vals = [byT[str(T)].get("peak_rss_mib") for T in mem_Ts]
            errs = [byT[str(T)].get("error") for T in mem_Ts if "error" in byT[str(T)]]
            growth = (
                f"  ({100 * (vals[-1] - vals[0]) / vals[0]:+.1f}%)"
                if None not in (vals[0], vals[-1])
                else ""
            )
            log(
                f"  {model:6s} {method:12s} "
                + "  ".join(f"T={T}: {common.fmt_mib(v)}" for T, v in zip(mem_Ts, vals))
                + growth
                + (f"  ERROR {errs[0]}" if errs else "")
            )
    result["goals"] = [g.as_dict() for g in goals(result)]
    log("\n== goals ==")
    for g in goals(result):
        log("  " + g.line())
    return result


def _short(v):
    if isinstance(v, dict):
        return ", ".join(f"{k} {x:.1e}" for k, x in v.items())
    if isinstance(v, list):
        return ", ".join(v) if v else "none"
    return f"{v:.2e}"


def _mem_growth(mem, model, method, T0, T1):
    try:
        a = mem[model][method][str(T0)]["peak_rss_mib"]
        b = mem[model][method][str(T1)]["peak_rss_mib"]
    except KeyError:
        return None, None, None
    return a, b, (b - a) / a


def goals(result) -> list[common.Goal]:
    out = []
    for model in ("gru_bt", "lif", "gru_bt_frozen"):
        if model == "gru_bt_frozen" and model not in result["ratios"]:
            continue
        r = result["ratios"].get(model, {})
        out.append(
            common.Goal(
                f"{model}: ES-D-RTRL time / braintrace pp_prop",
                r.get("es_d_rtrl/bt_pp_prop"),
                0.8,
                detail="" if "es_d_rtrl/bt_pp_prop" in r else "braintrace not installed",
            )
        )
        if model != "gru_bt_frozen":
            out.append(
                common.Goal(
                    f"{model}: D-RTRL time / braintrace D_RTRL",
                    r.get("d_rtrl/bt_d_rtrl"),
                    0.5,
                    detail="" if "d_rtrl/bt_d_rtrl" in r else "braintrace not installed",
                )
            )
    for model in result["ratios"]:
        r = result["ratios"][model]
        if "es_d_rtrl/bptt" in r:
            out.append(
                common.Goal(f"{model}: ES-D-RTRL time / JAX BPTT (T=100)", r["es_d_rtrl/bptt"], 1.0)
            )
    mem = result["memory"]
    Ts = result["config"]["memory_T"]
    for model in mem:
        a, b, growth = _mem_growth(mem, model, "es_d_rtrl", Ts[0], Ts[-1])
        _, _, bptt_growth = _mem_growth(mem, model, "bptt", Ts[0], Ts[-1])
        detail = (
            f"{a:.0f} -> {b:.0f} MiB; BPTT grows {100 * bptt_growth:+.0f}%"
            if growth is not None and bptt_growth is not None
            else ""
        )
        out.append(
            common.Goal(
                f"{model}: ES-D-RTRL peak RSS growth T={Ts[0]} -> {Ts[-1]}",
                None if growth is None else abs(growth),
                0.05,
                detail=detail,
            )
        )
    return out


def main(argv=None) -> int:
    return common.script_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
