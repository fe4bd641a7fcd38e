"""Shared fixtures: float64 scope, GPU detection."""

import contextlib

import jax
import pytest


@contextlib.contextmanager
def x64_enabled():
    """Enable JAX float64 inside the block and restore the previous setting after."""
    previous = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


@pytest.fixture
def x64():
    """Run one test with JAX float64 enabled (exactness checks)."""
    with x64_enabled():
        yield


def _has_cuda():
    try:
        import torch

        return torch.cuda.is_available() and any(d.platform == "gpu" for d in jax.devices())
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="no CUDA device here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
