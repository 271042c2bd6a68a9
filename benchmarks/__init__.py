"""Benchmarks of flashmla_ops (see bench_decode.py, bench_cpu.py)."""
