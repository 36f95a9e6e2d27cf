"""Benchmarks as code: parameter grids, warm-up, interleaved rounds, medians, JSON-ready results."""

from nearstore.bench.host import host_pipeline_bench, loader_overhead_bench, nearstore_throughput

__all__ = ["host_pipeline_bench", "loader_overhead_bench", "nearstore_throughput"]
