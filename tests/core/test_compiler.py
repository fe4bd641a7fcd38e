"""The eligibility-trace compiler: structure of the compiled graph, its summaries, bad input.

The numbers (D, df, dL/dh) are checked against hand-written oracles in ``test_executor.py``;
here every model of ``tests/core/models.py`` has its expected structure asserted explicitly.
"""

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import etrace_core as ec
from etrace_core import nn, ops
from etrace_core.compiler import CompilationError
from etrace_core.compiler.positions import NONE
from etrace_core.ops import rule_for

from . import models as M

BATCHES = [None, 2]


def compiled(case, batch):
    model = case.make(batch)
    return model, ec.compile_etrace_graph(model, case.x(batch))


def group_sets(graph):
    return [frozenset(g.hidden_paths) for g in graph.hidden_groups]


def relation_summary(graph):
    """Sorted (weight path, [sorted paths of each reached group])."""
    return sorted(
        (r.weight_path, [tuple(sorted(g.hidden_paths)) for g in r.hidden_groups])
        for r in graph.hidden_param_op_relations
    )


def expected_relations(case):
    return sorted((w, [tuple(sorted(g)) for g in groups]) for w, groups in case.relations)


# ---------------------------------------------------------------------------- structure per model


@pytest.mark.parametrize("batch", BATCHES, ids=["unbatched", "batched"])
@pytest.mark.parametrize("name", [c.name for c in M.CASES])
def test_structure(name, batch):
    case = M.CASE_BY_NAME[name]
    model, graph = compiled(case, batch)

    # hidden groups: exactly the expected sets of paths, indexed in order
    assert sorted(group_sets(graph), key=sorted) == sorted(case.groups, key=sorted)
    states = model.states()
    for i, g in enumerate(graph.hidden_groups):
        assert g.index == i
        assert g.num_state == len(g.hidden_paths)
        for path, st in zip(g.hidden_paths, g.hidden_states):
            assert st is states[path]
            assert isinstance(st, brainstate.HiddenState)
            assert tuple(g.varshape) == st.value.shape  # the full shape, batch included
            assert graph.hid_path_to_group[path] is g
    assert set(graph.hid_path_to_group) == set().union(*case.groups)

    # relations: which weight reaches which groups
    assert relation_summary(graph) == expected_relations(case)
    for r in graph.hidden_param_op_relations:
        assert r.path == r.weight_path
        # only the documented approximations, and none without weights on the recurrence
        known = ("its input depends on the previous states", "hidden group ")
        assert all(note.startswith(known) for note in r.approximations), r.approximations
        if case.full_exact:
            assert r.approximations == ()
        assert ec.ops.is_etp_primitive(r.primitive)
        assert r.eqn.outvars[0] is r.y
        rule = rule_for(r.primitive)
        canon_shape = rule.y_canon(r.params, np.zeros(r.y.aval.shape)).shape
        assert len(r.y_to_hidden) == len(r.hidden_groups)
        for g, m in zip(r.hidden_groups, r.y_to_hidden):
            assert m.shape == canon_shape
            assert m.dtype.kind == "i"
            assert np.all((m == NONE) | ((m >= 0) & (m < g.size)))
            assert np.any(m >= 0)
        if r.primitive.name == "etp_elemwise":
            assert r.x is None
        else:
            assert r.x is r.eqn.invars[0]
        bias = r.weight_path[:-1] + ("bias",)
        assert r.bias_path == (
            bias
            if bias in dict(model.states(brainstate.ParamState).items())
            and r.primitive.name != "etp_elemwise"
            else None
        )

    # parameters that are not online-traced
    traced = {p for r in graph.hidden_param_op_relations for p in (r.weight_path, r.bias_path) if p}
    params = set(model.states(brainstate.ParamState).keys())
    assert params - traced == set(case.untraced)

    # perturbation: every hidden state, where it is produced
    assert set(graph.hidden_perturb.perturb_paths) == set(graph.hid_path_to_group)


