"""benchmarks/pruning.py: its variant recipes are valid and its table renders."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import load_benchmark

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("pruning")


def test_variants_share_the_baseline_and_differ_only_in_pruning(bench):
    r = bench.recipes(3, 1, "/tmp/base.safetensors")
    assert list(r) == list(bench.VARIANTS)
    assert r["dense"].baseline.epochs == 3 and r["dense"].baseline.checkpoint is None
    assert all(
        v.baseline.checkpoint == "/tmp/base.safetensors" for k, v in r.items() if k != "dense"
    )
    assert r["structured"].order() == "prune_channels -> quantize -> distill"
    assert r["structured"].stages[0].ratio == 0.5 and r["structured"].stages[0].round_to == 8
    assert r["nm"].stages[0].structure == "nm" and r["unstructured"].stages[0].sparsity == 0.9
    assert all(
        v.export.compress and [s.stage for s in v.stages][-2:] == ["quantize", "distill"]
        for v in r.values()
    )


def test_table_reports_the_ratio_against_the_twin(bench):
    def rec(acc, p50_size, order, **final):
        f = {
            "accuracy": acc,
            "size_bytes": p50_size,
            "macs": 1e8,
            "sparsity": 0.0,
            "compressed_size_bytes": p50_size // 2,
            "compression_ratio": 2.0,
            **final,
        }
        return {
            "final": f,
            "order": order,
            "baseline": {**f, "accuracy": 0.8},
            "environment": {"cpu": "CPU"},
            "data": {"test": 1017},
        }

    result = {
        "records": {
            "dense": rec(0.8, 11_000_000, ["quantize", "distill"]),
            "structured": rec(0.78, 3_000_000, ["prune_channels", "quantize", "distill"]),
        },
        "latency": {
            "baseline fp32": {"p50": 6.0, "p90": 7.0},
            "dense": {"p50": 2.0, "p90": 3.0},
            "structured": {"p50": 0.7, "p90": 1.0},
        },
        "run_seconds": {"dense": 100.0},
        "wall_s": 200.0,
        "threads": 2,
        "repeats": 400,
        "rounds": 8,
    }
    text = bench.table(result)
    assert "0.35x (meets the <= 0.6x target)" in text
    assert "accuracy cost 2.00 points" in text
    assert "| structured (INT8) | prune_channels -> quantize -> distill | 78.00% |" in text
