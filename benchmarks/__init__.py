"""Benchmarks for p2pd, run as modules: ``python -m benchmarks.bench_mirror``."""
