"""Issue 13: nothing silently wrong, nothing lost.

One test per case of the reliability sweep: replaced parameters, targets, checkpoints, the
live-model contract, threads, the comparison app's child process and --out, non-finite values,
shape hints, frozen parameters, and the parameter re-import skip (every mutation path).
Oracles: torch eager forward / F.cross_entropy / F.mse_loss, torch autograd BPTT
(`bptt_gradients`), a learner built afresh, a serial run (float32, tolerances per test).
"""

import copy
import os
import subprocess
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from etrace_bridge import OnlineLearner, bptt_gradients
from etrace_bridge.compare.models import GRUClassifier, LeakyRNN, LSTMClassifier, initial_state
from etrace_bridge.errors import (
    CheckpointError,
    StaleConversionError,
    TargetError,
    UnsupportedModelError,
)

T, B, I, H, O = 6, 3, 4, 8, 5


def _data(seed=0, batch=B, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(T, batch, I, generator=g, dtype=dtype),
        torch.randn(T, batch, O, generator=g, dtype=dtype),
    )


def _learner(model, batch=B, **kw):
    kw.setdefault("algorithm", "es_d_rtrl")
    kw.setdefault("loss", "mse")
    dtype = next(model.parameters()).dtype
    return OnlineLearner(
        model,
        example_inputs=(torch.zeros(batch, I, dtype=dtype), *initial_state(model, batch)),
        **kw,
    )


def _gru(seed=0, hidden=H, dtype=torch.float32):
    torch.manual_seed(seed)
    return GRUClassifier(I, hidden, O).to(dtype)


def _eager_losses(model, xs, ys):
    """torch eager forward of len(xs) steps from the zero state: each step's loss."""
    state, out = initial_state(model, xs.shape[1]), []
    with torch.no_grad():
        for x, y in zip(xs, ys):
            y_hat, *state = model(x, *state)
            out.append(float(F.mse_loss(y_hat, y)))
    return out


def _eager_loss(model, x, y):
    """torch eager forward of one step from the zero state (the oracle of a learner's step)."""
    with torch.no_grad():
        out = model(x, *initial_state(model, x.shape[0]))[0]
    return float(F.mse_loss(out, y))


# ----------------------------------------------------------------------------- 1. parameters


