"""The exporter's function registry, built once per process, changes nothing but speed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import tiny
from pqd.onnx_export import export_onnx, registry
from pqd.quant.prepare import prepare_qat


def test_the_registry_is_built_once_and_the_files_are_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exports share one build of torch's ONNX registry; each gets a copy of its own (a
    registry emptied by one export leaves the next one's whole); a library of ops loaded
    later makes a new build; FP32 and INT8 files are the same bytes as with torch's own
    registry built anew."""
    from torch.onnx._internal.exporter import _registration as reg

    assert registry.install()
    memo = reg.ONNXRegistry.__dict__["from_torchlib"].__func__
    model, x = tiny("tiny_cnn"), torch.rand(2, 3, 32, 32)
    graph = prepare_qat(tiny("tiny_cnn"), x)
    graph(torch.rand(8, 3, 32, 32))
    export_onnx(model, tmp_path / "fp32.onnx", x, quantized=False)
    export_onnx(graph, tmp_path / "int8.onnx", x, quantized=True)
    builds = len(memo.built)
    assert builds >= 1
    first = reg.ONNXRegistry.from_torchlib(opset_version=20)  # the opset pqd exports
    first.functions.clear()
    assert reg.ONNXRegistry.from_torchlib(opset_version=20).functions  # a copy each time
    assert len(memo.built) == builds  # no build more
    lib = torch.library.Library("pqd_registry_test", "DEF")  # a library loaded later
    lib.define("noop(Tensor x) -> Tensor")
    assert reg.ONNXRegistry.from_torchlib(opset_version=20).functions
    assert len(memo.built) == builds + 1  # built again: its ops may have functions

    torch_own = classmethod(memo.__wrapped__.__func__)
    monkeypatch.setattr(reg.ONNXRegistry, "from_torchlib", torch_own)
    export_onnx(model, tmp_path / "fp32-torch.onnx", x, quantized=False)
    export_onnx(graph, tmp_path / "int8-torch.onnx", x, quantized=True)
    for name in ("fp32", "int8"):
        ours = (tmp_path / f"{name}.onnx").read_bytes()
        assert ours == (tmp_path / f"{name}-torch.onnx").read_bytes(), name
