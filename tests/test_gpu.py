"""The GPU path: training on CUDA (AMP, channels_last), export and measurement on the CPU.

The ``cuda`` tests run only where torch sees a CUDA GPU; everywhere else the check script
must say so in one line instead of failing halfway.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pqd
from helpers import label_with, synthetic_data, tiny
from pqd.pipeline import resolve_device

ROOT = Path(__file__).resolve().parents[1]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible")
def test_gpu_check_script_says_in_one_line_that_there_is_no_gpu() -> None:
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu: no CUDA GPU visible"), r.stderr
    assert "Traceback" not in r.stderr


def test_auto_device_follows_what_torch_sees() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu").type == "cpu"


@pytest.mark.cuda
@cuda
def test_compress_trains_on_cuda_and_ships_a_cpu_int8_file(tmp_path) -> None:
    data = synthetic_data(n_train=128, n_val=64, n_test=64)
    model = tiny("tiny_resnet")
    label_with(model, data)
    result = pqd.compress(
        model,
        data,
        [pqd.Prune(sparsity=0.5, epochs=1), pqd.Quantize(epochs=1), pqd.Distill(epochs=1)],
        tmp_path / "run",
        device="cuda",
        train={"batch_size": 32, "lr": 0.01, "amp": "auto", "channels_last": True},
        measure={"runtimes": ["onnxruntime"], "batch_sizes": [1], "repeats": 20},
    )
    record = result.record
    assert record["device"].startswith("cuda")
    assert record["environment"]["gpu"] == torch.cuda.get_device_name(0)
    final = record["final"]
    assert final["precision"] == "int8" and result.final_onnx.is_file()
    assert final["parity"]["top1_agreement"] >= 0.95
    assert final["masked_sparsity"] == pytest.approx(0.5, abs=0.02)