def test_replaced_parameter_gets_its_gradient():
    """The gradient lands in the parameter the model holds now, as a fresh learner's would."""
    model = _gru()
    learner = _learner(model)
    xs, ys = _data()
    old = model.readout.weight
    model.readout.weight = nn.Parameter(torch.randn(O, H))
    fresh_model = copy.deepcopy(model)
    fresh = _learner(fresh_model)
    loss = learner.run(xs, ys)
    expected = fresh.run(xs, ys)
    assert old.grad is None
    assert model.readout.weight.grad is not None
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    for (n, p), q in zip(model.named_parameters(), fresh_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_removed_or_reshaped_parameter_is_a_clear_error():
    model = _gru()
    learner = _learner(model)
    xs, ys = _data()
    model.readout.weight = nn.Parameter(torch.randn(O + 1, H))
    model.readout.register_parameter("bias", None)
    with pytest.raises(StaleConversionError) as err:
        learner.run(xs, ys)
    text = str(err.value)
    assert "readout.weight" in text and "(6, 8)" in text and "(5, 8)" in text
    assert "readout.bias" in text and "gone" in text and "re-convert" in text


# ----------------------------------------------------------------------------- 2. targets


def _classifier_learner():
    model = _gru()
    return model, _learner(model, loss="cross_entropy")


@pytest.mark.parametrize("label", [7, -3])
def test_class_out_of_range_is_refused_like_torch(label):
    model, learner = _classifier_learner()
    xs, _ = _data()
    labels = torch.zeros(T, B, dtype=torch.long)
    labels[2, 1] = label
    with pytest.raises(IndexError, match=f"Target {label} is out of bounds"):
        F.cross_entropy(torch.zeros(B, O), labels[2])  # torch refuses it too
    with pytest.raises(IndexError, match=f"Target {label} is out of bounds"):
        learner.run(xs, labels)
    with pytest.raises(IndexError, match=f"Target {label} is out of bounds"):
        bptt_gradients(model, xs, labels, "cross_entropy", state=initial_state(model, B))
    assert all(p.grad is None for p in model.parameters())


def test_ignore_index_is_kept_and_matches_torch():
    model, learner = _classifier_learner()
    xs, _ = _data()
    labels = torch.randint(0, O, (T, B), generator=torch.Generator().manual_seed(1))
    labels[:, 0] = -100
    online = float(learner.run(xs, labels))
    ref = bptt_gradients(model, xs, labels, "cross_entropy", state=initial_state(model, B))
    assert abs(online - ref.loss) < 1e-4


def test_float_class_labels_are_refused_not_truncated():
    model, learner = _classifier_learner()
    xs, _ = _data()
    labels = torch.full((T, B), 0.7)
    with pytest.raises(TargetError, match="integer dtype"):
        learner.run(xs, labels)
    with pytest.raises(TargetError, match="integer dtype"):
        bptt_gradients(model, xs, labels, "cross_entropy", state=initial_state(model, B))


def test_class_probabilities_work_like_torch():
    """Float targets shaped like the output are class probabilities, as in F.cross_entropy."""
    model, learner = _classifier_learner()
    xs, _ = _data()
    labels = torch.randint(0, O, (T, B), generator=torch.Generator().manual_seed(2))
    onehot = F.one_hot(labels, O).float()
    online = float(learner.run(xs, onehot))
    ref = bptt_gradients(model, xs, onehot, "cross_entropy", state=initial_state(model, B))
    by_index = bptt_gradients(model, xs, labels, "cross_entropy", state=initial_state(model, B))
    assert abs(online - ref.loss) < 1e-4 and abs(ref.loss - by_index.loss) < 1e-4


def test_class_target_shape_is_checked():
    _, learner = _classifier_learner()
    xs, _ = _data()
    with pytest.raises(TargetError, match=r"shape \(3,\)"):
        learner.run(xs, torch.zeros(T, B, 1, dtype=torch.long))


@pytest.mark.parametrize("shape", [(B, 1), (O,), (1,)])
def test_mse_broadcasting_target_warns_like_torch(shape):
    model = _gru()
    learner = _learner(model)
    xs, _ = _data()
    target = torch.randn(*shape)
    with pytest.warns(UserWarning, match="different to the input size") as torch_warning:
        expected = F.mse_loss(torch.zeros(B, O), target)
    with pytest.warns(UserWarning, match="different to the input size") as ours:
        loss = learner.step(xs[0], target)
    assert str(ours[0].message) == str(torch_warning[0].message)
    assert abs(float(loss) - _eager_loss(model, xs[0], target.expand(B, O))) < 1e-5
    assert float(expected) > 0


def test_mse_target_that_does_not_broadcast_is_an_error():
    learner = _learner(_gru())
    xs, _ = _data()
    with pytest.raises(TargetError, match=r"target shape \(4, 5\)"):
        learner.step(xs[0], torch.zeros(B + 1, O))


# ----------------------------------------------------------------------------- 3. checkpoints


def _values(learner):
    sd = learner.state_dict()
    return {k: v.clone() for k, v in sd["model_states"].items()}, [
        t.clone() for t in torch.utils._pytree.tree_leaves(sd["etrace"])
    ]


def _assert_unchanged(learner, before):
    states, traces = _values(learner)
    assert states.keys() == before[0].keys()
    assert all(torch.equal(states[k], before[0][k]) for k in states)
    assert all(torch.equal(a, b) for a, b in zip(traces, before[1]))


def test_checkpoint_without_states_is_refused_and_nothing_changes():
    learner = _learner(_gru())
    xs, ys = _data()
    learner.run(xs, ys)
    saved = learner.state_dict()
    learner.run(xs[:2], ys[:2])
    before = _values(learner)
    broken = {k: v for k, v in saved.items() if k != "model_states"}
    with pytest.raises(CheckpointError, match="model_states"):
        learner.load_state_dict(broken)
    _assert_unchanged(learner, before)


def test_checkpoint_saves_and_checks_the_decay():
    a = _learner(_gru(), decay_or_rank=0.9)
    b = _learner(_gru(), decay_or_rank=0.5)
    saved = a.state_dict()
    assert saved["options"]["decay"] == 0.9
    with pytest.raises(CheckpointError, match="decay is 0.9; this learner's is 0.5"):
        b.load_state_dict(saved)


def test_gru_checkpoint_into_lstm_learner_is_refused_whole():
    gru = _learner(_gru())
    torch.manual_seed(0)
    lstm = _learner(LSTMClassifier(I, H, O))
    xs, ys = _data()
    lstm.run(xs, ys)
    before = _values(lstm)
    with pytest.raises(CheckpointError) as err:
        lstm.load_state_dict(gru.state_dict())
    text = str(err.value)
    assert "no value for the model state" in text and "nothing was loaded" in text
    assert "parameter `cell.weight_ih` has shape (24, 4)" in text
    _assert_unchanged(lstm, before)


def test_hidden_size_mismatch_names_the_checkpoint():
    small = _learner(_gru(hidden=H))
    big = _learner(_gru(hidden=H + 2))
    with pytest.raises(CheckpointError, match=r"checkpoint does not fit(.|\n)*cell.weight_hh"):
        big.load_state_dict(small.state_dict())


def test_checkpoint_dtype_mismatch_is_refused(x64):
    single = _learner(_gru())
    double = _learner(_gru(dtype=torch.float64))
    with pytest.raises(CheckpointError, match="is float32; this model's is float64"):
        double.load_state_dict(single.state_dict())


def test_alias_accepts_the_checkpoint_and_resumes_bit_for_bit(tmp_path):
    """pp_prop is es_d_rtrl: a checkpoint of one resumes the other exactly (also via a file)."""
    xs, ys = _data()
    model = _gru()
    twin = copy.deepcopy(model)
    a = _learner(model, algorithm="es_d_rtrl")
    b = _learner(twin, algorithm="pp_prop")
    a.run(xs[:3], ys[:3])
    torch.save(a.state_dict(), tmp_path / "ckpt.pt")
    model.zero_grad()
    a.run(xs[3:], ys[3:])
    b.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True))
    b.run(xs[3:], ys[3:])
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_checkpoint_of_another_batch_size_loads_or_rolls_back():
    xs, ys = _data()
    model = _gru()
    twin = copy.deepcopy(model)
    a = _learner(model)
    a.run(xs[:3], ys[:3])
    saved = a.state_dict()
    b = _learner(twin, batch=5)
    x5, y5 = _data(batch=5)
    b.run(x5, y5)
    before = _values(b)
    broken = copy.deepcopy(saved)
    broken["etrace"]["count"] = torch.zeros(2)  # a trace that does not fit
    with pytest.raises(CheckpointError, match="eligibility traces"):
        b.load_state_dict(broken)
    _assert_unchanged(b, before)  # still batch 5, same values
    b.run(x5[:1], y5[:1])
    b.load_state_dict(saved)  # batch 3: rebuilt and restored
    model.zero_grad()
    twin.zero_grad()
    a.run(xs[3:], ys[3:])
    b.run(xs[3:], ys[3:])
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad)