def test_relation_primitives_and_maps():
    _, g = compiled(M.CASE_BY_NAME["coupled"], 2)
    prims = {r.weight_path: r.primitive.name for r in g.hidden_param_op_relations}
    assert prims == {
        ("decay",): "etp_elemwise",
        ("W_u", "weight"): "etp_matmul",
        ("W_v", "weight"): "etp_matmul",
    }
    decay = next(r for r in g.hidden_param_op_relations if r.weight_path == ("decay",))
    # elemwise canonical output: batch_shape + (w.size,), unit b*n + j
    np.testing.assert_array_equal(decay.y_to_hidden[0], np.arange(8).reshape(2, 4))
    assert not decay.has_x

    _, g = compiled(M.CASE_BY_NAME["fanout"], None)
    (shared,) = [r for r in g.hidden_param_op_relations if len(r.hidden_groups) == 2]
    for m in shared.y_to_hidden:
        np.testing.assert_array_equal(m, np.arange(4))


def test_hidden_to_hidden_relation_has_previous_state_as_x():
    """A path h^{t-1} -> h^t through a recurrent weight is a relation whose x is h^{t-1}."""
    for name, layer in (("rnn", "rnn"), ("gru2", "rnn1"), ("gru2", "rnn2"), ("lstm", "lstm")):
        for batch in BATCHES:
            _, graph = compiled(M.CASE_BY_NAME[name], batch)
            minfo = graph.module_info
            (rel,) = [
                r
                for r in graph.hidden_param_op_relations
                if r.weight_path == (layer, "W_hh", "weight")
            ]
            assert rel.x is minfo.state_invars[(layer, "h")]
    _, graph = compiled(M.CASE_BY_NAME["fanout"], 2)
    (rel,) = [r for r in graph.hidden_param_op_relations if r.weight_path == ("W_r", "weight")]
    assert rel.x is graph.module_info.state_invars[("h2",)]
    assert [g.hidden_paths for g in rel.hidden_groups] == [(("h1",),)]


def test_weight_tied_model_has_two_relations_of_one_weight():
    model, graph = compiled(M.CASE_BY_NAME["tied"], 2)
    rels = graph.hidden_param_op_relations
    assert [r.weight_path for r in rels] == [("W", "weight")] * 2
    assert rels[0].eqn is not rels[1].eqn
    assert [g.hidden_paths for g in rels[0].hidden_groups] == [(("h1",),)]
    assert [g.hidden_paths for g in rels[1].hidden_groups] == [(("h2",),)]
    # the second use reads the same-step h1 (not the state), the first the input
    assert rels[0].x is graph.module_info.arg_invars[0]
    assert rels[1].x is not graph.module_info.state_invars[("h1",)]


def test_conv_weight_reaching_hidden_through_a_dense_matmul_gets_a_dense_trace():
    """The seed tutorial's ConvRNN: the kernel reaches h only through the RNN's input matmul, so
    it gets a dense trace in the RNN's group; with no budget for it, same-step, approximate."""
    model = M.CASE_BY_NAME["conv_rnn"].make(None)
    ex = ec.ETraceVjpGraphExecutor(model)
    ex.compile_graph(M.CASE_BY_NAME["conv_rnn"].x(None))
    dense = {r.path: r for r in ex.param_trace_relations}
    assert set(dense) == {("conv", "weight"), ("conv", "bias")}
    assert all(
        r.kind == "dense" and [g.index for g in r.hidden_groups] == [0] for r in dense.values()
    )
    msg = ex.show_graph(verbose=False, return_msg=True)
    assert (
        "  ('conv', 'weight') (18 elements) via etp_conv then etp_matmul -> hidden group 0: dense trace, "
        "72 elements, memory"
    ) in msg

    ex = ec.ETraceVjpGraphExecutor(model, dense_trace_budget=0)
    ex.compile_graph(M.CASE_BY_NAME["conv_rnn"].x(None))
    assert ex.param_trace_relations == ()
    msg = ex.show_graph(verbose=False, return_msg=True)
    assert (
        "('conv', 'weight'): approximate: same-step gradient: its value reaches hidden "
        "group(s) [0] through etp_conv then etp_matmul, which mixes positions; a dense trace dh/dtheta "
        "would hold 72 elements"
    ) in msg


