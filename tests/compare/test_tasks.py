"""Built-in sequence tasks: shapes, determinism, label sanity."""

import numpy as np
import pytest

from etrace_bridge.compare.tasks import (
    IGNORE_INDEX,
    SequenceTask,
    delayed_recall,
    get_task,
    iterate_minibatches,
    sequential_digits,
    spiking_dms,
)


def _check_classification(task: SequenceTask, seq_len: int):
    for xs, ys in ((task.xs_train, task.ys_train), (task.xs_test, task.ys_test)):
        assert xs.dtype == np.float32 and ys.dtype == np.int64
        assert xs.ndim == 3 and xs.shape[0] == seq_len and xs.shape[2] == task.n_in
        assert ys.shape == xs.shape[:2]
        valid = ys[ys != IGNORE_INDEX]
        assert valid.size > 0 and valid.min() >= 0 and valid.max() < task.n_out
    assert task.seq_len == seq_len


@pytest.mark.parametrize("rows, seq_len, n_in", [(True, 8, 8), (False, 64, 1)])
def test_digits_shapes_and_labels(rows, seq_len, n_in):
    task = sequential_digits(rows=rows)
    _check_classification(task, seq_len)
    assert task.kind == "classification_last" and task.n_in == n_in and task.n_out == 10
    assert task.n_train + task.n_test == 1797
    assert task.n_test == pytest.approx(0.25 * 1797, abs=1)
    assert np.all(task.ys_train[:-1] == IGNORE_INDEX)
    assert 0.0 <= task.xs_train.min() and task.xs_train.max() == 1.0
    counts = np.bincount(task.ys_test[-1], minlength=10)
    assert counts.min() >= 40 and counts.max() <= 50


def test_digits_rows_and_pixels_are_the_same_images():
    rows, pixels = sequential_digits(seed=3), sequential_digits(seed=3, rows=False)
    flat_rows = rows.xs_train.transpose(1, 0, 2).reshape(rows.n_train, 64)
    flat_pixels = pixels.xs_train.transpose(1, 0, 2).reshape(pixels.n_train, 64)
    np.testing.assert_array_equal(flat_rows, flat_pixels)
    np.testing.assert_array_equal(rows.ys_train[-1], pixels.ys_train[-1])


def test_digits_logistic_regression_baseline():
    from sklearn.linear_model import LogisticRegression

    task = sequential_digits(seed=0)
    flat = lambda xs: xs.transpose(1, 0, 2).reshape(xs.shape[1], -1)
    clf = LogisticRegression(max_iter=2000).fit(flat(task.xs_train), task.ys_train[-1])
    assert clf.score(flat(task.xs_test), task.ys_test[-1]) > 0.9


def test_recall_targets_are_delayed_inputs():
    task = delayed_recall(64, 32, seq_len=12, n_symbols=3, delay=4, seed=1)
    _check_classification(task, 12)
    assert task.kind == "classification_every_step" and task.n_in == task.n_out == 3
    assert np.all(task.xs_train.sum(-1) == 1.0)
    shown = task.xs_train.argmax(-1)
    assert np.all(task.ys_train[:4] == IGNORE_INDEX)
    np.testing.assert_array_equal(task.ys_train[4:], shown[:-4])
    counts = np.bincount(task.ys_train[4:].ravel(), minlength=3) / task.ys_train[4:].size
    assert np.all(np.abs(counts - 1 / 3) < 0.05)
    with pytest.raises(ValueError):
        delayed_recall(4, 4, seq_len=5, delay=5)


def test_dms_spikes_and_balance():
    task = spiking_dms(200, 100, seq_len=50, n_in=40, seed=2)
    _check_classification(task, 50)
    assert task.kind == "classification_last" and task.n_out == 2
    assert set(np.unique(task.xs_train)) <= {0.0, 1.0}
    assert np.all(task.ys_train[:-1] == IGNORE_INDEX)
    assert np.bincount(task.ys_train[-1]).tolist() == [100, 100]
    assert np.bincount(task.ys_test[-1]).tolist() == [50, 50]
    # sample period fires more than the delay
    sample_rate, delay_rate = task.xs_train[:15].mean(), task.xs_train[15:35].mean()
    assert sample_rate > 3 * delay_rate


def test_dms_match_label_is_consistent_with_patterns():
    task = spiking_dms(400, 10, seq_len=40, n_in=20, seed=0)
    sample = task.xs_train[:12].sum(0)
    test = task.xs_train[-12:].sum(0)
    corr = np.array([np.corrcoef(s, t)[0, 1] for s, t in zip(sample, test)])
    match = task.ys_train[-1] == 1
    assert corr[match].mean() > 0.3 > corr[~match].mean()


@pytest.mark.parametrize("name", ["digits", "recall", "dms"])
def test_determinism_by_seed(name):
    kw = {} if name == "digits" else {"n_train": 16, "n_test": 8}
    a, b, c = (
        get_task(name, seed=5, **kw),
        get_task(name, seed=5, **kw),
        get_task(name, seed=6, **kw),
    )
    for field in ("xs_train", "ys_train", "xs_test", "ys_test"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.xs_train, c.xs_train)


def test_get_task_unknown_name():
    with pytest.raises(ValueError, match="digits, recall, dms"):
        get_task("mnist")


def test_iterate_minibatches():
    xs = np.arange(3 * 10 * 2, dtype=np.float32).reshape(3, 10, 2)
    ys = np.arange(3 * 10).reshape(3, 10)
    batches = list(iterate_minibatches(xs, ys, 4, shuffle=False, seed=0))
    assert [b[0].shape for b in batches] == [(3, 4, 2), (3, 4, 2), (3, 2, 2)]
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches], axis=1), ys)
    shuffled = list(iterate_minibatches(xs, ys, 4, shuffle=True, seed=1))
    again = list(iterate_minibatches(xs, ys, 4, shuffle=True, seed=1))
    order = np.concatenate([b[1][0] for b in shuffled])
    assert sorted(order.tolist()) == list(range(10)) and order.tolist() != list(range(10))
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(shuffled, again))
    for bx, by in shuffled:
        np.testing.assert_array_equal(bx[..., 0] // 2, by)
    dropped = list(iterate_minibatches(xs, ys, 4, shuffle=True, seed=1, drop_last=True))
    assert len(dropped) == 2
