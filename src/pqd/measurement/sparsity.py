"""N:M sparsity read back from an exported ONNX file.

Each Conv / Gemm / MatMul weight is read as stored: FP32 initializers directly,
INT8 weights through their DequantizeLinear (zero points are 0, so a stored 0 is
a weight of exactly 0). Layers are named by the torch parameter they came from:
the initializer name in FP32 files; in INT8 files the folded bias is named
``<module>.weight_bias`` (conv) or the linear's ``<module>.bias``.

The N:M axis is the weight's dimension 1 (input channels), the same in torch and
ONNX layouts: groups ``W[o, k*m:(k+1)*m, y, x]``. Zero input channels that export
adds to the INT8 stem (:func:`pqd.onnx_export.pad_input_channels`) are cut off first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from pqd.measurement.complexity import weight_nodes

_COMPUTE = {"Conv", "Gemm", "MatMul"}


def onnx_weights(path: str | Path) -> dict[str, np.ndarray]:
    """Weights of the compute layers as stored, keyed by torch parameter name when known
    (else the node name); ``[out, in, ...]`` layout (Gemm ``transB=0``/MatMul transposed)."""
    proto = onnx.load(str(path))
    inits = {i.name: i for i in proto.graph.initializer}
    producer = {out: node for node in proto.graph.node for out in node.output}

    def const(name: str) -> tuple[np.ndarray | None, str | None]:
        if name in inits:
            return numpy_helper.to_array(inits[name]), name
        node = producer.get(name)
        if node is not None and node.op_type in ("DequantizeLinear", "Identity"):
            arr, _ = const(node.input[0])
            return arr, None
        return None, None

    out: dict[str, np.ndarray] = {}
    for node, w, init_name in weight_nodes(proto, _COMPUTE, producer, const):
        if node.op_type == "MatMul" or (
            node.op_type == "Gemm"
            and not any(a.name == "transB" and a.i == 1 for a in node.attribute)
        ):
            w = w.T
        name = init_name
        bias = node.input[2] if len(node.input) > 2 else ""
        if name is None or not name.endswith(".weight"):
            if bias.endswith(".weight_bias"):
                name = bias[: -len("_bias")]
            elif bias.endswith(".bias"):
                name = bias[: -len(".bias")] + ".weight"
            else:
                name = node.name
        out[name] = w
    return out


def nm_groups(w: np.ndarray, m: int) -> np.ndarray:
    """Zero counts of every group of ``m`` consecutive input channels of ``w``."""
    moved = np.moveaxis(w, 1, -1)
    groups = moved.reshape(*moved.shape[:-1], -1, m)
    return (groups == 0).sum(-1).reshape(-1)


def nm_report(path: str | Path, layers: dict[str, list[int] | tuple[int, int]]) -> dict[str, Any]:
    """Check the exported weights of ``layers`` (name -> (n, m)) for N:M sparsity.

    Per layer and in total: ``groups``, ``exact`` (exactly ``m - n`` zeros),
    ``violations`` (fewer zeros: the pattern is broken) and ``extra_zeros`` (more
    zeros: a kept weight is 0, e.g. rounded to 0 in INT8 or pruned by another stage).
    ``missing`` lists layers not found in the file. ``ok``: no violations, none missing.
    """
    weights = onnx_weights(path)
    per_layer: dict[str, dict[str, int]] = {}
    missing = []
    for name, (n, m) in layers.items():
        w = weights.get(name)
        if w is None or w.shape[1] % m:
            missing.append(name)
            continue
        zeros = nm_groups(w, m)
        per_layer[name] = {
            "groups": int(zeros.size),
            "exact": int((zeros == m - n).sum()),
            "violations": int((zeros < m - n).sum()),
            "extra_zeros": int((zeros > m - n).sum()),
        }
    totals = {
        k: sum(v[k] for v in per_layer.values())
        for k in ("groups", "exact", "violations", "extra_zeros")
    }
    return {
        **totals,
        "layers": len(per_layer),
        "missing": missing,
        "ok": totals["violations"] == 0 and not missing,
        "per_layer": per_layer,
    }
