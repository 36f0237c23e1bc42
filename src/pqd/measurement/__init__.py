"""Measure the exported artifact itself: accuracy, size, latency, complexity.

Proxies (params, MACs, BitOps, sparsity) are read from the ONNX file and
reported beside the measurements, never instead of them.
"""

from pqd.measurement.complexity import onnx_complexity
from pqd.measurement.latency import LatencyStats, compare_latency
from pqd.measurement.runtime import Runner, available_runtimes, open_runner, runtime_versions

__all__ = [
    "LatencyStats",
    "Runner",
    "available_runtimes",
    "compare_latency",
    "onnx_complexity",
    "open_runner",
    "runtime_versions",
]
