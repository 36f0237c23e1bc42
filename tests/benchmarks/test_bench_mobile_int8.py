"""benchmarks/mobile_int8.py on the block test net: real files, real kernels, real profile."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import load_benchmark


@pytest.mark.slow
def test_block_net_row_has_integer_kernels_a_profile_and_checks(tmp_path: Path, capsys) -> None:
    bench = load_benchmark("mobile_int8")
    out = tmp_path / "m.json"
    argv = ["--models", "tiny_blocks", "--sizes", "32", "--batches", "1", "--repeats", "10"]
    argv += ["--runtimes", "onnxruntime", "--profile", "tiny_blocks", "--profile-sizes", "32"]
    argv += ["--profile-calls", "2", "--json", str(out), "--out", str(tmp_path / "files")]
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())
    rec = result["models"]["tiny_blocks@32"]
    int8 = rec["files"]["int8_pqd"]["ort"]
    # pqd's annotation: every conv of the block net integer, the squeeze-excite gate too
    assert int8["int_convs"] > 0 and int8["float_convs"] == 0
    assert rec["files"]["fp32"]["ort"]["int_convs"] == 0
    row = result["summary"]["tiny_blocks@32"]
    assert row["checks"] == {"no_float_conv": True, "no_float_gate": True}
    b1 = row["batches"]["1"]
    p50 = rec["latency_ms"]["1"]["onnxruntime"]
    assert b1["speedup"] == round(p50["fp32"] / p50["int8_pqd"], 3)
    assert b1["x_floor"] > 1.0  # no file runs faster than the GEMM peak allows
    # the profile splits depthwise from the other convs, in both files
    assert rec["profile_ms"]["fp32"]["depthwise"] > 0
    assert rec["profile_ms"]["int8_pqd"]["depthwise"] > 0
    text = capsys.readouterr().out
    assert "tiny_blocks@32" in text and "no_float_gate: met" in text


def test_checks_flag_a_user_model_slower_in_int8_and_a_float_gate() -> None:
    bench = load_benchmark("mobile_int8")
    ort = {"float_convs": 1, "float_ops": [{"op": "Mul", "count": 2, "why": "gate"}]}
    rec = {
        "size": 224,
        "floor_ms": {"int8": 0.1},
        "files": {"int8_pqd": {"ort": ort}},
        "latency_ms": {
            "1": {"onnxruntime": {"fp32": 1.0, "int8_pqd": 1.1}},
            "64": {"onnxruntime": {"fp32": 40.0, "int8_pqd": 20.0}},
        },
    }
    result = {"floor_ratio": 4.0, "models": {"user_blocks:build@224": rec}}
    checks = bench.summarize(result)["user_blocks:build@224"]["checks"]
    assert checks == {
        "no_float_conv": False,
        "no_float_gate": False,
        "faster than FP32 at batch 1": False,
        "faster than FP32 at batch 64": True,
    }
    result["models"] = {"mobilenetv2@224": rec}
    row = bench.summarize(result)["mobilenetv2@224"]
    assert row["needed_speedup"] == 2.4  # 60% of the floor ratio
    assert row["checks"]["224 b1 speed-up >= 60% of floor ratio"] is False


def test_ceiling_puts_dense_convs_at_the_floor_ratio_and_keeps_the_rest() -> None:
    bench = load_benchmark("mobile_int8")
    profile = {
        "fp32": {"1x1": 4.0, "depthwise": 1.0, "Add": 1.0},
        "int8_pqd": {"1x1": 1.5, "depthwise": 0.8, "QLinearAdd": 0.2},
    }
    got = bench.ceiling(profile, floor_ratio=4.0)
    # bound: 4.0 / 4 for the 1x1 convs + 0.8 + 0.2 measured = 2.0 ms against 6.0 ms
    assert got == {
        "speedup": 3.0,
        "measured": 2.4,
        "depthwise_speedup": 1.25,
        "rest_share": 0.4,
    }