def test_cond_both_branches_analysed():
    model, graph = compiled(M.CASE_BY_NAME["cond"], None)
    names = [e.primitive.name for e in graph.module_info.jaxpr.eqns]
    assert "cond" not in names and "select_n" in names
    assert {r.weight_path for r in graph.hidden_param_op_relations} == {
        ("W_a", "weight"),
        ("W_b", "weight"),
    }
    # the same graph whichever branch the example input takes
    graph2 = ec.compile_etrace_graph(model, M.CASE_BY_NAME["cond"].x(None, sign=-1.0))
    assert relation_summary(graph2) == relation_summary(graph)


def test_nested_jit_is_inlined():
    model = M.NestedJitLeaky()
    brainstate.nn.init_all_states(model)
    graph = ec.compile_etrace_graph(model, jnp.ones(3))
    names = {e.primitive.name for e in graph.module_info.jaxpr.eqns}
    assert not names & {"pjit", "jit", "closed_call"}
    assert [g.hidden_paths for g in graph.hidden_groups] == [(("h",),)]
    assert [r.weight_path for r in graph.hidden_param_op_relations] == [("W", "weight")]


@pytest.mark.parametrize("cls", [M.SubstepLeaky, M.WhileLeaky], ids=["scan", "while"])
def test_weight_free_loop_producing_hidden_state(cls):
    model = cls()
    brainstate.nn.init_all_states(model, 2)
    graph = ec.compile_etrace_graph(model, jnp.ones((2, 3)))
    assert [g.hidden_paths for g in graph.hidden_groups] == [(("h",),)]
    (rel,) = graph.hidden_param_op_relations
    assert rel.weight_path == ("W", "weight") and rel.approximations == ()
    np.testing.assert_array_equal(rel.y_to_hidden[0], np.arange(8).reshape(2, 4))


def test_approximate_relation_is_noted():
    """An output that reaches h element-wise and also through a position-mixing op: traced, with
    a note; one that reaches h only through a mixing op: untraced, with the reason."""

    class Mixed(nn.RecurrentModule):
        state_names = ("h",)

        def __init__(self):
            super().__init__((4,))
            self.A = nn.Linear(3, 4, w_init=M.uinit(1), b_init=M.uinit(2))
            self.B = nn.Linear(3, 4, w_init=M.uinit(3), b_init=M.uinit(4))

        def update(self, x):
            a, b = self.A(x), self.B(x)
            h = 0.9 * self.h.value + jnp.tanh(a) + 0.1 * jnp.cumsum(a) + 0.1 * jnp.cumsum(b)
            self.h.value = h
            return h

    model = Mixed()
    brainstate.nn.init_all_states(model)
    # no budget for dense traces: A keeps its relation (with the note), B its same-step gradient
    ex = ec.ETraceVjpGraphExecutor(model, dense_trace_budget=0)
    ex.compile_graph(jnp.ones(3))
    (rel,) = ex.graph.hidden_param_op_relations
    assert rel.weight_path == ("A", "weight")
    assert len(rel.approximations) == 1 and "cumsum" in rel.approximations[0]
    msg = ex.show_graph(verbose=False, return_msg=True)
    assert "approximate: part of the output reaches hidden states through cumsum" in msg
    assert (
        "('B', 'weight'): approximate: same-step gradient: its value reaches hidden "
        "group(s) [0] through etp_matmul then cumsum"
    ) in msg
    # within the budget both get dense traces, which follow the cumsum paths (A's relation,
    # which drops them, is replaced)
    ex = ec.ETraceVjpGraphExecutor(model)
    ex.compile_graph(jnp.ones(3))
    assert ex.graph.hidden_param_op_relations == ()
    assert {r.path: r.kind for r in ex.param_trace_relations} == {
        (n, k): "dense" for n in "AB" for k in ("weight", "bias")
    }
    msg = ex.show_graph(verbose=False, return_msg=True)
    assert (
        "  ('B', 'weight') (12 elements) via etp_matmul then cumsum -> hidden group 0: dense trace"
    ) in msg
    assert "approximate" not in msg


