"""ETraceVjpGraphExecutor against hand-written oracles (float64, 1e-10).

For every model of ``tests/core/models.py`` (batched and unbatched) one solve is compared with
``jax.jacobian`` / ``jax.grad`` of the model's step written by hand:

- D (group transition, ETP outputs held fixed): per-unit blocks, zeros elsewhere;
- df (ETP output -> hidden, canonical layout, at the positions ``y_to_hidden`` names);
- canonical X (``X @ W_canon`` reproduces the op output);
- dL/dh^t (perturbation where h^t is produced), direct gradients, input gradients.
"""

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import etrace_core as ec
from etrace_core.compiler.errors import NotCompiledError
from etrace_core.ops import rule_for

from . import models as M

TOL = dict(rtol=1e-10, atol=1e-10)
BATCHES = [None, 2]


# ---------------------------------------------------------------------------- set-up


def setup(case, batch, sign=1.0, seed=0):
    model = case.make(batch)
    M.set_random_hidden(model, key=seed, overrides=case.hidden_ranges)
    x = case.x(batch, sign)
    ex = ec.ETraceVjpGraphExecutor(model)
    ex.compile_graph(x)
    params = M.param_values(model)
    h_prev = {p: st.value for p, st in model.states(brainstate.HiddenState).items()}
    return model, x, ex, params, h_prev


def w_canon(rel, params):
    """The relation's weight (and bias row) in canonical (I[+1], O) form."""
    w = params[rel.weight_path]
    name = rel.primitive.name
    if name == "etp_matmul":
        fn = rel.params.get("weight_fn")  # e.g. einsum's block-diagonal placement
        w = w if fn is None else fn(w)
        W = w if rel.params["w_layout"] == "io" else w.T
    elif name == "etp_conv":
        assert rel.params["feature_group_count"] == 1
        W = w.reshape(w.shape[0], -1).T
    else:
        W = rel.params["fn"](w).reshape(1, -1)
    if rel.bias_path is not None:
        W = jnp.concatenate([W, params[rel.bias_path][None]], axis=0)
    return W


# ---------------------------------------------------------------------------- checks


def check_D(graph, Ds, J, cut=True):
    """Ds equal the per-unit blocks of J; everything else in J is zero (cross-group: if cut)."""
    groups = graph.hidden_groups
    assert len(Ds) == len(groups)
    for g, D in zip(groups, Ds):
        n, S = g.size, g.num_state
        assert D.shape == tuple(g.varshape) + (S, S)
        for s, dst in enumerate(g.hidden_paths):
            for s2, src in enumerate(g.hidden_paths):
                block = np.asarray(J[dst][src]).reshape(n, n)
                np.testing.assert_allclose(
                    np.asarray(D[..., s, s2]).reshape(n),
                    np.diag(block),
                    **TOL,
                    err_msg=f"D[{dst} <- {src}]",
                )
                off = block - np.diag(np.diag(block))
                assert np.abs(off).max(initial=0) == 0, f"{dst} <- {src} mixes units"
    if cut:
        for g in groups:
            for h in groups:
                if g is h:
                    continue
                for dst in g.hidden_paths:
                    for src in h.hidden_paths:
                        assert np.abs(np.asarray(J[dst][src])).max(initial=0) == 0, (
                            f"cut step has a path {src} -> {dst} across groups"
                        )


def check_df(graph, dfs, ys, dh_dy):
    """dfs[(k, g)][l, o, s] = d h_s[unit(l, o)] / d y_k[pos(l, o)]; nothing else reaches h."""
    keys = M.relation_keys(graph)
    all_paths = [p for g in graph.hidden_groups for p in g.hidden_paths]
    for k, rel in enumerate(graph.hidden_param_op_relations):
        y = ys[keys[k]]
        pos = np.asarray(
            rule_for(rel.primitive).y_canon(rel.params, np.arange(y.size).reshape(y.shape))
        )
        reached = set()
        for gi, g in enumerate(rel.hidden_groups):
            m = np.asarray(rel.y_to_hidden[gi])
            assert m.shape == pos.shape
            df = np.asarray(dfs[(k, g.index)])
            assert df.shape == m.shape + (g.num_state,)
            for s, path in enumerate(g.hidden_paths):
                reached.add(path)
                Jf = np.asarray(dh_dy[path][keys[k]]).reshape(g.size, y.size)
                expected = np.where(m >= 0, Jf[np.clip(m, 0, None), pos], 0.0)
                np.testing.assert_allclose(
                    df[..., s],
                    expected,
                    **TOL,
                    err_msg=f"df of relation {k} ({rel.weight_path}) -> {path}",
                )
                rest = Jf.copy()
                rest[m[m >= 0], pos[m >= 0]] = 0.0
                assert np.abs(rest).max(initial=0) == 0, (
                    f"relation {k} reaches {path} at positions y_to_hidden does not name"
                )
        for path in set(all_paths) - reached:
            assert np.abs(np.asarray(dh_dy[path][keys[k]])).max(initial=0) == 0, (
                f"relation {k} ({rel.weight_path}) reaches {path} but lists no such group"
            )
    assert set(dfs) == {
        (k, g.index) for k, r in enumerate(graph.hidden_param_op_relations) for g in r.hidden_groups
    }