# ----------------------------------------------------------------------------- 4. live model


def test_changed_python_attribute_is_refused():
    torch.manual_seed(0)
    model = LeakyRNN(I, H, O, alpha=0.9)
    learner = _learner(model)
    xs, ys = _data()
    model.alpha = 0.1
    with pytest.raises(StaleConversionError, match=r"`alpha` was 0.9 .* now 0.1(.|\n)*re-convert"):
        learner.run(xs, ys)
    model.alpha = 0.9  # undone: runs again
    assert np.isfinite(float(learner.run(xs, ys)))


def test_train_mode_after_eval_conversion_is_refused():
    torch.manual_seed(0)
    model = _DropoutGRU().eval()
    learner = _learner(model)
    xs, ys = _data()
    model.train()
    with pytest.raises(StaleConversionError, match="eval mode and is now in train mode"):
        learner.run(xs, ys)


def test_replaced_submodule_is_refused():
    model = _DropoutGRU().eval()
    learner = _learner(model)
    model.act = nn.Tanh()
    with pytest.raises(StaleConversionError, match="submodules"):
        learner.run(*_data())


class _DropoutGRU(GRUClassifier):
    """GRUClassifier with a LeakyReLU (a Python attribute read by forward) and Dropout."""

    def __init__(self):
        super().__init__(I, H, O)
        self.act = nn.LeakyReLU(0.1)
        self.drop = nn.Dropout(0.3)

    def forward(self, x, h):
        h = self.cell(x, h)
        return self.readout(self.drop(self.act(h))), h


