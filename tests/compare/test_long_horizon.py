"""Long horizons: truncated BPTT, the cue-delay task, the multi-timescale and memoryless-readout
LIF models (D-RTRL exact for both), memory-budget handling, stream mode.

Oracles: torch autograd BPTT (`bptt_gradients`) in float64; gradients of truncated BPTT with a
window covering the sequence must equal it to 1e-12, online D-RTRL gradients to 1e-9.
"""

import math
import sys
import warnings

import numpy as np
import pytest
import torch

from etrace_bridge import OnlineLearner, bptt_gradients, compare_gradients, tbptt_gradients
from etrace_bridge.bptt import tbptt_windows
from etrace_bridge.compare.config import CompareConfig
from etrace_bridge.compare.factory import resolve_model
from etrace_bridge.compare.measure import (
    OVER_BUDGET_EXIT,
    measure_memory,
    parse_child_output,
    predicted_peak_mb,
)
from etrace_bridge.compare.models import (
    LIFNet,
    MultiTimescaleLeaky,
    build_model,
    initial_state,
    spike_jax,
)
from etrace_bridge.compare.results import MemoryPoint, MemoryProfile, crossover, memory_fit
from etrace_bridge.compare.stream import accuracy_curve, stream_data
from etrace_bridge.compare.tasks import IGNORE_INDEX, cue_delay, get_task

B, H = 4, 6


def _task_batch(delay=12, n=B, dtype=torch.float64):
    task = cue_delay(n, 2, delay=delay, seed=3)
    return (task, torch.from_numpy(task.xs_train).to(dtype), torch.from_numpy(task.ys_train))


# ----------------------------------------------------------------------------- task


def test_cue_delay_layout():
    task = cue_delay(64, 16, delay=7, n_cues=4, distractors=3, noise=0.5, seed=1)
    assert task.seq_len == 9 and task.n_in == 4 + 1 + 3 and task.n_out == 4
    assert task.kind == "classification_last" and task.horizon == 8
    xs, ys = task.xs_train, task.ys_train
    assert xs.dtype == np.float32 and ys.dtype == np.int64
    cues = ys[-1]
    assert np.all(ys[:-1] == IGNORE_INDEX)
    np.testing.assert_array_equal(xs[0, :, :4].argmax(-1), cues)  # the cue at step 0 ...
    assert np.all(xs[0].sum(-1) == 1.0)  # ... and nothing else
    assert np.all(xs[1:8, :, :5] == 0) and xs[1:8, :, 5:].std() > 0.3  # distractors only
    assert np.all(xs[-1, :, 4] == 1) and np.all(xs[-1].sum(-1) == 1)  # go
    assert np.bincount(cues, minlength=4).tolist() == [16] * 4  # balanced: chance 0.25
    with pytest.raises(ValueError, match="delay"):
        cue_delay(4, 4, delay=0)


def test_cue_delay_by_name_with_settings():
    a = get_task("cue_delay", seed=2, delay=5, n_train=8, n_test=4, distractors=0)
    b = get_task("cue_delay", seed=2, delay=5, n_train=8, n_test=4, distractors=0)
    assert a.xs_train.shape == (7, 8, 5)
    np.testing.assert_array_equal(a.xs_train, b.xs_train)


# ----------------------------------------------------------------------------- models


def test_multiscale_time_constants_and_step():
    model = MultiTimescaleLeaky(3, 5, 2)
    tau = -1.0 / torch.log(model.alpha.double())
    torch.testing.assert_close(tau, torch.logspace(0, 3, 5, dtype=torch.float64), rtol=1e-3, atol=0)
    assert {n for n, _ in model.named_parameters()} == {
        "input.weight",
        "readout.weight",
        "readout.bias",
    }
    x, h = torch.randn(4, 3), torch.randn(4, 5)
    y, h1 = model(x, h)
    torch.testing.assert_close(h1, model.alpha * h + torch.tanh(model.input(x)))
    torch.testing.assert_close(y, model.readout(h1))


def test_lif_direct_readout_is_memoryless():
    model = build_model("lif_direct", 3, 2, n_hidden=5)
    assert isinstance(model, LIFNet) and model.decay_out is None
    model.reset_state(4)
    assert not hasattr(model, "out")
    x = torch.rand(4, 3) * 5
    y = model(x)
    torch.testing.assert_close(y, model.readout(model.z))