def check_xs(graph, xs, params, ys):
    keys = M.relation_keys(graph)
    assert set(xs) == set(range(len(graph.hidden_param_op_relations)))
    for k, rel in enumerate(graph.hidden_param_op_relations):
        X = xs[k]
        W = w_canon(rel, params)
        assert X.shape[-1] == W.shape[0]
        Y = rule_for(rel.primitive).y_canon(rel.params, ys[keys[k]])
        np.testing.assert_allclose(X @ W, Y, **TOL, err_msg=f"X of relation {k}")
        if rel.bias_path is not None:
            np.testing.assert_array_equal(X[..., -1], 1.0)


def run_all_checks(case, batch, sign=1.0):
    """Solve one step (jitted: one XLA compilation) and compare everything with the oracles."""
    model, x, ex, params, h_prev = setup(case, batch, sign)
    graph = ex.graph
    out_shape = jax.eval_shape(lambda: M.oracle_forward(case, params, h_prev, x)[0]).shape
    cot = M.rand(7, *out_shape)
    orc = M.oracles(case, params, h_prev, x, cot, keys=M.relation_keys(graph))

    step, values = M.pure_step(model)

    def loss(pv):
        return jnp.sum(step({**values, **pv}, x)[0] * cot)

    def solve(x, cot):
        *result, residuals = ex.solve_h2w_h2h_l2h_jacobian(x)
        # the exact same-step gradient of the untraced parameters, from the model itself
        exact = jax.grad(loss)({p: values[p] for p in case.untraced})
        return result, residuals(cot), exact

    # jitted: one XLA compilation instead of one per primitive (eager use: test_solvers_are_pure)
    (out, new_h, others, (xs, dfs), Ds), (direct, dl_dh, dx), exact = jax.jit(solve)(x, cot)

    np.testing.assert_allclose(out, orc.outputs, **TOL)
    assert set(new_h) == set(orc.h_new) and others == {}
    for p in orc.h_new:
        np.testing.assert_allclose(new_h[p], orc.h_new[p], **TOL)

    check_D(graph, Ds, orc.dh_dh_cut)
    if case.full_exact:
        check_D(graph, Ds, orc.dh_dh_full, cut=False)
    check_df(graph, dfs, orc.ys, orc.dh_dy)
    check_xs(graph, xs, params, orc.ys)

    assert set(dl_dh) == set(orc.dL_dh)
    for p in orc.dL_dh:
        np.testing.assert_allclose(dl_dh[p], orc.dL_dh[p], **TOL, err_msg=f"dL/d{p}")
    np.testing.assert_allclose(dx[0], orc.dL_dx, **TOL)

    # direct gradients: untraced parameters get the exact same-step gradient, traced weights 0
    # (parameters with their own param-dim traces, e.g. the conv kernel before the RNN, too)
    assert set(direct) == set(params)
    own = {r.path for r in ex.param_trace_relations}
    for p in set(case.untraced) - own:
        np.testing.assert_allclose(direct[p], exact[p], **TOL, err_msg=f"direct grad {p}")
    if case.name not in M.SKIP_PATH_CASES:
        traced = {
            p for r in graph.hidden_param_op_relations for p in (r.weight_path, r.bias_path) if p
        }
        traced |= own
        for p in traced:
            assert np.abs(np.asarray(direct[p])).max() == 0, f"{p} has a direct gradient"
    return model, x, ex, dfs


# ---------------------------------------------------------------------------- oracle tests


@pytest.mark.parametrize("batch", BATCHES, ids=["unbatched", "batched"])
@pytest.mark.parametrize("name", [c.name for c in M.CASES])
def test_solver_matches_hand_written_oracle(x64, name, batch):
    run_all_checks(M.CASE_BY_NAME[name], batch)


