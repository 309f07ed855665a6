"""Benchmarks: fused kernels (fwd+bwd) and the end-to-end training step. One CLI: `python -m bench.run`."""
