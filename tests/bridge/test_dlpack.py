"""DLPack exchange: zero-copy where possible, explicit copies otherwise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from etrace_bridge.arrays import CPU_ALIGNMENT, matmul_precision, needs_copy, to_jax, to_torch


def _shares(tensor, array):
    return tensor.data_ptr() == array.unsafe_buffer_pointer()


@pytest.mark.parametrize("dtype", [torch.float32, torch.int32, torch.bool, torch.float16])
def test_round_trip_zero_copy(dtype):
    t = (torch.arange(24).reshape(2, 3, 4) % 3).to(dtype)
    a = to_jax(t)
    assert a.shape == (2, 3, 4)
    assert a.dtype == jnp.dtype(str(dtype).removeprefix("torch."))
    assert _shares(t, a)
    back = to_torch(a)
    assert back.dtype == dtype and back.data_ptr() == t.data_ptr()
    assert torch.equal(back, t)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int64])
def test_round_trip_64bit(x64, dtype):
    t = torch.arange(6, dtype=dtype).reshape(2, 3) * 3 - 1
    a = to_jax(t)
    assert a.dtype == jnp.dtype(str(dtype).removeprefix("torch."))
    assert _shares(t, a)
    back = to_torch(a)
    assert back.dtype == dtype and torch.equal(back, t)


def test_64bit_without_x64_raises():
    assert not jax.config.read("jax_enable_x64")
    for dtype in (torch.float64, torch.int64):
        with pytest.raises(TypeError, match="jax_enable_x64"):
            to_jax(torch.zeros(3, dtype=dtype))


def test_memory_is_shared():
    t = torch.zeros(16)
    a = to_jax(t)
    t[3] = 7.0
    assert float(a[3]) == 7.0


def test_requires_grad_is_detached():
    p = torch.nn.Parameter(torch.randn(4, 5))
    a = to_jax(p)
    assert _shares(p, a)
    np.testing.assert_array_equal(np.asarray(a), p.detach().numpy())


def test_transpose_stays_zero_copy():
    t = torch.arange(12.0).reshape(3, 4)
    for view in (t.T, torch.arange(24.0).reshape(2, 3, 4).permute(2, 0, 1)):
        a = to_jax(view, copy=False)
        assert _shares(view, a)
        np.testing.assert_array_equal(np.asarray(a), view.numpy())
        np.testing.assert_array_equal(np.asarray(jax.jit(lambda x: x * 2)(a)), view.numpy() * 2)


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.arange(24.0).reshape(4, 6)[:, ::2],
        lambda: torch.arange(24.0).reshape(4, 6).T[::2],
        lambda: torch.arange(4.0).reshape(4, 1).expand(4, 3),
    ],
)
def test_strided_views_copy_or_raise(make):
    view = make()
    assert needs_copy(view) is not None
    a = to_jax(view)
    np.testing.assert_array_equal(np.asarray(a), view.numpy())
    assert not _shares(view, a)
    with pytest.raises(ValueError, match="copy"):
        to_jax(view, copy=False)


def test_misaligned_view_copies_or_raises():
    base = torch.arange(64.0)
    view = base[1:9]
    assert view.is_contiguous() and view.data_ptr() % CPU_ALIGNMENT != 0
    a = to_jax(view)
    np.testing.assert_array_equal(np.asarray(a), view.numpy())
    with pytest.raises(ValueError, match="aligned"):
        to_jax(view, copy=False)
    aligned = base[CPU_ALIGNMENT // 4 :]
    assert _shares(aligned, to_jax(aligned, copy=False))


def test_copy_true_is_independent():
    t = torch.zeros(8)
    a = to_jax(t, copy=True)
    t[0] = 1.0
    assert float(a[0]) == 0.0
    b = jnp.ones(4)
    back = to_torch(b, copy=True)
    assert back.data_ptr() != b.unsafe_buffer_pointer()


def test_zero_dim_and_empty():
    s = torch.tensor(2.5)
    a = to_jax(s)
    assert a.shape == () and float(a) == 2.5
    assert to_torch(a).shape == () and to_torch(a).item() == 2.5
    for e in (torch.empty(0, 3), torch.empty(0, 6)[:, ::2], torch.arange(10.0)[3:3]):
        a = to_jax(e, copy=False)
        assert a.shape == tuple(e.shape)
        assert tuple(to_torch(a).shape) == tuple(e.shape)


def test_to_torch_rejects_tracers_and_non_arrays():
    with pytest.raises(TypeError, match="concrete"):
        jax.jit(lambda x: to_torch(x))(jnp.ones(2))
    with pytest.raises(TypeError):
        to_torch(np.ones(2))
    with pytest.raises(TypeError):
        to_jax(np.ones(2))


def test_conjugate_view_is_resolved():
    t = torch.tensor([1 + 2j, 3 - 1j], dtype=torch.complex64)
    a = to_jax(t.conj())
    np.testing.assert_array_equal(np.asarray(a), t.conj().resolve_conj().numpy())


@pytest.mark.gpu
def test_cuda_round_trip_keeps_device_and_memory():
    t = torch.arange(12.0, device="cuda:0").reshape(3, 4)
    a = to_jax(t)
    (device,) = a.devices()
    assert device.platform == "gpu" and device.local_hardware_id == t.device.index
    assert _shares(t, a)
    back = to_torch(a)
    assert back.device == t.device and back.data_ptr() == t.data_ptr()
    view = t[:, 1::2]
    np.testing.assert_array_equal(np.asarray(to_jax(view)), view.cpu().numpy())
    with pytest.raises(ValueError):
        to_jax(view, copy=False)
    b = to_torch(jnp.arange(5.0, device=device))
    assert b.is_cuda and torch.equal(b.cpu(), torch.arange(5.0))


def test_matmul_precision_follows_torch_on_cuda_only():
    """JAX's GPU default (TF32) would differ from torch's float32 matmuls by ~1e-3: on CUDA the
    bridge runs JAX at torch's `get_float32_matmul_precision()`; on CPU nothing changes."""
    before = torch.get_float32_matmul_precision()
    outside = jax.config.jax_default_matmul_precision
    try:
        for torch_setting, jax_setting in (
            ("highest", "highest"),
            ("high", "tensorfloat32"),
            ("medium", "bfloat16"),
        ):
            torch.set_float32_matmul_precision(torch_setting)
            with matmul_precision(torch.device("cuda", 0)):
                assert jax.config.jax_default_matmul_precision == jax_setting
            with matmul_precision("cpu"):
                assert jax.config.jax_default_matmul_precision == outside
            assert jax.config.jax_default_matmul_precision == outside
    finally:
        torch.set_float32_matmul_precision(before)
