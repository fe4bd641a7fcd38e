"""tools/braintrace_suite.py sorts braintrace's test failures honestly: the deliberate
differences come from one place (the docs' table), and only names that start with ``_`` count
as braintrace-private. (Running braintrace's suite needs a braintrace checkout; not done here.)"""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location(
    "braintrace_suite", ROOT / "tools/braintrace_suite.py"
)
suite = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(suite)


def test_deliberate_differences_are_read_from_the_docs_table():
    entries = suite.deliberate_differences()
    assert "braintrace/nn/_rnn_test.py::TestGRUCell::test_gru_basic_creation" in entries
    for e in entries:
        file, _, test = e.partition("::")
        assert file.endswith("_test.py") and test.split("::")[-1].startswith("test"), e


def test_test_ids_and_brackets():
    f = "braintrace/_algorithm/tests/axis_discrimination_test.py"
    tid = suite.test_id(
        f,
        "tests.braintrace._algorithm.tests.axis_discrimination_test"
        "::test_finite_window_does_see_the_axis[recurrence scope]",
    )
    assert tid == f + "::test_finite_window_does_see_the_axis[recurrence scope]"
    assert suite.listed(tid, tid) and not suite.listed(
        tid, f + "::test_finite_window_does_see_the_axis[r]"
    )
    assert suite.listed(tid, f + "::test_finite_window_does_see_the_axis[*]")
    g = "braintrace/nn/_rnn_test.py"
    assert (
        suite.test_id(g, "tests.braintrace.nn._rnn_test.TestGRUCell::test_gru_basic_creation")
        == g + "::TestGRUCell::test_gru_basic_creation"
    )


def test_classes():
    listed = ["braintrace/nn/_rnn_test.py::TestGRUCell::*"]

    names = {"_get_etrace_data", "_DEPRECATED"}  # the `_names` braintrace's own code uses

    def cls(message, tid="braintrace/x_test.py::test_a", detail=""):
        return suite.classify(tid, message, listed, detail, names)

    assert cls("assert False", "braintrace/nn/_rnn_test.py::TestGRUCell::test_b") == "deliberate"
    assert cls("AttributeError: 'D_RTRL' object has no attribute '_get_etrace_data'") == "private"
    assert cls("ModuleNotFoundError: No module named 'braintrace.nn._conv'") == "private"
    assert (
        cls("AttributeError: module 'etrace_core.nn' has no attribute '_DEPRECATED'") == "private"
    )
    # an underscore attribute braintrace's code does not name is etrace's own bug: real
    assert cls("AttributeError: 'D_RTRL' object has no attribute '_plan'") == "real"
    assert cls("ModuleNotFoundError: No module named 'numba'") == "environment"
    wrapped = "jax.errors.JaxRuntimeError: INTERNAL: CpuCallback error calling callback: Trace"
    assert cls(wrapped, detail="ModuleNotFoundError: No module named 'psutil'") == "environment"
    assert cls(wrapped, detail="ValueError: bad") == "real"
    # public names etrace lacks are real failures, also when braintrace's docs do not list them
    assert cls("AttributeError: 'D_RTRL' object has no attribute 'etrace_bwg'") == "real"
    assert cls("AttributeError: module 'etrace_core' has no attribute 'UORO'") == "real"
    assert cls("ModuleNotFoundError: No module named 'etrace_core.x'") == "real"
    assert cls("ModuleNotFoundError: No module named 'braintrace._testing'") == "real"
