"""The dynamic-quantization form of an exported file: integer ops on the trained weights.

A ``mode: dynamic`` state exports as int8 weights (DequantizeLinear) feeding float
convs/linears; :func:`dynamic_integer_ops` rewrites each such layer so that its activation
is quantized at run time and the layer runs as an integer op. It is apart from the static
QDQ rewrites of :mod:`pqd.onnx_export` because it replaces whole layers rather than
adjusting a QDQ graph that onnxruntime fuses itself.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from pqd.onnx_export.proto import add_constant, keep_initializers, weight_dequantizers


def dynamic_integer_ops(proto: onnx.ModelProto) -> int:
    """Rewrite ``DequantizeLinear(int8 W) -> Conv/Gemm`` (float activations) into dynamic
    quantization: ``DynamicQuantizeLinear(x)`` -> ``ConvInteger`` / ``MatMulInteger`` on
    the same int8 weights -> ``Cast`` -> ``Mul`` by ``x_scale * w_scale`` (per channel)
    -> ``Add`` bias. The weights keep their trained integers (per-channel scales
    included, which onnxruntime's own ``quantize_dynamic`` cannot do for convs). Returns
    the number of layers rewritten; ``proto`` is edited in place."""
    inits = {i.name: i for i in proto.graph.initializer}
    dqs = weight_dequantizers(proto)
    nodes: list[onnx.NodeProto] = []
    done = 0
    for node in proto.graph.node:
        dq = (
            dqs.get(node.input[1])
            if node.op_type in ("Conv", "Gemm") and len(node.input) > 1
            else None
        )
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if dq is None or (
            node.op_type == "Gemm"
            and (
                attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0
                or attrs.get("beta", 1.0) != 1.0
            )
        ):
            nodes.append(node)
            continue
        nodes += _integer_layer(proto, node, dq, attrs, inits)
        done += 1
    used = {i for n in nodes for i in n.input}
    nodes = [
        n
        for n in nodes
        if not (n.op_type == "DequantizeLinear" and n.output[0] in dqs and n.output[0] not in used)
    ]
    proto.graph.ClearField("node")
    proto.graph.node.extend(nodes)
    keep_initializers(
        proto.graph, {i for n in nodes for i in n.input} | {o.name for o in proto.graph.output}
    )
    proto.graph.ClearField("value_info")
    return done


def _integer_layer(
    proto: onnx.ModelProto,
    node: onnx.NodeProto,
    dq: onnx.NodeProto,
    attrs: dict[str, Any],
    inits: dict[str, onnx.TensorProto],
) -> list[onnx.NodeProto]:
    """The nodes that replace the float Conv/Gemm ``node`` whose weight ``dq`` dequantizes:
    the input quantized at run time, the integer op, and the float rescale (+ bias). The
    constants they read are added to ``proto``; ``inits`` are its initializers before."""
    w = numpy_helper.to_array(inits[dq.input[0]])
    scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32)
    zp = numpy_helper.to_array(inits[dq.input[2]]) if len(dq.input) > 2 else np.zeros(1)
    if np.any(zp != 0) or w.dtype != np.int8:
        raise RuntimeError(f"dynamic export needs symmetric int8 weights ({dq.input[0]})")
    p = f"{node.name or node.output[0]}_dyn"
    x = node.input[0]
    nodes = [
        helper.make_node(
            "DynamicQuantizeLinear", [x], [f"{p}_xq", f"{p}_xs", f"{p}_xz"], name=f"{p}_q"
        )
    ]
    wz = add_constant(proto, np.array(0, np.int8), f"{p}_wz")
    if node.op_type == "Conv":
        out_ch = w.shape[0]
        nodes.append(
            helper.make_node(
                "ConvInteger",
                [f"{p}_xq", dq.input[0], f"{p}_xz", wz],
                [f"{p}_acc"],
                name=f"{p}_conv",
                **attrs,
            )
        )
        shape = (1, out_ch, *([1] * (w.ndim - 2)))
    else:
        wt = w.T if attrs.get("transB", 0) else w  # MatMulInteger wants [K, N]
        out_ch = wt.shape[1]
        wname = add_constant(proto, np.ascontiguousarray(wt), f"{p}_w")
        nodes.append(
            helper.make_node(
                "MatMulInteger",
                [f"{p}_xq", wname, f"{p}_xz", wz],
                [f"{p}_acc"],
                name=f"{p}_matmul",
            )
        )
        shape = (1, out_ch)
    ws = add_constant(
        proto, np.broadcast_to(scale.reshape(-1), (out_ch,)).reshape(shape).copy(), f"{p}_ws"
    )
    return nodes + _rescaled(proto, node, p, ws, shape, inits)


def _rescaled(
    proto: onnx.ModelProto,
    node: onnx.NodeProto,
    p: str,
    ws: str,
    shape: tuple[int, ...],
    inits: dict[str, onnx.TensorProto],
) -> list[onnx.NodeProto]:
    """The accumulator ``{p}_acc`` cast to float and multiplied by ``x_scale * w_scale``
    (``ws``: the weight scales in ``shape``), plus ``node``'s constant bias if it has one,
    into ``node``'s output."""
    nodes = [
        helper.make_node(
            "Cast", [f"{p}_acc"], [f"{p}_accf"], to=onnx.TensorProto.FLOAT, name=f"{p}_cast"
        ),
        helper.make_node("Mul", [f"{p}_xs", ws], [f"{p}_s"], name=f"{p}_scale"),
    ]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if bias is None:
        nodes.append(
            helper.make_node("Mul", [f"{p}_accf", f"{p}_s"], [node.output[0]], name=f"{p}_mul")
        )
        return nodes
    b = numpy_helper.to_array(inits[bias]) if bias in inits else None
    if b is None:
        raise RuntimeError(f"dynamic export needs a constant bias ({bias})")
    bname = add_constant(proto, b.astype(np.float32).reshape(shape), f"{p}_b")
    return [
        *nodes,
        helper.make_node("Mul", [f"{p}_accf", f"{p}_s"], [f"{p}_y"], name=f"{p}_mul"),
        helper.make_node("Add", [f"{p}_y", bname], [node.output[0]], name=f"{p}_bias"),
    ]
