"""The `etrace-compare` command: reports, user models, one-line errors, gradient fidelity."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from etrace_bridge.compare.cli import main
from etrace_bridge.compare.config import CompareConfig
from etrace_bridge.compare.report import PLOTS
from etrace_bridge.compare.runs import run_comparison

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "--epochs",
    "1",
    "--hidden",
    "8",
    "--train-subset",
    "64",
    "--test-subset",
    "32",
    "--batch-size",
    "16",
    "--no-progress",
]
LABELS = ("BPTT", "TBPTT(K=10)", "D-RTRL", "ES-D-RTRL")  # the default methods

USER_MODEL = """
import torch
from torch import nn

class TinyRNN(nn.Module):
    def __init__(self, n_in, n_out, hidden=8):
        super().__init__()
        self.hidden = hidden
        self.cell = nn.RNNCell(n_in, hidden)
        self.readout = nn.Linear(hidden, n_out)

    def initial_state(self, batch_size):
        return (torch.zeros(batch_size, self.hidden),)

    def forward(self, x, h):
        h = self.cell(x, h)
        return self.readout(h), h

def factory(n_in, n_out):
    return TinyRNN(n_in, n_out)
"""

NOT_EXPORTABLE = """
import torch
from torch import nn

class BiGRU(nn.Module):   # reads future inputs: no step-by-step form (refused by name)
    def __init__(self, n_in, n_out):
        super().__init__()
        self.gru = nn.GRU(n_in, 8, bidirectional=True)
        self.readout = nn.Linear(16, n_out)

    def initial_state(self, batch_size):
        return (torch.zeros(2, batch_size, 8),)

    def forward(self, x, h):
        y, h = self.gru(x.unsqueeze(0), h)
        return self.readout(y[0]), h

def factory(n_in, n_out):
    return BiGRU(n_in, n_out)
