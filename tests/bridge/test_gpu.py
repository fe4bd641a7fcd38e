"""On a CUDA GPU (skipped without one): torch and JAX share the device, DLPack stays zero-copy,
and online gradients land in `.grad` on the device, equal to the CPU learner's."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from etrace_bridge import OnlineLearner, to_jax, to_torch

pytestmark = pytest.mark.gpu


class _GRUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = nn.GRUCell(6, 16)
        self.readout = nn.Linear(16, 3)

    def forward(self, x, h):
        h = self.cell(x, h)
        return self.readout(h), h


def _online_grads(device: str, algorithm: str):
    torch.manual_seed(0)
    model = _GRUNet().to(device)
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(12, 4, 6, generator=g).to(device)
    ys = torch.randn(12, 4, 3, generator=g).to(device)
    learner = OnlineLearner(
        model,
        algorithm=algorithm,
        loss="mse",
        example_inputs=(xs[0], torch.zeros(4, 16, device=device)),
    )
    loss = learner.run(xs, ys)
    return float(loss), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("algorithm", ["d_rtrl", "es_d_rtrl"])
def test_gradients_land_in_grad_on_the_gpu_and_match_cpu(algorithm):
    # torch's default float32 matmul precision on CUDA is full float32; the bridge runs JAX
    # at the same precision (JAX's own GPU default, TF32, fails the conversion check)
    assert torch.get_float32_matmul_precision() == "highest"
    loss_gpu, gpu = _online_grads("cuda", algorithm)
    loss_cpu, cpu = _online_grads("cpu", algorithm)
    assert abs(loss_gpu - loss_cpu) <= 1e-4 * max(1.0, abs(loss_cpu))
    for name, g in gpu.items():
        assert g is not None and g.is_cuda, name
        ref = cpu[name].numpy()
        err = np.max(np.abs(g.cpu().numpy() - ref)) / max(1e-6, np.max(np.abs(ref)))
        assert err <= 1e-4, (name, err)


def test_dlpack_zero_copy_both_ways_on_cuda():
    t = torch.randn(64, 32, device="cuda")
    a = to_jax(t)
    assert a.devices().pop().platform == "gpu"
    assert a.unsafe_buffer_pointer() == t.data_ptr()
    back = to_torch(a)
    assert back.is_cuda and back.data_ptr() == t.data_ptr()


def test_jax_does_not_grab_the_gpu_when_torch_shares_it():
    code = textwrap.dedent("""
        import torch
        free0, total = torch.cuda.mem_get_info()
        import etrace_bridge, jax, jax.numpy as jnp
        x = jnp.ones((1024, 1024)); (x @ x).block_until_ready()
        free1, _ = torch.cuda.mem_get_info()
        big = torch.empty(int(0.5 * free1) // 4, dtype=torch.float32, device='cuda')
        print((free0 - free1) / total)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) < 0.10  # JAX took < 10% of the GPU
