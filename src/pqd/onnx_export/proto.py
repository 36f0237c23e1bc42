"""Small edits of an ONNX model shared by the export's graph rewrites: find the weight
DequantizeLinear nodes, add a constant, drop unused initializers.

The static QDQ rewrites (:mod:`pqd.onnx_export`) and the dynamic integer rewrite
(:mod:`pqd.onnx_export.dynamic`) both edit protos this way; the helpers sit below both.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper


def keep_initializers(graph: onnx.GraphProto, used: set[str]) -> None:
    """Remove ``graph``'s initializers whose names are not in ``used``."""
    keep = [i for i in graph.initializer if i.name in used]
    graph.ClearField("initializer")
    graph.initializer.extend(keep)


def weight_dequantizers(proto: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """DequantizeLinear nodes whose input is an integer initializer of rank >= 2 (weights),
    by output name."""
    inits = {i.name: i for i in proto.graph.initializer}
    ints = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4)
    return {
        n.output[0]: n
        for n in proto.graph.node
        if n.op_type == "DequantizeLinear"
        and n.input[0] in inits
        and inits[n.input[0]].data_type in ints
        and len(inits[n.input[0]].dims) >= 2
    }


def add_constant(proto: onnx.ModelProto, array: np.ndarray, name: str) -> str:
    """Append ``array`` to ``proto``'s initializers as ``name``; returns the name."""
    proto.graph.initializer.append(numpy_helper.from_array(array, name))
    return name
