"""The code in the documentation runs, so the pages cannot silently rot.

Every ```python block of the executed pages below runs, in page order, in one namespace per page
(fresh for each page), inside a temporary working directory. A block preceded by the line
`<!-- no-test -->` is skipped (used only for snippets that are deliberately slow or partial).
Sizes in the pages are small, so the whole file stays well under 90 s on 2 CPU cores.

Only the pages this file owns are executed; the other pages under docs/ are not run here.
Also checked: the index links every page, the API reference names every public name of
`etrace_core` and `etrace_bridge`, and the images the pages show exist.

Run one page by hand, printing each block's output: `python tests/test_docs.py docs/compiler.md`.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import time
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"

# pages whose ```python blocks are executed (in this order)
EXECUTED_PAGES = [
    "quickstart_pytorch.md",
    "quickstart_jax.md",
    "concepts.md",
    "compiler.md",
    "limitations.md",
]
# pages owned with the executed ones (no code to run, checked for links/names)
OWNED_PAGES = EXECUTED_PAGES + ["index.md", "api.md"]

NO_TEST = "<!-- no-test -->"
_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def python_blocks(text: str):
    """[(line number, code)] of the ```python blocks not marked <!-- no-test -->."""
    blocks = []
    for m in _FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").splitlines()
        previous = before[-1].strip() if before else ""
        if previous == NO_TEST:
            continue
        blocks.append((text.count("\n", 0, m.start()) + 2, m.group(1)))
    return blocks


@contextlib.contextmanager
def _restored_globals():
    """Undo what a page may change process-wide (JAX x64, torch default dtype, cwd)."""
    import jax
    import torch

    x64 = jax.config.read("jax_enable_x64")
    dtype = torch.get_default_dtype()
    cwd = os.getcwd()
    try:
        yield
    finally:
        os.chdir(cwd)
        jax.config.update("jax_enable_x64", x64)
        torch.set_default_dtype(dtype)


def run_page(page: str, workdir: Path, echo: bool = False) -> dict:
    """Execute the page's blocks in order in one fresh namespace; returns the namespace."""
    path = DOCS / page
    namespace = {"__name__": f"docs_{path.stem}"}
    with _restored_globals():
        os.chdir(workdir)
        for line, code in python_blocks(path.read_text()):
            start = time.perf_counter()
            out = io.StringIO()
            try:
                with contextlib.redirect_stdout(out):
                    exec(compile(code, f"{path}:{line}", "exec"), namespace)
            except Exception as err:
                raise AssertionError(
                    f"{page}, block at line {line} failed: {type(err).__name__}: {err}\n"
                    f"--- output so far ---\n{out.getvalue()}"
                ) from err
            if echo:
                print(f"----- {page}:{line} ({time.perf_counter() - start:.1f} s)")
                print(out.getvalue(), end="")
    return namespace


@pytest.mark.parametrize("page", EXECUTED_PAGES)
def test_page_code_runs(page, tmp_path):
    assert python_blocks((DOCS / page).read_text()), f"{page} has no executed code"
    run_page(page, tmp_path)


def test_no_test_marker_is_used_sparingly():
    skipped = sum((DOCS / p).read_text().count(NO_TEST) for p in OWNED_PAGES)
    total = sum(len(_FENCE.findall((DOCS / p).read_text())) for p in OWNED_PAGES)
    assert skipped <= max(3, total // 5), f"{skipped} of {total} python blocks are not executed"


def _links(text: str):
    return re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)


def test_index_links_every_page():
    index = (DOCS / "index.md").read_text()
    linked = set(_links(index))
    missing = [p for p in OWNED_PAGES if p != "index.md" and p not in linked]
    assert not missing, f"docs/index.md does not link {missing}"


def test_links_and_images_of_owned_pages_exist():
    broken = []
    for page in OWNED_PAGES:
        for target in _links((DOCS / page).read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (DOCS / target).resolve().exists():
                broken.append(f"{page} -> {target}")
    assert not broken, f"broken links: {broken}"


def test_api_reference_names_every_public_name():
    import etrace_bridge
    import etrace_core

    api = (DOCS / "api.md").read_text()
    missing = [
        f"{mod.__name__}.{name}"
        for mod in (etrace_core, etrace_bridge)
        for name in mod.__all__
        if f"`{name}" not in api
    ]
    assert not missing, f"docs/api.md does not document {missing}"


if __name__ == "__main__":  # python tests/test_docs.py docs/page.md [...]
    import tempfile

    for arg in sys.argv[1:] or EXECUTED_PAGES:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            run_page(Path(arg).name, Path(tmp), echo=True)
            print(f"===== {arg}: {time.perf_counter() - t0:.1f} s")
