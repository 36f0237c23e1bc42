"""The saturation check (pqd.measurement.saturation) against an emulation of the AVX2 int16 pair
sums, on exported files of both weight ranges, and against real AVX2 kernels: OpenVINO's
oneDNN capped at AVX2 (``ONEDNN_MAX_CPU_ISA``) runs the AVX2 kernels on a VNNI CPU."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import onnx_weights, tiny
from pqd.measurement.env import cpu_flags, has_vnni
from pqd.measurement.runtime import avx2_logits, open_runner
from pqd.measurement.saturation import pairs_at_risk, saturation
from pqd.onnx_export import export_onnx
from pqd.quant.prepare import prepare_qat
from pqd.quant.scheme import DEFAULT_SCHEME, weight_range
from pqd.train import set_train


def emulated_pair_sums(w: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """vpmaddubsw over one row: adjacent (even, odd) products summed, exact and saturated."""
    prod = a.astype(np.int64) * w.astype(np.int64)
    exact = prod[0::2] + prod[1::2]
    return exact, np.clip(exact, -32768, 32767)


def test_pairs_at_risk_is_exactly_when_some_input_saturates() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        w = rng.integers(-128, 128, size=(1, 8)).astype(np.int8)
        at_risk = pairs_at_risk(w)
        # the worst input for each pair: 255 where the weight has the pair's common sign
        worst = np.where(w[0] != 0, 255, 0).astype(np.uint8)
        exact, sat = emulated_pair_sums(w[0], worst)
        saturated = int((exact != sat).sum())
        # opposite signs: the worst input saturates nothing; pairs counted = pairs saturated
        assert at_risk == saturated, (w, at_risk, saturated)
    # 7-bit weights never saturate, whatever the input
    w7 = rng.integers(-64, 64, size=(64, 32)).astype(np.int8)
    assert pairs_at_risk(w7, channels=4) == 0
    for a in (np.full(32, 255, np.uint8), rng.integers(0, 256, 32).astype(np.uint8)):
        for row in w7:
            exact, sat = emulated_pair_sums(row, a)
            assert (exact == sat).all()


def _exported(tmp: Path, reduce_range: bool) -> Path:
    scheme = {**copy.deepcopy(DEFAULT_SCHEME), "reduce_range": reduce_range}
    graph = prepare_qat(tiny(), torch.rand(2, 3, 32, 32), scheme)
    with torch.no_grad():
        for _ in range(3):
            graph(torch.rand(16, 3, 32, 32))
    set_train(graph, False)
    path, _ = export_onnx(
        graph, tmp / f"rr{int(reduce_range)}.onnx", torch.rand(2, 3, 32, 32), quantized=True
    )
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("sat")
    return {"portable": _exported(tmp, True), "x86-vnni": _exported(tmp, False)}


@pytest.mark.slow
def test_the_portable_file_holds_7bit_weights_and_no_pair_at_risk(files) -> None:
    assert weight_range({**DEFAULT_SCHEME}) == (-64, 63)
    weights = [r["weight"] for r in onnx_weights(files["portable"]) if r["weight"].ndim >= 2]
    lo, hi = weight_range({**DEFAULT_SCHEME})
    assert weights and all(w.min() >= lo and w.max() <= hi for w in weights)
    report = saturation(files["portable"])
    assert report["pairs_at_risk"] == 0 and report["layers"] == []
    assert report["checked_layers"] == len(weights) and report["max_pair_magnitude"] <= 128


def test_the_8bit_file_uses_the_full_range_and_is_flagged(files) -> None:
    weights = [r["weight"] for r in onnx_weights(files["x86-vnni"]) if r["weight"].ndim >= 2]
    assert max(int(np.abs(w.astype(np.int32)).max()) for w in weights) > 100
    report = saturation(files["x86-vnni"])
    assert report["pairs_at_risk"] > 0 and report["layers"]
    assert report["max_pair_magnitude"] > 128


def _openvino_logits(path: Path, avx2: bool) -> np.ndarray:
    x = np.random.default_rng(0).random((64, 3, 32, 32), dtype=np.float32)
    if avx2:
        return avx2_logits(path, x, threads=1)
    return open_runner("openvino", path, threads=1).run(x)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino not installed")
def test_avx2_kernels_match_the_portable_file_exactly(files) -> None:
    """The portable file gives the same logits on AVX2 kernels as on this CPU's best ones; on
    a VNNI CPU the 8-bit file does not (so the comparison can tell the two apart)."""
    native = _openvino_logits(files["portable"], False)
    avx2 = _openvino_logits(files["portable"], True)
    np.testing.assert_allclose(avx2, native, atol=1e-5)
    if has_vnni(cpu_flags()):
        native8 = _openvino_logits(files["x86-vnni"], False)
        avx2_8 = _openvino_logits(files["x86-vnni"], True)
        assert np.abs(avx2_8 - native8).max() > 1e-3  # int16 pair sums saturated
