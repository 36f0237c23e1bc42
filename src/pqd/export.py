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
from onnx import helper, numpy_helper

from pqd import _pt2e_cache
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

    _pt2e_cache.install()
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
    if quantized:
        pad_input_channels(proto)
    strip_debug_metadata(proto)
    onnx.save(proto, str(path))
    onnx.checker.check_model(proto)
    if quantized:
        check_u8s8(proto)
    return path, deploy


def strip_debug_metadata(proto: onnx.ModelProto) -> None:
    """Drop the exporter's per-node debug strings (FX node text, class path, stack trace).

    They are not needed to run the model and dominated small files: 36 of the 46 KB of an
    INT8 tiny_cnn. Node names, and the model-level metadata, are kept.
    """
    for node in proto.graph.node:
        node.ClearField("metadata_props")
        node.ClearField("doc_string")


def pad_input_channels(proto: onnx.ModelProto, multiple: int = 4) -> int:
    """Pad the input channels of INT8 convs fed straight from a float tensor (the RGB stem).

    onnxruntime's U8S8 conv kernel wants input channels in multiples of 4: a 3-channel
    stem ran 2.1x slower than the same conv padded to 4 channels here (87 vs 41 us at
    batch 1, 2 threads). The float input gets zero channels before its QuantizeLinear and
    the int8 weight gets zero input channels, so the result is exactly the same. Returns
    how many convs were padded; ``proto`` is edited in place.
    """
    inits = {i.name: i for i in proto.graph.initializer}
    producer = {out: node for node in proto.graph.node for out in node.output}
    consumers: dict[str, int] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    padded = 0
    pads_before: dict[str, onnx.NodeProto] = {}
    for conv in list(proto.graph.node):
        if conv.op_type != "Conv" or any(a.name == "group" and a.i != 1 for a in conv.attribute):
            continue
        w_dq, x_dq = producer.get(conv.input[1]), producer.get(conv.input[0])
        if not (w_dq and x_dq and w_dq.op_type == x_dq.op_type == "DequantizeLinear"):
            continue
        q = producer.get(x_dq.input[0])
        w_init = inits.get(w_dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or w_init is None or len(w_init.dims) != 4:
            continue
        channels = w_init.dims[1]
        extra = -channels % multiple
        shared = any(consumers.get(n) != 1
                     for n in (conv.input[0], x_dq.input[0], w_dq.input[0]))
        if not extra or shared:
            continue
        w = numpy_helper.to_array(w_init)
        w = np.concatenate([w, np.zeros((w.shape[0], extra, *w.shape[2:]), w.dtype)], axis=1)
        w_init.CopyFrom(numpy_helper.from_array(w, w_init.name))
        pads_name, out_name = f"{q.name}_channel_pads", f"{q.input[0]}_channel_padded"
        proto.graph.initializer.append(
            numpy_helper.from_array(np.array([0, 0, 0, 0, 0, extra, 0, 0], np.int64), pads_name))
        pad = helper.make_node("Pad", [q.input[0], pads_name], [out_name],
                               name=f"{q.name}_channel_pad", mode="constant")
        q.input[0] = out_name
        pads_before[q.name] = pad
        padded += 1
    if padded:  # insert each Pad before its QuantizeLinear in one pass (editing the node
        # list inside the loop would leave the other nodes looked up above stale)
        nodes = list(proto.graph.node)
        proto.graph.ClearField("node")
        for node in nodes:
            if node.name in pads_before:
                proto.graph.node.append(pads_before[node.name])
            proto.graph.node.append(node)
        proto.graph.ClearField("value_info")  # shapes of the old narrow tensors are stale
    return padded


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


def compress_artifact(path: str | Path, preset: int = 9) -> dict[str, Any]:
    """Write ``<path>.xz`` (LZMA, stdlib) next to an ONNX file and check the round trip.

    Zero weights cost almost nothing once compressed, so a sparse INT8 model becomes
    small to ship. The archive is decompressed again, compared byte for byte with the
    original, and loaded by onnxruntime. Returns ``compressed_path`` (file name),
    ``compressed_size_bytes``, ``compression_ratio`` (ONNX bytes / compressed bytes) and
    ``codec``. A side ``.onnx.data`` file, if any, is compressed alongside and counted.
    """
    import lzma

    import onnxruntime as ort

    path = Path(path)
    files = [p for p in (path, path.with_name(path.name + ".data")) if p.exists()]
    raw_size, packed_size = 0, 0
    for f in files:
        raw = f.read_bytes()
        packed = lzma.compress(raw, preset=preset)
        if lzma.decompress(packed) != raw:
            raise RuntimeError(f"{f.name}: the LZMA round trip changed the bytes")
        f.with_name(f.name + ".xz").write_bytes(packed)
        raw_size += len(raw)
        packed_size += len(packed)
    if len(files) == 1:  # self-contained: load the decompressed bytes themselves
        restored = lzma.decompress(path.with_name(path.name + ".xz").read_bytes())
        so = ort.SessionOptions()
        so.log_severity_level = 3
        ort.InferenceSession(restored, so, providers=["CPUExecutionProvider"])
    return {"compressed_path": path.name + ".xz", "compressed_size_bytes": packed_size,
            "compression_ratio": round(raw_size / packed_size, 3), "codec": "xz (lzma)"}
