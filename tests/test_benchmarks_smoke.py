"""Smoke runs of the benchmark entry points with minimal sizes (the real numbers never come from
here: see docs/benchmarks.md and ``python -m benchmarks``)."""

import json
import math

import pytest

from benchmarks import __main__ as bench_main
from benchmarks import algorithms, bridge, cold_start, common, compile_depth, trace_memory
from benchmarks.memory import peak_rss


def _positive_times(med):
    assert med and all(math.isfinite(v) and v > 0 for v in med.values()), med


def test_time_interleaved_and_goal():
    calls = []
    t = common.time_interleaved(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1
    )
    assert len(t["a"].times) == 3 and len(calls) == 8
    assert common.Goal("x", 0.5, 1.0).status == "PASS"
    assert common.Goal("x", 1.5, 1.0).status == "FAIL"
    assert common.Goal("x", None, 1.0).status == "SKIP"


def test_algorithms_timing_smoke():
    r = algorithms.time_model(
        "gru", T=3, repeats=1, warmup=0, methods=("es_d_rtrl", "bptt"), with_braintrace=False
    )
    _positive_times(r["median_s"])
    assert set(r["median_s"]) == {"es_d_rtrl", "bptt"}
    assert r["trace_sizes"]["es_d_rtrl"]


def test_algorithms_memory_case_in_process():
    out = algorithms.memory_case(model="lif", method="es_d_rtrl", T=3)
    assert math.isfinite(out["loss"])


def test_peak_rss_fresh_process():
    r = peak_rss("benchmarks.common:machine_info", {})
    assert r.get("peak_rss_mib", 0) > 0, r
    assert "cpu" in r


def test_algorithm_goals_from_results():
    result = {
        "ratios": {
            "gru_bt": {"es_d_rtrl/bt_pp_prop": 0.7, "d_rtrl/bt_d_rtrl": 0.6, "es_d_rtrl/bptt": 0.9}
        },
        "memory": {
            "gru": {
                m: {"100": {"peak_rss_mib": 100.0}, "10000": {"peak_rss_mib": v}}
                for m, v in (("es_d_rtrl", 101.0), ("bptt", 300.0))
            }
        },
        "config": {"memory_T": [100, 10000]},
    }
    by_name = {g.name: g.status for g in algorithms.goals(result)}
    assert by_name["gru_bt: ES-D-RTRL time / braintrace pp_prop"] == "PASS"
    assert by_name["gru_bt: D-RTRL time / braintrace D_RTRL"] == "FAIL"
    assert by_name["lif: ES-D-RTRL time / braintrace pp_prop"] == "SKIP"
    assert by_name["gru: ES-D-RTRL peak RSS growth T=100 -> 10000"] == "PASS"


@pytest.mark.skipif(not bridge.have_bridge(), reason="etrace_bridge learner not importable")
def test_bridge_smoke():
    with common.torch_threads(1):
        r = bridge.time_steps(T=3, repeats=1, warmup=0)
    _positive_times(r["median_s"])
    assert r["bridged_loss_finite"]
    assert math.isfinite(bridge.memory_case(method="bptt", T=3)["loss"])


@pytest.mark.skipif(not bridge.have_bridge(), reason="etrace_bridge learner not importable")
def test_bridge_step_speed_smoke():
    with common.torch_threads(1):
        r = bridge.step_speed(rounds=1, calls=1, log=lambda *a: None)
    assert r["ratio"] > 0 and r["bridged_step"] > 0 and r["torch_eager_step"] > 0


def test_main_writes_json(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "pin_threads", lambda: True)
    fake = {"goals": [common.Goal("g", 1.0, 2.0).as_dict()]}
    sets = (algorithms, bridge, compile_depth, trace_memory, cold_start)
    for module in sets:
        monkeypatch.setattr(module, "run", lambda **kw: dict(fake))
    out = tmp_path / "r.json"
    assert bench_main.main(["--quick", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["machine"]["cores"] >= 1 and data["versions"]["jax"]
    assert [g["status"] for g in data["goals"]] == ["PASS"] * len(sets)
