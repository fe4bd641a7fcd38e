"""The bridge on one CUDA GPU: OnlineLearner.run against torch BPTT of the same model on the
same GPU (same-run ratios), and the device allocators' peaks.

Model: nn.GRUCell(32, H) + nn.Linear(H, 10), batch 32, MSE, T in {100, 1000}. Run with
``python -m benchmarks.gpu_bridge`` on a machine with CUDA (prints a table; exits 0 without one).
"""

from __future__ import annotations

from .bridge import BATCH, N_IN, N_OUT, torch_model
from .common import time_interleaved


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: GPU bridge benchmark skipped")
        return 0
    import jax

    from etrace_bridge import OnlineLearner

    dev = "cuda"
    print(
        f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}, "
        f"jax {jax.__version__} ({jax.devices()[0].platform})"
    )
    print(
        f"{'H':>5} {'T':>6} {'BPTT s':>9} {'ES-D-RTRL s':>12} {'D-RTRL s':>10} "
        f"{'ES/BPTT':>8} {'D/BPTT':>7} {'BPTT peak MiB':>14}"
    )
    for hidden in (128, 512):
        for T in (100, 1000):
            model = torch_model(hidden=hidden).to(dev)
            xs = torch.randn(T, BATCH, N_IN, device=dev)
            ys = torch.randn(T, BATCH, N_OUT, device=dev)

            def bptt():
                model.zero_grad(set_to_none=True)
                h = torch.zeros(BATCH, hidden, device=dev)
                loss = 0.0
                for t in range(T):
                    y, h = model(xs[t], h)
                    loss = loss + torch.nn.functional.mse_loss(y, ys[t])
                loss.backward()
                torch.cuda.synchronize()

            def online(learner):
                def run():
                    model.zero_grad(set_to_none=True)
                    learner.reset_state(BATCH)
                    learner.run(xs, ys)
                    torch.cuda.synchronize()

                return run

            cases = {"bptt": bptt}
            for algo in ("es_d_rtrl", "d_rtrl"):
                cases[algo] = online(
                    OnlineLearner(
                        model,
                        algorithm=algo,
                        loss="mse",
                        example_inputs=(xs[0], torch.zeros(BATCH, hidden, device=dev)),
                    )
                )
            torch.cuda.reset_peak_memory_stats()
            bptt()
            peak = torch.cuda.max_memory_allocated() / 2**20
            timing = time_interleaved(cases, repeats=5, warmup=1)
            row = {name: t.median for name, t in timing.items()}
            t_bptt = row["bptt"]
            print(
                f"{hidden:>5} {T:>6} {t_bptt:>9.4f} {row['es_d_rtrl']:>12.4f} "
                f"{row['d_rtrl']:>10.4f} {row['es_d_rtrl'] / t_bptt:>8.2f} "
                f"{row['d_rtrl'] / t_bptt:>7.2f} {peak:>14.1f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