@pytest.mark.parametrize("batch", BATCHES, ids=["unbatched", "batched"])
def test_cond_other_branch(x64, batch):
    """With sum(x) < 0 the other branch runs: W_a's df is zero, W_b's is not."""
    _, _, ex, dfs = run_all_checks(M.CASE_BY_NAME["cond"], batch, sign=-1.0)
    by_path = {r.weight_path: k for k, r in enumerate(ex.graph.hidden_param_op_relations)}
    assert np.abs(dfs[(by_path[("W_a", "weight")], 0)]).max() == 0
    assert np.abs(dfs[(by_path[("W_b", "weight")], 0)]).max() > 0


def test_skip_path_weight_gets_only_the_skip_gradient(x64):
    """A relation whose output also reaches the model output directly: the direct gradient is
    exactly the skip path's (the path through h is left to the traces)."""
    case = M.CASE_BY_NAME["skip"]
    model, x, ex, params, h_prev = setup(case, 2)
    *_, resid = ex.solve_h2w_h2h_l2h_jacobian(x)
    cot = M.rand(3, 2, 4)
    direct = resid(cot)[0]
    np.testing.assert_allclose(direct[("W", "weight")], x.T @ cot, **TOL)
    np.testing.assert_allclose(direct[("W", "bias")], cot.sum(0), **TOL)


def test_partial_fan_out_direct_gradient(x64):
    """Only the output half of the fused product (which skips h) gives a direct gradient."""
    case = M.CASE_BY_NAME["partial"]
    model, x, ex, params, h_prev = setup(case, 2)
    out, new_h, *_, resid = ex.solve_h2w_h2h_l2h_jacobian(x)
    cot = M.rand(3, 2, 4)
    direct = resid(cot)[0]
    g_y = jnp.concatenate([jnp.zeros((2, 4)), cot * new_h[("h",)]], axis=-1)
    np.testing.assert_allclose(direct[("W", "weight")], x.T @ g_y, **TOL)
    np.testing.assert_allclose(direct[("W", "bias")], g_y.sum(0), **TOL)


def test_conv_recurrence_y_to_hidden(x64):
    """Conv outputs are canonical channels-last; each lands in the same (b, c, i, j) unit."""
    case = M.CASE_BY_NAME["conv_leaky"]
    for batch in BATCHES:
        graph = ec.compile_etrace_graph(case.make(batch), case.x(batch))
        units = np.arange(2 * 2 * 25 if batch else 2 * 25).reshape(
            ((2,) if batch else ()) + (2, 5, 5)
        )
        expected = np.moveaxis(units, -3, -1)
        for rel in graph.hidden_param_op_relations:
            np.testing.assert_array_equal(rel.y_to_hidden[0], expected)


def test_fused_gate_y_to_hidden(x64):
    """Column o of the (I, 3H) product lands in unit o % H of its batch row."""
    case = M.CASE_BY_NAME["fused"]
    for batch, varshape in ((None, (4,)), (3, (3, 4))):
        model = case.make(batch)
        graph = ec.compile_etrace_graph(model, case.x(batch))
        (rel,) = graph.hidden_param_op_relations
        np.testing.assert_array_equal(
            rel.y_to_hidden[0], M.unit_of_output(varshape, 12, lambda o: o % 4)
        )


def test_rnn_y_to_hidden_is_identity(x64):
    case = M.CASE_BY_NAME["rnn"]
    graph = ec.compile_etrace_graph(case.make(2), case.x(2))
    for rel in graph.hidden_param_op_relations:
        np.testing.assert_array_equal(rel.y_to_hidden[0], np.arange(10).reshape(2, 5))
        assert rel.is_identity_map(0)


# ---------------------------------------------------------------------------- control flow

CONTROL_FLOW = [
    (M.NestedJitLeaky, M.nested_jit_oracle),
    (M.SubstepLeaky, M.substep_oracle),
    (M.WhileLeaky, M.substep_oracle),
    (M.WhileMixInput, M.while_mix_oracle),
]