def test_batchnorm_in_train_mode_says_eval():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = nn.GRUCell(I, H)
            self.norm = nn.BatchNorm1d(H)
            self.readout = nn.Linear(H, O)

        def forward(self, x, h):
            h = self.cell(x, h)
            return self.readout(self.norm(h)), h

    with pytest.raises(UnsupportedModelError, match=r"\.eval\(\)") as err:
        OnlineLearner(Net(), loss="mse", example_inputs=(torch.zeros(B, I), torch.zeros(B, H)))
    assert "custom_ops" not in str(err.value)
    net = Net().eval()
    with torch.no_grad():
        net.norm.running_mean.uniform_()
    learner = OnlineLearner(net, loss="mse", example_inputs=(torch.zeros(B, I), torch.zeros(B, H)))
    xs, ys = _data()
    with torch.no_grad():  # buffers are re-read at every step
        net.norm.running_mean.fill_(0.5)
    loss = float(learner.step(xs[0], ys[0]))
    with torch.no_grad():
        expected = float(F.mse_loss(net(xs[0], torch.zeros(B, H))[0], ys[0]))
    assert abs(loss - expected) < 1e-5


# ----------------------------------------------------------------------------- 5. threads


def test_one_learner_from_many_threads_loses_no_step():
    """N threads x M steps of the same (x, y): the trace count and the gradients equal a serial
    run's (each step sees the state the previous one left, whichever thread runs it)."""
    n_threads, n_steps = 4, 25
    xs, ys = _data()
    model = _gru()
    twin = copy.deepcopy(model)
    shared, serial = _learner(model), _learner(twin)
    for _ in range(n_threads * n_steps):
        serial.step(xs[0], ys[0])
    start = threading.Barrier(n_threads)
    errors = []

    def work():
        try:
            start.wait()
            for _ in range(n_steps):
                shared.step(xs[0], ys[0])
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=work) for _ in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert float(shared.algorithm.etrace.value["count"]) == n_threads * n_steps
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)


def test_conversions_in_threads_work():
    models = [_gru(seed) for seed in range(2)]
    built, errors = [None, None], []

    def build(k):
        try:
            built[k] = _learner(models[k])
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=build, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    xs, ys = _data()
    for k in range(2):
        assert abs(float(built[k].step(xs[0], ys[0])) - _eager_loss(models[k], xs[0], ys[0])) < 1e-5


# ----------------------------------------------------------------------------- 6. the app


def test_measuring_child_ignores_the_working_directory(tmp_path, monkeypatch):
    """Files named like modules in the working directory are never imported by the child."""
    from etrace_bridge.compare.measure import child_command

    marker = tmp_path / "imported.txt"
    for name in ("etrace_bridge", "numpy", "torch"):
        (tmp_path / f"{name}.py").write_text(
            f"open({str(marker)!r}, 'a').write('{name}\\n')\nraise SystemExit(3)\n"
        )
    code = (
        "import numpy, torch, etrace_bridge.compare.measure as m; print(numpy.__file__, m.__file__)"
    )
    monkeypatch.chdir(tmp_path)
    # also with the working directory on PYTHONPATH (a relative entry, as people set it)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([".", os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(child_command(code), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists()
    assert str(tmp_path) not in proc.stdout
    import etrace_bridge.compare.measure as parent  # the child runs the parent's code

    assert proc.stdout.split()[1] == parent.__file__


def test_unwritable_out_is_refused_before_training(tmp_path, monkeypatch, capsys):
    from etrace_bridge.compare import cli, runs

    def no_training(*args, **kwargs):
        raise AssertionError("training started before --out was checked")

    monkeypatch.setattr(runs, "run_comparison", no_training)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    status = cli.main(["--quick", "--out", str(blocker / "report")])
    assert status == 2
    assert "--out" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 7. smaller


def test_non_finite_input_warns_once():
    learner = _learner(_gru())
    xs, ys = _data()
    xs[1, 0, 0] = float("inf")
    with pytest.warns(RuntimeWarning, match="non-finite") as caught:
        learner.run(xs, ys)
        learner.run(xs, ys)
    assert len([w for w in caught if "non-finite" in str(w.message)]) == 1


def test_check_finite_raises_plainly_and_undoes_the_step():
    model = _gru()
    learner = _learner(model, check_finite=True)
    xs, ys = _data()
    learner.run(xs[:2], ys[:2])
    grads = [p.grad.clone() for p in model.parameters()]
    before = _values(learner)
    bad = xs.clone()
    bad[1, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError) as err:
        learner.run(bad, ys)
    assert "CpuCallback" not in str(err.value) and "inputs" in str(err.value)
    assert type(err.value) is FloatingPointError
    _assert_unchanged(learner, before)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))