"""


def _table(out: str, title: str) -> list[str]:
    """Lines of the terminal table called `title` (up to the blank line after it)."""
    lines = out.splitlines()
    start = lines.index(title)
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    return lines[start + 3 : end]


def _assert_one_line_error(rc, err: str):
    """Non-zero exit; besides `[etrace-compare] ...` progress lines, stderr is one error line."""
    assert rc != 0
    lines = [
        line
        for line in err.splitlines()
        if line.strip() and not line.startswith("[etrace-compare]")
    ]
    assert len(lines) == 1, err
    assert lines[0].startswith("etrace-compare: error: "), err
    assert "Traceback" not in err


def test_user_model_file(tmp_path, capsys):
    path = tmp_path / "my_model.py"
    path.write_text(USER_MODEL)
    rc = main(["--model", f"{path}:factory", "--methods", "bptt,es_d_rtrl", "--no-memory", *TINY])
    out = capsys.readouterr().out
    assert rc == 0
    assert [r.split()[0] for r in _table(out, "Learning summary")] == ["BPTT", "ES-D-RTRL"]
    assert "cell.weight_ih" in out


@pytest.mark.parametrize(
    "case",
    [
        "model",
        "task",
        "method",
        "missing_file",
        "import_error",
        "no_factory",
        "not_exportable",
        "setting",
        "window",
        "decay",
        "budget",
        "stream_task",
    ],
)
def test_bad_input_is_one_line_error(case, tmp_path, capsys):
    files = {
        "import_error": "import torch\nraise RuntimeError('broken on purpose')\n",
        "no_factory": "x = 1\n",
        "not_exportable": NOT_EXPORTABLE,
    }
    if case in files:
        (tmp_path / "m.py").write_text(files[case])
    args = {
        "model": ["--model", "transformer"],
        "task": ["--task", "imagenet"],
        "method": ["--methods", "bptt,rtrl"],
        "missing_file": ["--model", str(tmp_path / "nope.py:factory")],
        "import_error": ["--model", f"{tmp_path / 'm.py'}:factory"],
        "no_factory": ["--model", f"{tmp_path / 'm.py'}:factory"],
        "not_exportable": ["--model", f"{tmp_path / 'm.py'}:factory", "--methods", "bptt,d_rtrl"],
        "setting": ["--task", "digits", "--delay", "50"],
        "window": ["--methods", "bptt,tbptt@0"],
        "decay": ["--methods", "es_d_rtrl@1.5"],
        "budget": ["--memory-budget", "-5"],
        "stream_task": ["--task", "digits", "--stream"],
    }[case]
    rc = main([*args, "--no-memory", *TINY])
    err = capsys.readouterr().err
    _assert_one_line_error(rc, err)
    expected = {
        "model": "transformer",
        "task": "imagenet",
        "method": "rtrl",
        "missing_file": "not found",
        "import_error": "broken on purpose",
        "no_factory": "factory",
        "not_exportable": "d_rtrl",
        "setting": "does not take --delay",
        "window": "tbptt@0",
        "decay": "es_d_rtrl@1.5",
        "budget": "--memory-budget",
        "stream_task": "--stream",
    }[case]
    assert expected in err


def _command():
    script = shutil.which("etrace-compare")
    return [script] if script else [sys.executable, "-m", "etrace_bridge"]


def _env():
    """This checkout first on the path: the console script may belong to another checkout."""
    path = os.environ.get("PYTHONPATH")
    return {
        **os.environ,
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else ""),
    }


def test_quick_in_a_real_process_writes_report_tables_and_plots(tmp_path):
    """The console script end to end: the default long-horizon comparison (cue-delay, BPTT,
    TBPTT, D-RTRL, ES-D-RTRL) in every table, report.md and four PNGs."""
    out_dir = tmp_path / "report"
    run = subprocess.run(
        [
            *_command(),
            "--quick",
            *TINY,
            "--delay",
            "12",
            "--seq-lens",
            "8,64",
            "--out",
            str(out_dir),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_env(),
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    for title in (
        "Learning summary",
        "Peak memory vs sequence length",
        "Time per training step vs sequence length",
    ):
        rows = _table(run.stdout, title)
        assert [r.split()[0] for r in rows] == list(LABELS), (title, rows)
        assert not any("n/a" in r for r in rows), rows
    costs = _table(run.stdout, "Memory: fixed cost, growth per step, crossover with BPTT")
    assert [r.split()[0] for r in costs] == list(LABELS), costs
    fidelity = "\n".join(_table(run.stdout, "Gradient fidelity vs BPTT at initialisation"))
    assert "input.weight" in fidelity and "readout.bias" in fidelity
    assert "cue_delay" in run.stderr and "T=14" in run.stderr
    report = (out_dir / "report.md").read_text()
    for name in PLOTS:
        assert (out_dir / name).stat().st_size > 5000, name
        assert f"]({name})" in report
    for label in LABELS:
        assert f"| {label} |" in report
    assert "etrace-compare --quick" in report and "torch" in report


def test_bad_input_in_a_real_process_is_one_line(tmp_path):
    bad = subprocess.run(
        [sys.executable, "-m", "etrace_bridge", "--model", "nope"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_env(),
        timeout=300,
    )
    _assert_one_line_error(bad.returncode, bad.stderr)
    assert "unknown model 'nope'" in bad.stderr


def test_d_rtrl_is_exact_for_the_leaky_model():
    """Element-wise recurrence: D-RTRL's online gradient equals BPTT's (whole bridge end to end)."""
    cfg = CompareConfig(
        model="leaky",
        task="digits",
        methods=("d_rtrl",),
        hidden=16,
        epochs=1,
        train_subset=64,
        test_subset=32,
        batch_size=16,
        measure_memory=False,
        progress=False,
    ).checked()
    result = run_comparison(cfg, log=lambda msg: None)
    report = result.fidelity["d_rtrl"]
    assert {r.name for r in report.rows} == {
        "input.weight",
        "input.bias",
        "readout.weight",
        "readout.bias",
    }
    assert report.min_cosine > 0.999999, report.table()
    assert report.worst_rel_error < 1e-3, report.table()


def test_task_and_method_flags_reach_the_config():
    from etrace_bridge.compare.cli import build_parser, config_from_args

    args = build_parser().parse_args(
        [
            "--delay",
            "30",
            "--distractors",
            "2",
            "--cues",
            "3",
            "--tbptt-window",
            "7",
            "--tbptt-update",
            "sequence",
            "--methods",
            "bptt,tbptt@40,es_d_rtrl@0.99,d_rtrl",
            "--decay",
            "0.95",
            "--memory-budget",
            "2048",
            "--stream",
            "--stream-every",
            "5",
        ]
    )
    cfg = config_from_args(args)
    assert (cfg.task, cfg.model) == ("cue_delay", "multiscale")
    assert cfg.task_kwargs() == {"delay": 30, "distractors": 2, "n_cues": 3}
    assert (cfg.tbptt_window, cfg.tbptt_update, cfg.decay) == (7, "sequence", 0.95)
    assert cfg.methods == ("bptt", "tbptt@40", "es_d_rtrl@0.99", "d_rtrl")
    assert (cfg.memory_budget, cfg.stream, cfg.stream_every) == (2048.0, True, 5)
    default = config_from_args(build_parser().parse_args([]))
    quick = config_from_args(build_parser().parse_args(["--quick"]))
    assert default.methods == ("bptt", "tbptt", "d_rtrl", "es_d_rtrl") and default.decay is None
    assert default.delay == 100 and max(default.seq_lens) == 50000 and quick.delay == 40
    digits = config_from_args(build_parser().parse_args(["--task", "digits"]))
    assert digits.delay is None and digits.model == "gru"  # the short-sequence case as before


def test_decay_auto_follows_the_horizon():
    from etrace_bridge.compare.tasks import cue_delay, sequential_digits
    from etrace_bridge.compare.trainers import trace_decay

    cfg = CompareConfig().checked()
    assert trace_decay("es_d_rtrl", cue_delay(4, 4, delay=99), cfg) == pytest.approx(0.99)
    assert trace_decay("es_d_rtrl", sequential_digits(), cfg) == 0.9  # never below 0.9
    assert trace_decay("es_d_rtrl@0.5", cue_delay(4, 4, delay=99), cfg) == 0.5
    fixed = CompareConfig(decay=0.8).checked()
    assert trace_decay("hybrid", cue_delay(4, 4, delay=99), fixed) == 0.8


def test_stream_mode_learns_step_by_step(tmp_path, capsys):
    """--stream: BPTT is reported as not applicable, the others give accuracy over time."""
    rc = main(
        [
            "--stream",
            "--hidden",
            "4",
            "--delay",
            "3",
            "--batch-size",
            "4",
            "--stream-trials",
            "12",
            "--stream-every",
            "5",
            "--no-progress",
            "--methods",
            "bptt,tbptt,d_rtrl",
            "--out",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    rows = _table(out, "Stream: accuracy over time")
    assert [r.split()[0] for r in rows] == ["BPTT", "TBPTT(K=5)", "D-RTRL"]
    assert "not applicable" in rows[0]
    for row in rows[1:]:
        first = float(row.split()[1].rstrip("%"))
        assert 0.0 <= first <= 100.0
    assert (tmp_path / "accuracy_over_time.png").stat().st_size > 5000
    assert "accuracy_over_time.png" in (tmp_path / "report.md").read_text()
