"""etrace-compare takes stock SNN-library networks (`examples/snn_compare_models.py`)."""

import importlib.util
import pathlib

import pytest

from etrace_bridge.compare.config import CompareConfig
from etrace_bridge.compare.runs import run_comparison

FILE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "snn_compare_models.py"


@pytest.mark.parametrize(
    "factory,library",
    [("snntorch_classifier", "snntorch"), ("spikingjelly_classifier", "spikingjelly")],
)
def test_compare_trains_a_library_network_and_d_rtrl_matches_bptt(factory, library):
    if importlib.util.find_spec(library) is None:
        pytest.skip(f"{library} is not installed (the `snn` extra, installed with --no-deps)")
    cfg = CompareConfig(
        model=f"{FILE}:{factory}",
        task="digits",
        methods=("bptt", "d_rtrl", "es_d_rtrl"),
        epochs=1,
        train_subset=64,
        test_subset=32,
        measure_memory=False,
        sweep=False,
        progress=False,
    ).checked()
    result = run_comparison(cfg, log=lambda msg: None)
    assert set(result.runs) == {"bptt", "d_rtrl", "es_d_rtrl"}
    # one spiking layer with an element-wise (leaky) recurrence and a memoryless readout:
    # D-RTRL is BPTT (float32 rounding), ES-D-RTRL approximates the input weights
    assert result.fidelity["d_rtrl"].worst_rel_error <= 1e-5, result.fidelity["d_rtrl"].table()
    assert min(r.cosine for r in result.fidelity["es_d_rtrl"].rows) > 0.9