@pytest.mark.parametrize(
    "x, words",
    [
        (torch.zeros(T, B + 2, I), "reset_state(5)"),
        (torch.zeros(T, B, I + 1), "per-sample shape (5,)"),
        (torch.zeros(B, I), "rank 2"),
    ],
)
def test_shape_hint_names_the_mismatch(x, words):
    learner = _learner(_gru())
    with pytest.raises(ValueError) as err:
        learner.run(x, torch.zeros(T, B, O))
    assert words in str(err.value)
    if "reset_state" not in words:
        assert "reset_state" not in str(err.value)


def test_frozen_parameters_get_no_grad():
    model = _gru()
    model.readout.bias.requires_grad_(False)
    learner = _learner(model)
    learner.run(*_data())
    assert model.readout.bias.grad is None and model.readout.weight.grad is not None


# ----------------------------------------------------------------------------- 8. re-import


def _mutations():
    def optimizer_step(model):
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
        model.zero_grad()

    def data_copy(model):
        model.readout.weight.data.copy_(torch.randn(O, H))

    def load_state(model):
        model.load_state_dict(_gru(seed=7).state_dict())

    def replace(model):
        model.readout.weight = nn.Parameter(torch.randn(O, H))

    def data_assign(model):
        model.cell.weight_hh.data = torch.randn(3 * H, H)

    def no_grad_add(model):
        with torch.no_grad():
            model.cell.bias_ih.add_(1.0)

    def init_in_place(model):
        torch.nn.init.orthogonal_(model.cell.weight_hh)
        torch.nn.init.uniform_(model.readout.bias, -1.0, 1.0)

    def same_pointer_new_layout(model):
        # `p.data = ...` with the same storage pointer, shape and dtype: only the strides tell
        w = model.cell.weight_hh
        relaid = w.detach().reshape(H, 3 * H).t()
        assert relaid.data_ptr() == w.data_ptr() and relaid.shape == w.shape
        assert relaid.stride() != w.stride() and not torch.equal(relaid, w.detach())
        w.data = relaid

    return [
        optimizer_step,
        data_copy,
        load_state,
        replace,
        data_assign,
        no_grad_add,
        init_in_place,
        same_pointer_new_layout,
    ]


@pytest.mark.parametrize("mutate", _mutations(), ids=lambda f: f.__name__)
def test_parameters_are_never_stale(mutate):
    """After each way of changing parameters, the next steps use the new values (torch eager
    steps as the oracle), although unchanged parameters are not re-imported. Two steps: from
    the zero state the first step does not read the recurrent weight `weight_hh`."""
    model = _gru()
    learner = _learner(model)
    xs, ys = _data()
    learner.step(xs[0], ys[0])
    learner.reset_state()
    assert learner._live.imports(learner._live.parameters()) == {}  # the skip is in effect
    mutate(model)
    model.zero_grad()
    losses = [float(learner.step(xs[t], ys[t])) for t in range(2)]
    assert np.allclose(losses, _eager_losses(model, xs[:2], ys[:2]), rtol=0, atol=1e-5)
    assert learner._live.imports(learner._live.parameters()) == {}  # skipping again


def test_finite_check_sums_overflow_without_a_false_alarm():
    """The non-finite check's fast path sums each tensor in its own dtype: finite float32 and
    float16 values whose sum overflows take the exact check and pass; a nan or inf is named."""
    from etrace_bridge.step_checks import FiniteGuard

    guard = FiniteGuard(strict=False)
    big = torch.full((4, 4), 3e38)  # float32: the sum overflows to inf
    half = torch.full((100,), 60000.0, dtype=torch.float16)  # float16 sum: 6e6
    loss = torch.tensor(1.0)
    assert guard.check([big], loss, {("w",): big.clone(), ("h",): half}, None) is None
    bad = big.clone()
    bad[1, 2] = float("nan")
    msg = guard.check([torch.ones(3)], loss, {("w",): bad, ("h",): half}, None)
    assert msg is not None and "`w`" in msg and "`h`" not in msg and "step's inputs" not in msg
    msg = guard.check([torch.tensor([1.0, float("inf")])], loss, {("w",): big}, None)
    assert msg is not None and "step's inputs" in msg and "gradients of" not in msg
