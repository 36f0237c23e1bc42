"""Params, sparsity, MACs and BitOps read from an exported ONNX file.

Every Conv / Gemm / MatMul (and the dynamic-quantization ConvInteger / MatMulInteger)
with a constant weight counts. A weight reached through DequantizeLinear is read as its
integer initializer (8 bits; 4 for INT4), otherwise as float (32 bits; ConvInteger's
int8 weights: 8); an activation input counts 8 bits when it comes from a
DequantizeLinear or DynamicQuantizeLinear, else 32. (A dynamic layer's bias sits in a
separate Add and is not counted in its params.) MACs are per image (batch 1); BitOps =
MACs x weight bits x activation bits (a linear on a 2-D ``[tokens, features]`` view
counts every token row). Sparsity is the fraction of exactly-zero weight
entries (biases excluded) as stored in the file (integers minus their zero point). Zero
input channels that export adds for kernel speed (see
``pqd.onnx_export.pad_input_channels``) are not counted, nor the off-block zeros of grouped
convs stored dense (``pqd.onnx_export.densify_grouped_convs``): they count as grouped.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

_COMPUTE = {"Conv", "Gemm", "MatMul", "ConvInteger", "MatMulInteger"}
_INTEGER = {"ConvInteger", "MatMulInteger"}  # dynamic quantization: inputs 2, 3 are zero points


def _with_batch_one(proto: onnx.ModelProto) -> onnx.ModelProto:
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    for value in proto.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].Clear()
            dims[0].dim_value = 1
    return shape_inference.infer_shapes(proto, data_prop=True)


def channel_padding(name: str, producer: dict[str, Any], const: Callable[[str], tuple]) -> int:
    """Zero channels a channel Pad added to activation ``name`` (through DQ <- Q <- Pad), as
    export pads the INT8 stem; ``const(name)[0]`` is a constant's array or None."""
    node = producer.get(name)
    for op in ("DequantizeLinear", "QuantizeLinear", "Pad"):
        if node is None or node.op_type != op:
            return 0
        if op == "Pad":
            pads = const(node.input[1])[0]
            if pads is None or len(pads) != 8 or pads[1] or any(pads[[0, 2, 3, 4, 6, 7]]):
                return 0
            return int(pads[5])
        node = producer.get(node.input[0])
    return 0


def grouped_weight(w: np.ndarray, groups: int) -> np.ndarray:
    """The ``[C_out, C_in / groups, kh, kw]`` weight of a conv that
    :func:`pqd.onnx_export.densify_grouped_convs` stored dense (block-diagonal)."""
    cout, cin = w.shape[:2]
    per, cin_g = cout // groups, cin // groups
    return np.concatenate(
        [w[g * per : (g + 1) * per, g * cin_g : (g + 1) * cin_g] for g in range(groups)]
    )


def weight_nodes(
    proto: onnx.ModelProto,
    ops: set[str],
    producer: dict[str, Any],
    const: Callable[[str], tuple],
) -> Iterator[tuple[onnx.NodeProto, np.ndarray, Any]]:
    """Each node of ``ops`` whose weight (input 1) is a constant, in graph order.

    Args:
        proto: the model.
        ops: the op types to read (e.g. Conv, Gemm, MatMul).
        producer: the node that outputs each value, by value name.
        const: ``const(name) -> (array or None, info)``, a constant input's array.

    Returns:
        ``(node, weight, info)`` per node, the weight without the zero input channels that
        export adds to the INT8 stem (:func:`channel_padding`).
    """
    for node in proto.graph.node:
        if node.op_type not in ops or len(node.input) < 2:
            continue
        w, info = const(node.input[1])
        if w is None:
            continue
        if node.op_type == "Conv" and (extra := channel_padding(node.input[0], producer, const)):
            w = w[:, : w.shape[1] - extra]
        yield node, w, info


