"""Which INT8 weights can saturate the int16 sums of x86 kernels without VNNI.

Read from the exported file alone, so a developer on a VNNI machine can prove that a file
is exact on an AVX2 machine without one (see :mod:`pqd.target` for the why).

An AVX2 u8 x s8 kernel (``vpmaddubsw``) multiplies two adjacent uint8 activations by two
adjacent int8 weights along the reduction dimension and adds the pair into a saturating
int16. With activations in [0, 255] the pair sum's largest magnitude is
``255 * (|w_a| + |w_b|)`` when both weights have one sign and ``255 * max(|w_a|, |w_b|)``
(at most 32640, always safe) when they differ, so a pair is at risk exactly when its
weights share a sign and ``255 * (|w_a| + |w_b|) > 32767``.

Pairs are taken as the x86 kernels pack a conv weight: the reduction runs over
(kernel row, kernel column, input channel), input channel fastest (onnxruntime's NHWC
QLinearConv im2col pairs positions 2j and 2j+1 of that sequence; oneDNN's blocked layouts
pair input channels 2i and 2i+1 at one kernel position); both pairings are counted.
Depthwise convs are skipped: their kernels accumulate each product in int32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

INT16_MAX = 32767
UINT8_MAX = 255
_FLOAT_OPS = ("Conv", "Gemm", "MatMul")
_INTEGER_OPS = ("ConvInteger", "MatMulInteger")


def pairs_at_risk(rows: np.ndarray, channels: int | None = None) -> int:
    """How many adjacent weight pairs along the reduction dimension can saturate.

    Args:
        rows: int weights ``[outputs, K]``, K in the kernels' reduction order.
        channels: input channels per kernel position (convs; their pairs at one position
            count too); None for a plain matrix.

    Returns:
        The number of pairs ``(k, k+1)`` at risk, over all rows.
    """
    w = rows.astype(np.int32)
    if w.shape[1] < 2:
        return 0
    a, b = w[:, :-1], w[:, 1:]
    risk = (np.sign(a) * np.sign(b) > 0) & (UINT8_MAX * (np.abs(a) + np.abs(b)) > INT16_MAX)
    k = np.arange(w.shape[1] - 1)
    packed = k % 2 == 0  # im2col order, pairs at even offsets
    if channels is not None and channels > 1:
        c = k % channels
        packed |= (c % 2 == 0) & (c + 1 < channels)  # channel pairs at one kernel position
    return int((risk & packed[None, :]).sum())


def _reduction_rows(op: str, node: onnx.NodeProto, w: np.ndarray) -> tuple[np.ndarray, int | None]:
    """The weight as ``[outputs, K]`` in the kernels' reduction order, and the channel count
    per kernel position for convs."""
    if op in ("Conv", "ConvInteger"):
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        out_ch, in_ch = w.shape[0], w.shape[1]
        if group > 1 and in_ch == 1:
            return np.zeros((0, 0), w.dtype), None  # depthwise: int32 accumulation
        nhwc = np.moveaxis(w, 1, -1)  # [O, kh, kw, I]
        return nhwc.reshape(out_ch, -1), in_ch
    if op == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return (w if trans_b else w.T), None
    return w.T, None  # MatMul(x, W[K, N])


def saturation(path_or_proto: str | Path | onnx.ModelProto) -> dict[str, Any]:
    """Saturation risk of every int8 conv/matmul weight of an ONNX file.

    Args:
        path_or_proto: the ONNX file (or its loaded proto).

    Returns:
        ``{"pairs_at_risk": int, "layers": [names of weights with pairs at risk],
        "checked_layers": int, "max_pair_magnitude": int}``; the largest pair
        ``|w_a| + |w_b|`` (one sign) over the checked weights, 0 for a float file.
    """
    proto = (
        path_or_proto
        if isinstance(path_or_proto, onnx.ModelProto)
        else onnx.load(str(path_or_proto))
    )
    inits = {i.name: i for i in proto.graph.initializer}
    producer = {out: node for node in proto.graph.node for out in node.output}
    total, layers, checked, worst = 0, [], 0, 0
    for node in proto.graph.node:
        if node.op_type in _FLOAT_OPS and len(node.input) > 1:
            dq = producer.get(node.input[1])
            if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
                continue
            init = inits[dq.input[0]]
        elif node.op_type in _INTEGER_OPS and node.input[1] in inits:
            init = inits[node.input[1]]
        else:
            continue
        if init.data_type != onnx.TensorProto.INT8 or len(init.dims) < 2:
            continue
        rows, channels = _reduction_rows(node.op_type, node, numpy_helper.to_array(init))
        if rows.size == 0:
            continue
        checked += 1
        n = pairs_at_risk(rows, channels)
        w = rows.astype(np.int32)
        if w.shape[1] > 1:
            same = np.sign(w[:, :-1]) * np.sign(w[:, 1:]) > 0
            sums = np.where(same, np.abs(w[:, :-1]) + np.abs(w[:, 1:]), 0)
            worst = max(worst, int(sums.max()))
        if n:
            total += n
            layers.append(node.name or init.name)
    return {
        "pairs_at_risk": total,
        "layers": layers,
        "checked_layers": checked,
        "max_pair_magnitude": worst,
    }