@pytest.mark.parametrize(
    "cls, oracle", CONTROL_FLOW, ids=["nested_jit", "fori_scan", "while", "while_mixing_input"]
)
def test_control_flow_steps(x64, cls, oracle):
    """Nested jit inlined; weight-free scan / while loops that produce the hidden state work
    (a while loop has no reverse-mode rule in JAX: its VJP is assembled from JVPs), and a
    position-mixing while loop on the input still gives the exact dL/dx."""
    case = M.Case(
        cls.__name__,
        M.initialised(cls),
        M.signed_input(3),
        groups=(M.G("h"),),
        relations=((M.P("W.weight"), (M.G("h"),)),),
        untraced=(),
        oracle=oracle,
        full_exact=True,
    )
    graph = ec.compile_etrace_graph(case.make(None), case.x(None))
    assert [r.weight_path for r in graph.hidden_param_op_relations] == [("W", "weight")]
    for batch in BATCHES:
        model, x, ex, _ = run_all_checks(case, batch)
    names = {e.primitive.name for e in ex.graph.module_info.jaxpr.eqns}
    assert not names & {"pjit", "jit", "closed_call"}
    if cls is M.SubstepLeaky:
        assert "scan" in names
    if cls in (M.WhileLeaky, M.WhileMixInput):
        assert "while" in names


# ---------------------------------------------------------------------------- multi-step data


@pytest.mark.parametrize("name", ["lstm", "lif"])
def test_multi_step_equals_stepping(x64, name):
    case = M.CASE_BY_NAME[name]
    model = case.make(2)
    M.set_random_hidden(model, overrides=case.hidden_ranges)
    xs = jnp.stack([case.x(2) * (1 + 0.5 * t) for t in range(3)])
    ex = ec.ETraceVjpGraphExecutor(model)
    ex.compile_graph(ec.MultiStepData(xs))
    h0 = {p: st.value for p, st in model.states(brainstate.HiddenState).items()}
    stacked = ex.solve_h2w_h2h_jacobian(ec.MultiStepData(xs))
    # unchanged model states after the multi-step solve
    for p, v in h0.items():
        np.testing.assert_array_equal(model.states()[p].value, v)
    hidden = model.states(brainstate.HiddenState)
    for t in range(3):
        out, new_h, others, (xs_t, dfs_t), Ds = ex.solve_h2w_h2h_jacobian(xs[t])
        np.testing.assert_allclose(stacked[0][t], out, **TOL)
        for p in new_h:
            np.testing.assert_allclose(stacked[1][p][t], new_h[p], **TOL)
        for k in xs_t:
            np.testing.assert_allclose(stacked[3][0][k][t], xs_t[k], **TOL)
        for k in dfs_t:
            np.testing.assert_allclose(stacked[3][1][k][t], dfs_t[k], **TOL)
        for D_stacked, D in zip(stacked[4], Ds):
            np.testing.assert_allclose(D_stacked[t], D, **TOL)
        for p, v in new_h.items():
            hidden[p].value = v


# ---------------------------------------------------------------------------- purity, state access


def test_solvers_are_pure(x64):
    case = M.CASE_BY_NAME["lstm"]
    model, x, ex, params, h_prev = setup(case, 2)
    before = {p: np.array(st.value) for p, st in model.states().items()}
    r1 = ex.solve_h2w_h2h_l2h_jacobian(x)
    r2 = ex.solve_h2w_h2h_l2h_jacobian(x)
    r3 = ex.solve_h2w_h2h_jacobian(x)
    for p, st in model.states().items():
        assert not isinstance(st.value, jax.core.Tracer)
        np.testing.assert_array_equal(np.asarray(st.value), before[p])
    for a, b, c in zip(jax.tree.leaves(r1[:5]), jax.tree.leaves(r2[:5]), jax.tree.leaves(r3)):
        for v in (a, b, c):
            assert not isinstance(v, jax.core.Tracer)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
    cot = jnp.ones((2, 2))
    g1, g2 = r1[5](cot), r2[5](cot)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the solvers compose with jit, and the model still runs eagerly afterwards
    jitted = jax.jit(lambda x: ex.solve_h2w_h2h_jacobian(x)[4])(x)
    np.testing.assert_allclose(jitted[0], r1[4][0], **TOL)
    np.testing.assert_allclose(model(x), r1[0], **TOL)


def test_graph_before_compile_is_a_clear_error():
    ex = ec.ETraceVjpGraphExecutor(M.RNNReadout())
    assert not ex.is_compiled
    with pytest.raises(NotCompiledError, match="compile_graph"):
        ex.graph
    with pytest.raises(ValueError, match="not compiled"):
        ex.states
    with pytest.raises(NotCompiledError):
        ex.solve_h2w_h2h_jacobian(jnp.zeros(3))


