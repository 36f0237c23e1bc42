"""Export the deployable artifact: one self-contained ONNX file.

Input ``input``: float32 NCHW RGB in [0, 1] with a dynamic batch dimension
(normalisation is inside the graph); output ``logits``. A quantized state is
converted with ``convert_pt2e`` and written as QDQ (QuantizeLinear /
DequantizeLinear around Conv/Gemm): uint8 activations, int8 per-channel weights
(U8S8, which onnxruntime fuses into QLinearConv; S8S8 ran 3.5x slower). The
scales and zero points are the ones learned in QAT, never a fresh calibration.

The example input has batch 2: exporting the converted graph with a batch-1
example fails against the dynamic batch dimension.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn as nn

from pqd.train import set_train

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def _quiet() -> contextlib.ExitStack:
    """Silence the exporter's progress prints and warnings (they are not the user's)."""
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    return stack


def int8_model(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A converted (real INT8 ops) copy of a fake-quantized PT2E graph; the input is kept."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    prepared = copy.deepcopy(graph)
    set_train(prepared, False)
    converted = convert_pt2e(prepared)
    set_train(converted, False)
    return converted


def deployable_model(model: nn.Module, quantized: bool) -> nn.Module:
    """The torch model that the artifact reproduces (INT8-converted when quantized)."""
    if quantized:
        return int8_model(model)
    m = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    set_train(m, False)
    return m


def export_onnx(model: nn.Module, path: str | Path, example: torch.Tensor, *, quantized: bool,
                opset: int = 20) -> tuple[Path, nn.Module]:
    """Write ``model`` to ``path`` as ONNX; returns the path and the exported torch model.

    ``example`` must have batch >= 2. ``quantized`` states are converted to INT8 first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    deploy = deployable_model(model, quantized).cpu()
    example = example[:2].detach().cpu().float()
    batch = torch.export.Dim("batch", min=1, max=4096)
    with _quiet(), torch.no_grad():
        torch.onnx.export(
            deploy, (example,), str(path), dynamo=True, external_data=False,
            dynamic_shapes=({0: batch},), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            opset_version=opset,
        )
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    if quantized:
        check_u8s8(proto)
    return path, deploy


def check_u8s8(proto: onnx.ModelProto) -> None:
    """Raise unless every weight is int8 and every activation uint8 in the QDQ graph."""
    inits = {i.name: i for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        src = node.input[0]
        if src in inits:
            if inits[src].data_type != onnx.TensorProto.INT8:
                raise RuntimeError(f"weight {src} is not int8 in the exported QDQ graph")
        elif len(node.input) > 2 and node.input[2] in inits:
            zp = inits[node.input[2]]
            if zp.data_type != onnx.TensorProto.UINT8:
                raise RuntimeError(f"activation {src} is not uint8 in the exported QDQ graph")


@torch.no_grad()
def torch_predict(model: nn.Module, x_uint8: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Logits of ``model`` on uint8 images (converted to [0, 1]) as a float32 array."""
    outs = []
    for i in range(0, len(x_uint8), batch_size):
        x = x_uint8[i : i + batch_size].float().div_(255.0)
        outs.append(model(x).float().numpy())
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def parity(torch_logits: np.ndarray, artifact_logits: np.ndarray) -> dict[str, Any]:
    """Top-1 agreement (fraction) and max |logit difference| between two models' outputs."""
    n = len(torch_logits)
    agree = float((torch_logits.argmax(1) == artifact_logits.argmax(1)).mean()) if n else 1.0
    diff = float(np.abs(torch_logits - artifact_logits).max()) if n else 0.0
    return {"samples": n, "top1_agreement": agree, "max_abs_logit_diff": diff}