def test_broadcast_into_several_units_is_dropped_with_the_reason():
    """An unbatched product added to a batched state lands in several units: not traced."""

    class Broadcast(nn.RecurrentModule):
        state_names = ("h",)

        def __init__(self):
            super().__init__((4,))
            self.W = nn.Linear(3, 4, w_init=M.uinit(1), b_init=M.uinit(2))

        def update(self, x):
            h = 0.9 * self.h.value + self.W(jnp.ones(3)) + x
            self.h.value = h
            return h

    model = Broadcast()
    brainstate.nn.init_all_states(model, 2)
    ex = ec.ETraceVjpGraphExecutor(model, dense_trace_budget=0)
    ex.compile_graph(jnp.ones((2, 4)))
    assert ex.graph.hidden_param_op_relations == ()
    assert ex.graph.hidden_param_op_relations == ()
    msg = ex.show_graph(verbose=False, return_msg=True)
    assert "('W', 'weight'): approximate: same-step gradient" in msg
    # within the (default) budget the weight gets a dense trace instead
    ex = ec.ETraceVjpGraphExecutor(model)
    ex.compile_graph(jnp.ones((2, 4)))
    assert {r.path: r.kind for r in ex.param_trace_relations} == {
        ("W", "weight"): "dense",
        ("W", "bias"): "elementwise",
    }


def test_hidden_state_moving_between_units_is_refused():
    class Rolling(nn.RecurrentModule):
        state_names = ("h",)

        def __init__(self):
            super().__init__((4,))
            self.W = nn.Linear(3, 4, w_init=M.uinit(1), b_init=M.uinit(2))

        def update(self, x):
            h = 0.5 * jnp.roll(self.h.value, 1, axis=-1) + self.W(x)
            self.h.value = h
            return h

    model = Rolling()
    brainstate.nn.init_all_states(model)
    with pytest.raises(
        CompilationError, match=r"\('h',\) reaches hidden state \('h',\).*between units"
    ):
        ec.compile_etrace_graph(model, jnp.ones(3))


# ---------------------------------------------------------------------------- graph object & API


def test_etrace_graph_fields_and_alias():
    model, graph = compiled(M.CASE_BY_NAME["lstm"], None)
    assert ec.CompiledGraph is ec.ETraceGraph
    assert isinstance(graph, ec.ETraceGraph)
    assert list(graph.dict().keys()) == [
        "module_info",
        "hidden_groups",
        "hid_path_to_group",
        "hidden_param_op_relations",
        "hidden_perturb",
    ]
    assert graph.dict()["hidden_groups"] is graph.hidden_groups
    minfo = graph.module_info
    assert isinstance(minfo, ec.ModuleInfo)
    assert minfo.num_args == 1 and minfo.num_outputs == 1
    assert set(minfo.hidden_paths) == {("lstm", "h"), ("lstm", "c")}
    assert set(minfo.param_paths) == {
        ("lstm", "W_ih", "weight"),
        ("lstm", "W_ih", "bias"),
        ("lstm", "W_hh", "weight"),
        ("lstm", "W_hh", "bias"),
        ("out", "weight"),
        ("out", "bias"),
    }
    assert minfo.other_paths == ()
    assert len(minfo.jaxpr.invars) == minfo.num_args + len(minfo.state_paths)
    assert len(minfo.jaxpr.outvars) == minfo.num_outputs + len(minfo.written_paths)
    values = minfo.state_values()
    assert set(values) == set(minfo.state_paths)
    (group,) = graph.hidden_groups
    assert isinstance(group, ec.HiddenGroup) and group.num_state == 2 and group.varshape == (4,)
    assert "HiddenGroup(index=0" in repr(group)
    assert "HiddenParamOpRelation(weight_path=" in repr(graph.hidden_param_op_relations[0])


