"""The opt-in on-disk compilation cache: enabling it makes compiled programs land on disk, and a
fresh process with the same cache gets the learner's sequence program from it (a cache hit)."""

import os
import subprocess
import sys
import textwrap

import jax
import pytest

from etrace_bridge import enable_compilation_cache

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The child ends with os._exit once its result is printed: a process holding torch's and XLA's
# thread pools has (twice, under heavy load) aborted at interpreter shutdown with "terminate
# called without an active exception" after finishing its work; that exit race is not what this
# file checks.
CHILD = textwrap.dedent("""
    import os, sys
    import jax, jax.monitoring, torch
    hits = []
    jax.monitoring.register_event_listener(
        lambda e, **k: hits.append(e) if e == "/jax/compilation_cache/cache_hits" else None)
    from etrace_bridge import OnlineLearner, enable_compilation_cache
    enable_compilation_cache(sys.argv[1])
    torch.manual_seed(0)
    cell = torch.nn.GRUCell(3, 5)
    x, h = torch.randn(7, 2, 3), torch.zeros(2, 5)
    learner = OnlineLearner(cell, algorithm="es_d_rtrl", loss="mse", example_inputs=(x[0], h),
                            decay_or_rank=0.9)
    n = len(hits)
    loss = learner.run(x, torch.randn(7, 2, 5))
    print("RESULT", len(hits) - n, float(loss), flush=True)
    os._exit(0)
""")


def _child(cache_dir):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(cache_dir)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")][-1]
    _, hits, loss = line.split()
    return int(hits), float(loss)


@pytest.fixture
def restore_cache_config():
    keys = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    old = {k: getattr(jax.config, k) for k in keys}
    yield
    for k, v in old.items():
        jax.config.update(k, v)
    from jax.experimental.compilation_cache import compilation_cache

    compilation_cache.reset_cache()


def test_enable_writes_compiled_programs_to_the_directory(tmp_path, restore_cache_config):
    path = enable_compilation_cache(tmp_path / "xla")
    assert path == str(tmp_path / "xla") and os.path.isdir(path)
    jax.jit(lambda a: a * 3.0 + 1.0)(jax.numpy.arange(11.0)).block_until_ready()
    assert os.listdir(path), "no compiled program was written to the cache directory"


def test_second_process_reads_the_learner_program_from_the_cache(tmp_path):
    first, loss1 = _child(tmp_path)  # fills the cache: the run's program is a miss
    second, loss2 = _child(tmp_path)  # same structure: the run's program is read from disk
    assert first == 0
    assert second >= 1
    assert loss1 == loss2