def _online_vs_bptt(name, scale=1.0):
    _, xs, ys = _task_batch()
    torch.manual_seed(0)
    model = build_model(name, xs.shape[-1], 4, n_hidden=H).double()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    state = initial_state(model, B)
    reference = bptt_gradients(model, xs, ys, "cross_entropy", state=state or None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learner = OnlineLearner(
            model,
            algorithm="d_rtrl",
            loss="cross_entropy",
            example_inputs=(xs[0], *initial_state(model, B)),
            custom_ops={"etrace::spike": spike_jax},
        )
        learner.reset_state(B)
        learner.run(xs, ys)
    online = {n: p.grad for n, p in model.named_parameters()}
    return compare_gradients(online, reference.grads), reference


@pytest.mark.parametrize("name, scale", [("multiscale", 1.0), ("lif_direct", 3.0)])
def test_d_rtrl_is_exact_on_long_horizon_models(x64, name, scale):
    report, reference = _online_vs_bptt(name, scale)
    assert reference.grads["input.weight"].abs().sum() > 0  # the cue's path carries gradient
    assert report.worst_rel_error < 1e-9, report.table()


def test_d_rtrl_is_approximate_with_the_leaky_readout(x64):
    report, _ = _online_vs_bptt("lif", 3.0)
    assert report.worst_rel_error > 1e-4, report.table()  # the readout's memory is not traced


# ----------------------------------------------------------------------------- truncated BPTT


@pytest.mark.parametrize("name", ["multiscale", "lif_direct", "gru"])
def test_tbptt_with_a_window_covering_the_sequence_is_bptt(name):
    _, xs, ys = _task_batch(delay=6)
    torch.manual_seed(1)
    model = build_model(name, xs.shape[-1], 4, n_hidden=H).double()
    state = initial_state(model, B) or None
    reference = bptt_gradients(model, xs, ys, "cross_entropy", state=state)
    for window in (xs.shape[0], 100):
        trunc = tbptt_gradients(model, xs, ys, "cross_entropy", window=window, state=state)
        assert trunc.loss == pytest.approx(reference.loss, rel=1e-12)
        for n, g in reference.grads.items():
            torch.testing.assert_close(trunc.grads[n], g, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(trunc.outputs, reference.outputs, rtol=0, atol=0)


def test_tbptt_shorter_than_the_dependency_loses_the_cue():
    _, xs, ys = _task_batch(delay=12)
    torch.manual_seed(2)
    model = build_model("multiscale", xs.shape[-1], 4, n_hidden=H).double()
    state = initial_state(model, B)
    reference = bptt_gradients(model, xs, ys, "cross_entropy", state=state)
    trunc = tbptt_gradients(model, xs, ys, "cross_entropy", window=5, state=state)
    report = compare_gradients(trunc.grads, reference.grads)
    rows = {r.name: r for r in report.rows}
    # the loss sits at the last step: the readout's gradient is same-step, hence exact ...
    assert rows["readout.weight"].rel_error < 1e-12
    # ... while the input weights lose every path longer than the window (the cue's)
    assert rows["input.weight"].rel_error > 0.05
    cue = trunc.grads["input.weight"][:, :4]
    assert cue.abs().max() == 0  # the cue channels are only non-zero at step 0
    # forward values are untouched by truncation
    torch.testing.assert_close(trunc.outputs, reference.outputs, rtol=0, atol=0)


def test_tbptt_windows_split_and_restore_buffers():
    _, xs, ys = _task_batch(delay=8)  # T = 10
    torch.manual_seed(0)
    model = build_model("lif_direct", xs.shape[-1], 4, n_hidden=H).double()
    model.reset_state(B)
    before = model.v
    windows = list(tbptt_windows(model, xs, ys, "cross_entropy", window=4))
    assert [(w.start, w.stop) for w in windows] == [(0, 4), (4, 8), (8, 10)]
    assert [w.has_loss for w in windows] == [False, False, True]
    assert all(g.abs().sum() == 0 for w in windows[:2] for g in w.grads.values())
    assert model.v is before and torch.all(model.v == 0)
    with pytest.raises(ValueError, match="window"):
        next(tbptt_windows(model, xs, ys, "cross_entropy", window=0))


def test_tbptt_per_window_updates_change_later_windows():
    from etrace_bridge.compare.trainers import TBPTTTrainer

    _, xs, ys = _task_batch(delay=8)
    ys = ys.clone()
    ys[3] = ys[-1]  # a loss in the first window too
    torch.manual_seed(0)
    init = build_model("multiscale", xs.shape[-1], 4, n_hidden=H).double()
    per_window, per_sequence = (
        TBPTTTrainer(_copy(init), "cross_entropy", 0.1, window=4, update=u)
        for u in ("window", "sequence")
    )
    calls = {}
    for name, trainer in (("window", per_window), ("sequence", per_sequence)):
        steps = []
        original = trainer.optimizer.step
        trainer.optimizer.step = lambda *a, _o=original, _s=steps: (_s.append(1), _o())[1]
        trainer.train_batch(xs, ys)
        calls[name] = len(steps)
    assert calls == {"window": 2, "sequence": 1}  # windows 1 and 3 carry a loss


def _copy(model):
    import copy

    return copy.deepcopy(model)


# ----------------------------------------------------------------------------- memory


def test_memory_fit_and_crossover():
    bptt = MemoryProfile(
        "bptt", sweep=[MemoryPoint(t, 500 + 0.025 * t, 490) for t in (100, 1000, 10000)]
    )
    online = MemoryProfile("d_rtrl", sweep=[MemoryPoint(t, 650.0, 640) for t in (100, 1000, 10000)])
    fit = memory_fit(bptt)
    assert fit.fixed_mb == pytest.approx(500) and fit.per_step_kb == pytest.approx(25.6)
    cross = crossover(bptt, online)
    assert cross.fitted_T == pytest.approx(6000)
    assert cross.between == (1000, 10000)
    assert math.isnan(memory_fit(MemoryProfile("x", sweep=bptt.sweep[:1])).fixed_mb)


def test_over_budget_is_predicted_and_parsed():
    points = [MemoryPoint(1000, 600.0, 500.0)]
    assert predicted_peak_mb(points, 10000) == pytest.approx(1500.0)
    out = "\n".join(
        [
            "noise",
            'ETRACE_MEMORY {"kind": "task", "peak_mb": 480.0, "hwm_reset": true}',
            'ETRACE_MEMORY {"kind": "point", "seq_len": 100, "peak_mb": 500.0, "before_mb": 490.0, '
            '"first_seconds": 0.2, "step_seconds": 0.1, "hwm_reset": true}',
            'ETRACE_MEMORY {"kind": "over_budget", "seq_len": 1000, "measured": false}',
        ]
    )
    profile = parse_child_output("bptt", out)
    assert profile.task_peak_mb == 480.0 and profile.over_budget_from == 1000
    assert [p.seq_len for p in profile.sweep] == [100] and profile.timing[0].step_seconds == 0.1


def test_bptt_past_the_budget_stops_without_crashing():
    """A real child: the first T fits, BPTT at the second passes the budget -> "over budget"."""
    cfg = CompareConfig(
        methods=("bptt",),
        hidden=256,
        batch_size=64,
        n_train=64,
        n_test=8,
        delay=3,
        seq_lens=(10, 40000),
        memory_budget=1000.0,
        progress=False,
    ).checked()
    profile = measure_memory(cfg, resolve_model("multiscale", cfg.hidden), "bptt", timeout=600)
    assert profile.error is None, profile
    assert [p.seq_len for p in profile.sweep] == [10]
    assert profile.over_budget_from == 40000
    assert OVER_BUDGET_EXIT != 0


def test_memory_child_killed_by_a_signal_is_run_once_more(monkeypatch, tmp_path):
    """A child that dies by a signal gets one fresh retry; a second death is reported."""
    import etrace_bridge.compare.measure as measure

    marker = tmp_path / "ran"
    point = '{"kind": "point", "seq_len": 10, "peak_mb": 1.0, "before_mb": 1.0, '
    point += '"first_seconds": 0.1, "step_seconds": 0.1, "hwm_reset": true}'
    body = (
        "import os, pathlib, signal, sys; m = pathlib.Path({m!r}); first = not m.exists(); "
        "m.touch(); sys.stdin.read(); "
        "os.kill(os.getpid(), signal.SIGABRT) if first or {always} else "
        "print({mark!r} + {point!r})"
    )
    cfg = CompareConfig(methods=("bptt",), progress=False).checked()
    factory = resolve_model("multiscale", cfg.hidden)
    for always, expect_error in ((False, False), (True, True)):
        marker.unlink(missing_ok=True)
        code = body.format(m=str(marker), always=always, mark=measure._MARK, point=point)
        monkeypatch.setattr(measure, "child_command", lambda _, c=code: [sys.executable, "-c", c])
        profile = measure.measure_memory(cfg, factory, "bptt")
        if expect_error:
            assert "killed by signal 6" in profile.error and "(twice)" in profile.error
        else:
            assert profile.error is None and [p.seq_len for p in profile.sweep] == [10]


# ----------------------------------------------------------------------------- stream


def test_stream_data_is_trials_back_to_back():
    cfg = CompareConfig(batch_size=3, delay=4, stream=True, stream_trials=5).checked()
    task, xs, ys = stream_data(cfg)
    assert xs.shape == (5 * 6, 3, task.n_in) and ys.shape == (30, 3)
    labelled = np.nonzero(ys[:, 0] != IGNORE_INDEX)[0]
    np.testing.assert_array_equal(labelled, np.arange(5, 30, 6))  # one go step per trial
    np.testing.assert_array_equal(xs[labelled - 5, 0, :4].argmax(-1), ys[labelled, 0])  # its cue


def test_accuracy_curve_bins_trials():
    correct = np.full((4 * 3, 2), np.nan)
    correct[2::3] = [[1, 0], [1, 1], [0, 0], [1, 1]]
    curve = accuracy_curve(correct, None, 3, bins=2)
    assert [(p.step, p.trials) for p in curve] == [(6, 2), (12, 4)]
    assert [p.accuracy for p in curve] == [0.75, 0.5]