def test_states_and_paths():
    model = M.CounterRNN()
    brainstate.nn.init_all_states(model)
    ex = ec.ETraceVjpGraphExecutor(model)
    ex.compile_graph(jnp.ones(3))
    expected = {
        ("rnn", "h"),
        ("rnn", "W_ih", "weight"),
        ("rnn", "W_ih", "bias"),
        ("rnn", "W_hh", "weight"),
        ("out", "weight"),
        ("out", "bias"),
        ("count",),
    }
    assert set(ex.states.keys()) == expected
    assert ex.path_to_states is ex.states
    assert ex.path_to_states[("rnn", "h")] is model.rnn.h
    assert ex.state_id_to_path[id(model.count)] == ("count",)
    assert ex.state_id_to_path[id(model.rnn.W_hh.weight)] == ("rnn", "W_hh", "weight")
    assert ex.is_single_step_vjp and not ex.is_multi_step_vjp
    out, hidden, others, _, _ = ex.solve_h2w_h2h_jacobian(jnp.ones(3))
    assert set(hidden) == {("rnn", "h")}
    assert set(others) == {("count",)}
    np.testing.assert_allclose(others[("count",)], 1.0)


def test_executor_rejects_non_modules():
    with pytest.raises(TypeError, match="brainstate.nn.Module"):
        ec.ETraceVjpGraphExecutor(lambda x: x)
    with pytest.raises(ValueError, match="vjp_method"):
        ec.ETraceVjpGraphExecutor(M.RNNReadout(), vjp_method="sideways")
    assert ec.ETraceVjpGraphExecutor(M.RNNReadout(), vjp_method="multi-step").is_multi_step_vjp


def test_base_executor_solvers_are_abstract():
    model = M.RNNReadout()
    brainstate.nn.init_all_states(model)
    ex = ec.ETraceGraphExecutor(model)
    ex.compile_graph(jnp.ones(3))
    with pytest.raises(NotImplementedError):
        ex.solve_h2w_h2h_jacobian(jnp.ones(3))
    with pytest.raises(NotImplementedError):
        ex.solve_h2w_h2h_l2h_jacobian(jnp.ones(3))


def test_multi_step_residuals_are_bptt_inside_the_window(x64):
    """With MultiStepData the residuals are the window's VJP: exact BPTT over its k steps,
    w.r.t. every parameter and the hidden states at the window's start."""
    case = M.CASE_BY_NAME["lstm"]
    model = case.make(2)
    M.set_random_hidden(model)
    xs = jnp.stack([case.x(2) * (1 + 0.5 * t) for t in range(3)])
    ex = ec.ETraceVjpGraphExecutor(model, vjp_method="multi-step")
    ex.compile_graph(ec.MultiStepData(xs))
    *stacked, resid = ex.solve_h2w_h2h_l2h_jacobian(ec.MultiStepData(xs))
    cots = M.rand(5, 3, 2, 2)
    dparams, dh0, _ = resid(cots)

    step, values = M.pure_step(model)
    hidden = list(model.states(brainstate.HiddenState).keys())
    params = list(model.states(brainstate.ParamState).keys())

    def unrolled(pv, h0):
        vals = {**values, **pv, **h0}
        total = 0.0
        for t in range(3):
            out, vals = step(vals, xs[t])
            total = total + jnp.sum(out * cots[t])
        return total

    g_p, g_h = jax.grad(unrolled, argnums=(0, 1))(
        {p: values[p] for p in params}, {p: values[p] for p in hidden}
    )
    for p in params:
        np.testing.assert_allclose(dparams[p], g_p[p], **TOL, err_msg=str(p))
    for p in hidden:
        np.testing.assert_allclose(dh0[p], g_h[p], **TOL, err_msg=str(p))


def test_float32_solver_matches_oracle():
    """Default precision: the same comparisons, to float32 accuracy."""
    case = M.CASE_BY_NAME["gru2"]
    model, x, ex, params, h_prev = setup(case, 2)
    assert x.dtype == jnp.float32
    cot = M.rand(7, 2, 2)

    def solve(x, cot):
        *result, residuals = ex.solve_h2w_h2h_l2h_jacobian(x)
        return result[4], residuals(cot)[1]

    Ds, dl_dh = jax.jit(solve)(x, cot)
    orc = M.oracles(case, params, h_prev, x, cot)
    loose = dict(rtol=2e-5, atol=2e-6)
    for g, D in zip(ex.graph.hidden_groups, Ds):
        (p,) = g.hidden_paths
        block = np.asarray(orc.dh_dh_cut[p][p]).reshape(g.size, g.size)
        np.testing.assert_allclose(np.asarray(D).reshape(-1), np.diag(block), **loose)
    assert Ds[0].dtype == jnp.float32
    for p in orc.dL_dh:
        np.testing.assert_allclose(dl_dh[p], orc.dL_dh[p], **loose)
