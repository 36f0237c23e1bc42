"""benchmarks/imagenet_res.py: the table puts FP32 and INT8 p50 side by side with the
speed-up, names the CPU and says the accuracies are not meaningful."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import load_benchmark

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("imagenet_res")


def test_table_has_fp32_and_int8_side_by_side(bench) -> None:
    row = {"macs": 1_814_073_344, "fp32_acc": 0.1, "int8_acc": 0.125, "wall_s": 90.0}
    rows = [
        {**row, "size": 64, "fp32_p50": 2.0, "int8_p50": 1.0, "threads": 2},
        {**row, "size": 224, "fp32_p50": 30.0, "int8_p50": 10.0, "threads": 2},
    ]
    text = bench.render(rows, "Some CPU (2 logical CPUs; flags: avx2)")
    lines = text.splitlines()
    assert "| FP32 p50 ms | INT8 p50 ms | INT8 speed-up |" in lines[0]
    assert "| 64x64 | 1.814 | 2.00 | 1.00 | 2.00x |" in text
    assert "| 224x224 | 1.814 | 30.00 | 10.00 | 3.00x |" in text
    assert "CPU: Some CPU" in text and "accuracies not meaningful" in text


def test_cpu_line_names_the_model(bench) -> None:
    line = bench.cpu_line()
    assert "logical CPUs" in line and "flags:" in line and line.split(" (")[0]
