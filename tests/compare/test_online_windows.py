"""etrace-compare's online-window variants (`d_rtrl+wK`, `es_d_rtrl@DECAY+wK`).

Oracle: the app's own torch BPTT gradient at initialisation (float32): on digits (T = 8) a
window of 8 steps is BPTT (cosine > 0.999999, relative error < 1e-4, every parameter of the
torch GRUCell + Linear); a window of 2 is not (the check can fail)."""

import pytest

from etrace_bridge.compare.cli import build_parser, config_from_args
from etrace_bridge.compare.config import (
    CompareConfig,
    CompareError,
    method_base,
    method_option,
    method_window,
)
from etrace_bridge.compare.report import _label
from etrace_bridge.compare.runs import run_comparison


def test_window_variants_parse_and_are_checked():
    assert method_base("es_d_rtrl@0.99+w4") == "es_d_rtrl"
    assert method_option("es_d_rtrl@0.99+w4") == 0.99
    assert method_window("es_d_rtrl@0.99+w4") == 4
    assert (method_base("d_rtrl+w1"), method_option("d_rtrl+w1")) == ("d_rtrl", None)
    assert method_window("tbptt@10") is None
    args = build_parser().parse_args(["--methods", "bptt,d_rtrl+w2,hybrid@0.95+w4"])
    assert config_from_args(args).methods == ("bptt", "d_rtrl+w2", "hybrid@0.95+w4")
    for bad, says in [
        ("bptt+w2", "online methods"),
        ("tbptt@4+w2", "tbptt@K"),
        ("d_rtrl+w0", "positive integer"),
        ("d_rtrl+wx", "positive integer"),
        ("es_d_rtrl@2+w2", "decay"),
    ]:
        with pytest.raises(CompareError, match=says):
            CompareConfig(methods=("bptt", bad)).checked()


def test_window_of_the_whole_digit_is_bptt_in_the_app():
    cfg = CompareConfig(
        model="gru",
        task="digits",
        methods=("bptt", "d_rtrl+w8", "es_d_rtrl@0.9+w2"),
        hidden=16,
        epochs=1,
        train_subset=64,
        test_subset=32,
        batch_size=16,
        measure_memory=False,
        progress=False,
    ).checked()
    result = run_comparison(cfg, log=lambda msg: None)
    whole = result.fidelity["d_rtrl+w8"]
    assert len(whole.rows) == 6  # weight_ih, weight_hh, bias_ih, bias_hh, readout w and b
    assert whole.min_cosine > 0.999999, whole.table()
    assert whole.worst_rel_error < 1e-4, whole.table()
    assert result.fidelity["es_d_rtrl@0.9+w2"].min_cosine < 0.9999, "window 2 is not BPTT"
    assert _label(result, "d_rtrl+w8") == "D-RTRL + window 8"
    assert _label(result, "es_d_rtrl@0.9+w2") == "ES-D-RTRL + window 2 (decay 0.9)"
    for method in cfg.methods:
        assert 0.0 <= result.runs[method].final.test_acc <= 1.0
