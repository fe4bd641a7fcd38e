"""The examples run (`main(['--quick'])`, in-process) and report a learning result.

Each example prints one `learning result:` line and returns its metrics; the checks below ask
for clearly better than chance, with margins that the quick runs beat comfortably.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str):
    """Import examples/<name>.py once per process (it may register torch custom ops)."""
    key = f"_etrace_example_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def run_quick(name: str, capsys) -> tuple[dict, str]:
    result = load(name).main(["--quick"])
    out = capsys.readouterr().out
    assert "learning result:" in out, out
    assert "epoch" in out, out
    return result, out


def test_torch_gru_online_learns_digits(capsys):
    result, _ = run_quick("torch_gru_online", capsys)
    history = result["history"]
    assert result["final_test_accuracy"] > 0.3, history  # 10 classes: chance 0.1
    assert history[-1]["loss"] < history[0]["loss"], history


def test_snn_custom_op_learns_dms(capsys):
    result, _ = run_quick("snn_custom_op", capsys)
    assert result["last_loss"] < result["first_loss"], result["history"]
    assert result["final_test_accuracy"] > 0.6, result["history"]  # chance 0.5


def test_jax_native_learns(capsys):
    result, _ = run_quick("jax_native", capsys)
    assert result["last_loss"] < result["first_loss"], result["history"]
    assert result["final_test_accuracy"] > 0.65, result["history"]  # chance 0.5


@pytest.mark.parametrize("name", ["torch_gru_online", "snn_custom_op", "jax_native"])
def test_examples_have_main_and_quick_flag(name):
    source = (EXAMPLES / f"{name}.py").read_text()
    assert "def main(argv=None)" in source and "--quick" in source
    assert 'if __name__ == "__main__":' in source


@pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("snntorch", "spikingjelly")),
    reason="snntorch/spikingjelly not installed (the `snn` extra, --no-deps)",
)
def test_snn_libraries_learn(capsys):
    result, _ = run_quick("snn_libraries", capsys)
    for name in ("snntorch", "spikingjelly"):
        r = result[name]
        assert r["last_loss"] < r["first_loss"], r["history"]
        assert r["final_test_accuracy"] > 0.7, r["history"]  # chance 0.5