def _constant_reader(
    proto: onnx.ModelProto,
) -> tuple[dict[str, Any], Callable[[str], tuple[np.ndarray | None, int]]]:
    """The producer of each value and ``const(name) -> (array, bits)`` of a constant input,
    following DequantizeLinear (integer values minus their zero point), Identity and
    Transpose back to an initializer or a Constant (``(None, 32)`` for anything else)."""
    inits = {i.name: i for i in proto.graph.initializer}
    producer = {out: node for node in proto.graph.node for out in node.output}

    def const(name: str) -> tuple[np.ndarray | None, int]:
        arr: np.ndarray | None
        if name in inits:
            arr = numpy_helper.to_array(inits[name])
            if str(arr.dtype) in ("int4", "uint4"):
                return arr.astype(np.int8), 4
            return arr, 8 if arr.dtype in (np.int8, np.uint8) else 32
        node = producer.get(name)
        if node is not None and node.op_type == "DequantizeLinear":
            arr, bits = const(node.input[0])
            zp = const(node.input[2])[0] if len(node.input) > 2 and node.input[2] else None
            if arr is not None and zp is not None and np.any(zp):  # asymmetric: q - zp
                axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
                shape = [1] * arr.ndim
                if zp.ndim == 1 and arr.ndim > 1:
                    shape[axis % arr.ndim] = -1
                arr = arr.astype(np.int32) - zp.astype(np.int32).reshape(shape if zp.ndim else ())
            return arr, bits
        if node is not None and node.op_type in ("Identity", "Transpose"):
            arr, bits = const(node.input[0])
            return arr, bits
        if node is not None and node.op_type == "Constant":
            return numpy_helper.to_array(node.attribute[0].t), 32
        return None, 32

    return producer, const


def _macs(node: onnx.NodeProto, w: np.ndarray, out_shape: list[int]) -> int:
    """Multiply-accumulates of one compute node per image (the graph has batch 1)."""
    if node.op_type in ("Conv", "ConvInteger"):
        per_output = int(np.prod(w.shape[1:]))  # (C_in / groups) * kh * kw
        outputs = int(np.prod(out_shape[1:])) if len(out_shape) > 1 else 0
        return per_output * outputs
    k = w.shape[0] if node.op_type != "Gemm" or not _trans_b(node) else w.shape[1]
    # batch is 1 here, so every output row is this image's: a linear on a 2-D
    # [tokens, features] view (the ViT's) counts all its token rows
    if bool(out_shape) and all(d > 0 for d in out_shape):
        outputs = int(np.prod(out_shape))
    else:
        outputs = int(np.prod(out_shape[1:])) if len(out_shape) > 1 else int(w.size // k)
    return int(k) * outputs


def onnx_complexity(path: str | Path) -> dict[str, Any]:
    """Totals and a per-layer table for the compute layers of the ONNX file at ``path``."""
    proto = _with_batch_one(onnx.load(str(path)))
    meta = {p.key: p.value for p in proto.metadata_props}
    densified = json.loads(meta.get("pqd.densified_groups", "{}"))
    producer, const = _constant_reader(proto)
    shapes = {
        v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in list(proto.graph.value_info) + list(proto.graph.output)
    }
    quantizers = ("DequantizeLinear", "DynamicQuantizeLinear")
    layers = []
    for node, w, w_bits in weight_nodes(proto, _COMPUTE, producer, const):
        if node.op_type == "Conv" and node.name in densified:  # back to its groups' blocks
            w = grouped_weight(w, densified[node.name])
        has_bias = len(node.input) > 2 and node.input[2] and node.op_type not in _INTEGER
        bias = const(node.input[2])[0] if has_bias else None
        macs = _macs(node, w, shapes.get(node.output[0], []))
        act = producer.get(node.input[0])
        a_bits = 8 if act is not None and act.op_type in quantizers else 32
        layers.append(
            {
                "name": node.name,
                "op": node.op_type,
                "weight_shape": list(w.shape),
                "params": int(w.size + (bias.size if bias is not None else 0)),
                "nonzero": int(np.count_nonzero(w))
                + (int(np.count_nonzero(bias)) if bias is not None else 0),
                "weights": int(w.size),
                "zero_weights": int(w.size - np.count_nonzero(w)),
                "macs": macs,
                "weight_bits": w_bits,
                "activation_bits": a_bits,
                "bitops": macs * w_bits * a_bits,
            }
        )
    weights = sum(layer["weights"] for layer in layers)
    zeros = sum(layer["zero_weights"] for layer in layers)
    return {
        "params": sum(layer["params"] for layer in layers),
        "nonzero_params": sum(layer["nonzero"] for layer in layers),
        "sparsity": zeros / weights if weights else 0.0,
        "macs": sum(layer["macs"] for layer in layers),
        "bitops": sum(layer["bitops"] for layer in layers),
        "layers": layers,
    }


def _trans_b(node: onnx.NodeProto) -> bool:
    return any(a.name == "transB" and a.i == 1 for a in node.attribute)
