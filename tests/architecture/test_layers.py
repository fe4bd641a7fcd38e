"""Layer rules of the architecture, checked on the source: who may import whom."""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _imports(path: pathlib.Path) -> set[str]:
    """Absolute module names a file imports (relative imports resolved against its package)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = parts[: len(parts) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _files(package: str, exclude: str | None = None):
    for path in sorted((ROOT / package).rglob("*.py")):
        if exclude is None or exclude not in path.relative_to(ROOT).parts:
            yield path


def _offenders(files, forbidden) -> list[str]:
    return sorted(
        f"{p.relative_to(ROOT)} imports {name}"
        for p in files
        for name in _imports(p)
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    )


def test_core_never_imports_torch_or_the_bridge():
    assert _offenders(_files("etrace_core"), ("torch", "etrace_bridge")) == []


def test_bridge_library_never_imports_the_compare_app():
    files = list(_files("etrace_bridge", exclude="compare"))
    assert files, "no library files found"
    bad = _offenders(
        [p for p in files if p.name != "__main__.py"], ("etrace_bridge.compare", "benchmarks")
    )
    assert bad == []


def test_importing_the_library_loads_no_app_module():
    code = (
        "import sys, etrace_bridge, etrace_bridge.bptt, etrace_bridge.learner; "
        "print(sorted(m for m in sys.modules if m.startswith('etrace_bridge.compare')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_the_checker_sees_a_forbidden_import(tmp_path):
    fake = ROOT / "etrace_bridge" / "_layer_probe_tmp.py"
    fake.write_text("from .compare import config\n")
    try:
        assert _offenders([fake], ("etrace_bridge.compare",)) == [
            "etrace_bridge/_layer_probe_tmp.py imports etrace_bridge.compare",
            "etrace_bridge/_layer_probe_tmp.py imports etrace_bridge.compare.config",
        ]
    finally:
        fake.unlink()