def test_from_minfo_variants_agree():
    case = M.CASE_BY_NAME["gru2"]
    model = case.make(2)
    x = case.x(2)
    minfo = ec.extract_module_info(model, x)
    groups_a, by_path_a = ec.find_hidden_groups_from_minfo(minfo)
    groups_b, by_path_b = ec.find_hidden_groups_from_module(model, x)
    assert [g.hidden_paths for g in groups_a] == [g.hidden_paths for g in groups_b]
    assert [g.varshape for g in groups_a] == [g.varshape for g in groups_b]
    assert set(by_path_a) == set(by_path_b)

    rels_a = ec.find_hidden_param_op_relations_from_minfo(minfo, by_path_a)
    rels_b = ec.find_hidden_param_op_relations_from_module(model, x)
    assert len(rels_a) == len(rels_b) == 4
    for a, b in zip(rels_a, rels_b):
        assert a.weight_path == b.weight_path and a.bias_path == b.bias_path
        assert a.primitive is b.primitive
        assert [g.index for g in a.hidden_groups] == [g.index for g in b.hidden_groups]
        for ma, mb in zip(a.y_to_hidden, b.y_to_hidden):
            np.testing.assert_array_equal(ma, mb)

    pa = ec.add_hidden_perturbation_from_minfo(minfo)
    pb = ec.add_hidden_perturbation_in_module(model, x)
    assert isinstance(pa, ec.HiddenPerturbation)
    assert pa.perturb_paths == pb.perturb_paths
    assert (
        [a.shape for a in pa.perturb_avals] == [a.shape for a in pb.perturb_avals] == [(2, 4)] * 2
    )

    graph = ec.compile_etrace_graph(model, x)
    assert [g.hidden_paths for g in graph.hidden_groups] == [g.hidden_paths for g in groups_a]
    assert [r.weight_path for r in graph.hidden_param_op_relations] == [
        r.weight_path for r in rels_a
    ]
    assert graph.hidden_perturb.perturb_paths == pa.perturb_paths


