"""Benchmarks of etrace: online algorithms vs BPTT and braintrace, and the PyTorch bridge.

Run ``python -m benchmarks [--quick] [--out results.json]`` (or ``etrace-bench``). The entry points
pin XLA and torch to one thread before jax starts; importing this package changes nothing.
"""