def test_perturbed_jaxpr_with_zero_perturbation_is_the_step():
    case = M.CASE_BY_NAME["lstm"]
    model, graph = compiled(case, 2)
    M.set_random_hidden(model)
    minfo, pert = graph.module_info, graph.hidden_perturb
    x = case.x(2)
    zeros = pert.init_perturb_data()
    assert set(zeros) == set(pert.perturb_paths)
    closed = pert.perturbed_jaxpr(minfo)
    values = minfo.state_values()
    ins = jax.tree.leaves((x,)) + [values[p] for p in minfo.state_paths]
    outs = jax.core.eval_jaxpr(
        closed.jaxpr, closed.consts, *ins, *[zeros[p] for p in pert.perturb_paths]
    )
    expected = model(x)
    np.testing.assert_allclose(outs[0], expected, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------- show_graph & pictures


def counter_executor():
    model = M.CounterRNN()
    brainstate.nn.init_all_states(model)
    ex = ec.ETraceVjpGraphExecutor(model)
    ex.compile_graph(jnp.ones(3))
    return ex


def test_show_graph_text(capsys):
    ex = counter_executor()
    msg = ex.show_graph(verbose=False, return_msg=True)
    assert capsys.readouterr().out == ""
    lines = msg.splitlines()
    assert "Hidden groups:" in lines
    assert "  Group 0: [('rnn', 'h')]  (num_state=1, varshape=(4,))" in lines
    assert "Dynamic (non-hidden) states:" in lines
    assert "  Dynamic state 0: ('count',)" in lines
    assert any(
        l.startswith("  Weight 0: ('rnn', 'W_ih', 'weight') + bias ('rnn', 'W_ih', 'bias')")
        and l.endswith("-> hidden group 0")
        for l in lines
    )
    assert "  Weight 1: ('rnn', 'W_hh', 'weight') via etp_matmul -> hidden group 0" in lines
    assert "Weights not online-traced (they get their exact same-step gradient):" in lines
    for p in ("('out', 'weight')", "('out', 'bias')"):
        assert (
            f"  {p}: its output reaches no hidden state (e.g. a readout): same-step gradient"
            in lines
        )
    # order: groups, dynamic states, online weights, untraced weights
    idx = [msg.index(s) for s in ("Hidden groups", "Dynamic", "Online-traced", "not online-traced")]
    assert idx == sorted(idx)

    assert ex.show_graph() is None
    assert capsys.readouterr().out.strip() == msg.strip()
    assert ex.show_graph(verbose=True, return_msg=True) == msg
    assert capsys.readouterr().out.strip() == msg.strip()


def test_show_graph_multi_group_relation():
    model, _ = compiled(M.CASE_BY_NAME["fanout"], None)
    ex = ec.ETraceVjpGraphExecutor(model)
    ex.compile_graph(M.CASE_BY_NAME["fanout"].x(None))
    msg = ex.show_graph(verbose=False, return_msg=True)
    assert (
        "Weight 0: ('W', 'weight') + bias ('W', 'bias') via etp_matmul -> hidden groups [0, 1]"
        in msg
    )
    assert "Dynamic" not in msg and "not online-traced" not in msg


def test_graph_to_dot_lists_every_weight():
    ex = counter_executor()
    dot = ex.graph_to_dot()
    assert dot.startswith("digraph") and dot.rstrip().endswith("}")
    for w in ("rnn.W_ih.weight", "rnn.W_hh.weight", "out.weight", "out.bias"):
        assert w in dot
    assert '"w0" -> "group0"' in dot and '"w1" -> "group0"' in dot
    assert dot.count("style=dashed") == 2


def test_plot_graph_writes_png(tmp_path):
    ex = counter_executor()
    path = tmp_path / "g.png"
    assert ex.plot_graph(str(path)) == str(path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


# ---------------------------------------------------------------------------- bad input


def test_model_without_hidden_state_warns_and_still_trains():
    model = M.FeedForward()
    brainstate.nn.init_all_states(model)
    with pytest.warns(UserWarning, match="feed-forward"):
        graph = ec.compile_etrace_graph(model, jnp.ones(3))
    assert graph.hidden_groups == () and graph.hidden_param_op_relations == ()
    assert graph.hidden_perturb is None

    algo = ec.D_RTRL(model)
    with pytest.warns(UserWarning, match="feed-forward"):
        algo.compile_graph(jnp.ones(3))
    assert "it trains as a feed-forward model" in algo.show_graph(verbose=False, return_msg=True)
    algo.init_etrace_state()
    xs, ys = jnp.ones((3, 3)), jnp.zeros((3, 2))
    res = ec.run_online(algo, lambda o, y: jnp.sum((o - y) ** 2), xs, ys)

    step, values = M.pure_step(model)

    def bptt(params):
        return sum(jnp.sum((step({**values, **params}, xs[t])[0] - ys[t]) ** 2) for t in range(3))

    exact = jax.grad(bptt)({p: values[p] for p in values})
    assert set(res.grads) == set(exact)
    for p in exact:
        np.testing.assert_allclose(res.grads[p], exact[p], rtol=1e-5, atol=1e-6)


def test_hidden_state_changing_shape_is_refused():
    with pytest.raises(
        CompilationError,
        match=r"HiddenState \('h',\) changes from float32\[3\] "
        r"to float32\[2, 3\]",
    ):
        ec.compile_etrace_graph(M.ShapeChanging(), jnp.ones(3))


def test_param_written_in_step_is_refused():
    with pytest.raises(
        CompilationError, match=r"ParamState \('W', 'bias'\) is written inside the step"
    ):
        ec.compile_etrace_graph(M.ParamWriter(), jnp.ones(3))


def test_non_module_is_a_type_error():
    with pytest.raises(TypeError, match="brainstate.nn.Module"):
        ec.compile_etrace_graph(lambda x: x, jnp.ones(3))
    with pytest.raises(TypeError, match="brainstate.nn.Module"):
        ec.extract_module_info(object(), jnp.ones(3))
    with pytest.raises(TypeError):
        ec.D_RTRL(lambda x: x)


def test_weight_inside_a_loop_is_refused_with_its_path():
    """A weighted scan is unrolled up to ControlFlowPolicy.scan_unroll_limit (see
    test_control_flow.py); above it, and in a while loop, the weight is refused by path."""
    model = M.WeightInScan()
    brainstate.nn.init_all_states(model)
    assert ec.compile_etrace_graph(model, jnp.ones(4)).hidden_param_op_relations
    with pytest.raises(
        ec.NotSupportedError, match=r"scan.* length 2 .*\('W_hh', 'weight'\).*scan_unroll_limit=1"
    ):
        ec.compile_etrace_graph(
            model, jnp.ones(4), control_flow=ec.ControlFlowPolicy(scan_unroll_limit=1)
        )

    class WeightInWhile(nn.RecurrentModule):
        state_names = ("h",)

        def __init__(self):
            super().__init__((4,))
            self.W = nn.Linear(4, 4, bias=False, w_init=M.uinit(5))

        def update(self, x):
            w = self.W.weight.value

            def body(c):
                i, h = c
                return i + 1, jnp.tanh(ops.matmul(h, w) + x)

            _, h = lax.while_loop(lambda c: c[0] < 2, body, (0, self.h.value))
            self.h.value = h
            return h

    model = WeightInWhile()
    brainstate.nn.init_all_states(model)
    with pytest.raises(ec.NotSupportedError, match=r"while.*\('W', 'weight'\)"):
        ec.compile_etrace_graph(model, jnp.ones(4))


# ---------------------------------------------------------------------------- the tutorial example


def test_graph_tutorial_example_runs(tmp_path):
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).resolve().parents[2] / "examples" / "graph_tutorial.py"
    import os

    root = str(script.parents[1])  # this checkout's packages, not an installed copy
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        ),
    }
    proc = subprocess.run(
        [sys.executable, str(script), "--plot", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for line in [
        "  Group 0: [('rnn', 'h')]  (num_state=1, varshape=(32,))",
        "  Weight 1: ('rnn', 'W_hh', 'weight') via etp_matmul -> hidden group 0",
        "  ('out', 'weight'): its output reaches no hidden state (e.g. a readout): same-step gradient",
        "  group 0: 1 state(s) [('rnn', 'h')], varshape (32,)",
        "perturbation: True [('rnn', 'h')]",
        "  Group 1: [('rnn2', 'h')]  (num_state=1, varshape=(32,))",
        "number of hidden groups: 2",
        "number of relations: 4",
        "  weight 3: ('rnn2', 'W_hh', 'weight') -> groups [1]",
        "  Group 0: [('rnn', 'h')]  (num_state=1, varshape=(64,))",
        "  ('conv', 'weight') (72 elements) via etp_conv then etp_matmul -> hidden group 0: "
        "dense trace, 4608 elements, memory 0.0176 MiB",
        "graph fields: module_info, hidden_groups, hid_path_to_group, hidden_param_op_relations, "
        "hidden_perturb",
    ]:
        assert line in out.splitlines(), line
    assert (
        "relation 0: weight ('rnn', 'W_ih', 'weight') (bias ('rnn', 'W_ih', 'bias')), "
        "primitive etp_matmul, groups [0]" in out
    )
    for name in ("graph.png", "graph_gru.png", "graph_conv.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
