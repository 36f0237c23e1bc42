"""Export the deployable artifact: one self-contained ONNX file.

Input ``input``: float32 NCHW RGB in [0, 1] with a dynamic batch dimension
(normalisation is inside the graph); output ``logits``. A quantized state is
converted with ``convert_pt2e`` and written as QDQ (QuantizeLinear /
DequantizeLinear around Conv/Gemm): uint8 activations, int8 per-channel weights
(U8S8, which onnxruntime fuses into QLinearConv; S8S8 ran 3.5x slower). The
scales and zero points are the ones learned in QAT, never a fresh calibration.

The example input has batch 2: exporting the converted graph with a batch-1
example fails against the dynamic batch dimension.

This package holds the export and the rewrites of float and QDQ files; a dynamic-quant
state's integer ops are written by :mod:`pqd.onnx_export.dynamic`, the small proto
edits both share are in :mod:`pqd.onnx_export.proto`, and :mod:`pqd.onnx_export.registry`
builds the exporter's function registry once per process.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import helper, numpy_helper

import pqd._pt2e_cache as _pt2e_cache
from pqd.onnx_export import registry as _registry
from pqd.onnx_export.dynamic import dynamic_integer_ops
from pqd.onnx_export.proto import add_constant, keep_initializers, weight_dequantizers
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
    drop_requantize(converted)
    set_train(converted, False)
    return converted


def _qdq_args(node: Any, kind: str) -> tuple[Any, float, int] | None:
    """``(input, scale, zero point)`` of a uint8 per-tensor ``kind`` (quantize /
    dequantize) node with constant qparams, else None."""
    if (
        not isinstance(node, torch.fx.Node)
        or node.op != "call_function"
        or f"{kind}_per_tensor" not in str(node.target)
        or len(node.args) < 6
        or not isinstance(node.args[1], float)
        or node.args[5] != torch.uint8
    ):
        return None
    return node.args[0], node.args[1], int(cast(int, node.args[2]))  # a constant zero point


def drop_requantize(graph: torch.fx.GraphModule) -> int:
    """Remove ``quantize(dequantize(q, s) [clamped to its own range] / k, s / k)`` chains
    (zero point 0), which give back the integers ``q`` unchanged: the ``/ 6`` of
    :func:`pqd.quant.rewrite.split_hard_gates`. Without them onnxruntime sees
    ``QLinearAdd -> QLinearMul`` instead of a float ``Div`` between Q/DQ pairs.

    Args:
        graph: a converted PT2E graph; changed in place.

    Returns:
        How many chains were removed.
    """
    done = 0
    for node in list(graph.graph.nodes):
        outer = _qdq_args(node, "quantize")
        if outer is None or outer[2] != 0:
            continue
        div = outer[0]
        if (
            not isinstance(div, torch.fx.Node)
            or div.target != torch.ops.aten.div.Tensor
            or not isinstance(div.args[1], float)
            or len(div.users) != 1
        ):
            continue
        src = div.args[0]
        clamp = None
        if isinstance(src, torch.fx.Node) and src.target == torch.ops.aten.clamp.default:
            clamp, src = src, src.args[0]
        inner = _qdq_args(src, "dequantize")
        if (
            inner is None
            or not isinstance(src, torch.fx.Node)  # (then inner is None: narrows for mypy)
            or inner[2] != 0
            or len(src.users) != 1
        ):
            continue
        k, s_in, s_out = div.args[1], inner[1], outer[1]
        if abs(s_in / k - s_out) > 1e-6 * s_out:
            continue
        if clamp is not None:  # the clamp must not cut the dequantized range [0, 255 s]
            lo, hi = cast(list[float | None], [*clamp.args[1:3], None, None][:2])
            if (lo is not None and lo > 0) or (hi is not None and hi < 255 * s_in - 1e-6):
                continue
            if len(clamp.users) != 1:
                continue
        node.replace_all_uses_with(inner[0])
        for dead in (node, div, clamp, src):
            if dead is not None:
                graph.graph.erase_node(dead)
        done += 1
    if done:
        graph.graph.lint()
        graph.recompile()
    return done


def _scheme(model: nn.Module) -> dict[str, Any]:
    from pqd.quant.scheme import quant_scheme

    return quant_scheme(model)


def deployable_model(model: nn.Module, quantized: bool) -> nn.Module:
    """The torch model that the artifact reproduces (INT8-converted when quantized; for
    dynamic quantization the fake-quant graph itself, observers off)."""
    if quantized and _scheme(model)["mode"] == "dynamic":
        m = copy.deepcopy(model)
        set_train(m, False)
        for mod in m.modules():
            if hasattr(mod, "observer_enabled"):  # a fake-quantizer: the flag is a tensor
                cast(torch.Tensor, mod.observer_enabled)[0] = 0
        return m
    if quantized:  # a quantized model is a PT2E graph
        return int8_model(cast(torch.fx.GraphModule, model))
    # torch's stub of Module.to lacks memory_format (it exists at runtime)
    m = copy.deepcopy(model).to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    set_train(m, False)
    return m


def _weights_only(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A converted copy of a dynamic-quant graph without its activation fake-quantizers:
    int8 weights (DequantizeLinear in ONNX) feeding float convs/linears."""
    from pqd.quant.layers import quantized_layers
    from pqd.quant.scheme import graphs_in

    g = copy.deepcopy(graph)
    weight_fqs = {lq.weight_fq for lq in quantized_layers(g).values()}
    for prefix, sub in graphs_in(g):
        for node in list(sub.graph.nodes):
            qual = f"{prefix}.{node.target}" if prefix else str(node.target)
            if (
                node.op == "call_module"
                and qual not in weight_fqs
                and hasattr(sub.get_submodule(str(node.target)), "fake_quant_enabled")
            ):
                node.replace_all_uses_with(node.args[0])
                sub.graph.erase_node(node)
                sub.delete_submodule(str(node.target))
        sub.recompile()
    return int8_model(g)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    example: torch.Tensor,
    *,
    quantized: bool,
    opset: int = 20,
    output_name: str = OUTPUT_NAME,
) -> tuple[Path, nn.Module]:
    """Write ``model`` to ``path`` as ONNX; returns the path and the exported torch model.

    ``example`` must have batch >= 2. ``quantized`` states are converted first, as their
    scheme (``graph.meta["pqd_quant"]``) says: static QDQ (U8S8 checked where the
    activations are uint8; INT4 weights packed as INT4, opset >= 21), or dynamic
    (DynamicQuantizeLinear + ConvInteger/MatMulInteger on the trained int8 weights).
    The graph's input is ``input`` and its one output ``output_name``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scheme = _scheme(model) if quantized else None
    dynamic = scheme is not None and scheme["mode"] == "dynamic"
    deploy = deployable_model(model, quantized).cpu()
    traced = _weights_only(cast(torch.fx.GraphModule, model)).cpu() if dynamic else deploy
    example = example[:2].detach().cpu().float()
    batch = torch.export.Dim("batch", min=1, max=4096)
    _registry.install()
    with _quiet(), torch.no_grad():
        torch.onnx.export(
            traced,
            (example,),
            str(path),
            dynamo=True,
            external_data=False,
            dynamic_shapes=({0: batch},),
            input_names=[INPUT_NAME],
            output_names=[output_name],
            opset_version=opset,
        )
    proto = onnx.load(str(path))
    global_average_pools(proto)
    if dynamic:
        dynamic_integer_ops(proto)
    elif scheme is not None:
        pad_input_channels(proto)
        densify_grouped_convs(proto)
        if not scheme["activation_symmetric"]:
            check_u8s8(proto)
        quantize_float_output_gemm_biases(proto)  # after the check: int32 biases
        if scheme["weight_bits"] == 4:
            pack_int4_weights(proto)
    strip_debug_metadata(proto)
    onnx.save(proto, str(path))
    onnx.checker.check_model(proto)
    return path, deploy


def strip_debug_metadata(proto: onnx.ModelProto) -> None:
    """Drop the exporter's per-node debug strings (FX node text, class path, stack trace).

    They are not needed to run the model and dominated small files: 36 of the 46 KB of an
    INT8 tiny_cnn. Node names, and the model-level metadata, are kept.
    """
    for node in proto.graph.node:
        node.ClearField("metadata_props")
        node.ClearField("doc_string")


def global_average_pools(proto: onnx.ModelProto) -> int:
    """Write the exporter's spatial mean (``ReduceMean`` over H, W of a 4-D tensor, kept
    dims) as ``GlobalAveragePool``, the same function.

    onnxruntime fuses DequantizeLinear -> GlobalAveragePool -> QuantizeLinear into one
    channels-last QLinearGlobalAveragePool; a ReduceMean stays float between a
    DequantizeLinear and a QuantizeLinear behind a layout Transpose (INT8 fastnet_q8 p50
    0.436 -> 0.410-0.439 ms here, 3 interleaved runs). Returns how many nodes were rewritten.
    """
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    try:
        ranks = {
            v.name: len(v.type.tensor_type.shape.dim)
            for v in onnx.shape_inference.infer_shapes(proto).graph.value_info
        }
    except Exception:  # no shapes inferred: leave the graph as it is
        return 0
    ranks.update({v.name: len(v.type.tensor_type.shape.dim) for v in proto.graph.input})
    rewritten = 0
    for i, node in enumerate(list(proto.graph.node)):
        if node.op_type != "ReduceMean" or len(node.input) != 2:
            continue
        attrs = {a.name: a.i for a in node.attribute}
        axes = inits.get(node.input[1])
        if (
            ranks.get(node.input[0]) != 4
            or axes is None
            or attrs.get("keepdims", 1) != 1
            or sorted(int(a) % 4 for a in axes.reshape(-1)) != [2, 3]
        ):
            continue
        gap = helper.make_node(
            "GlobalAveragePool", [node.input[0]], list(node.output), name=f"{node.name}_gap"
        )
        proto.graph.node.remove(node)
        proto.graph.node.insert(i, gap)
        rewritten += 1
    keep_initializers(
        proto.graph,
        {name for node in proto.graph.node for name in node.input}
        | {o.name for o in proto.graph.output},
    )  # drops the axes tensors
    return rewritten


def set_metadata(path: str | Path, values: dict[str, str]) -> None:
    """Add (or replace) ``metadata_props`` entries of the ONNX file at ``path``."""
    proto = onnx.load(str(path))
    props = {p.key: p.value for p in proto.metadata_props}
    props.update(values)
    del proto.metadata_props[:]
    for key, value in props.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))


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
        shared = any(consumers.get(n) != 1 for n in (conv.input[0], x_dq.input[0], w_dq.input[0]))
        if not extra or shared:
            continue
        w = numpy_helper.to_array(w_init)
        w = np.concatenate([w, np.zeros((w.shape[0], extra, *w.shape[2:]), w.dtype)], axis=1)
        w_init.CopyFrom(numpy_helper.from_array(w, w_init.name))
        pads_name, out_name = f"{q.name}_channel_pads", f"{q.input[0]}_channel_padded"
        proto.graph.initializer.append(
            numpy_helper.from_array(np.array([0, 0, 0, 0, 0, extra, 0, 0], np.int64), pads_name)
        )
        pad = helper.make_node(
            "Pad",
            [q.input[0], pads_name],
            [out_name],
            name=f"{q.name}_channel_pad",
            mode="constant",
        )
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


DENSIFIED_KEY = "pqd.densified_groups"  # metadata: {conv node name: groups it had}


def densify_grouped_convs(proto: onnx.ModelProto, max_groups: int = 8) -> dict[str, int]:
    """Give each grouped (not depthwise) QDQ conv with at most ``max_groups`` groups a dense
    block-diagonal weight (the off-block weights are the zero point: exactly 0.0).

    onnxruntime's ``QLinearConv`` runs grouped convs group by group on small GEMMs: on
    tiny_blocks' 16 -> 32, 4-group 3x3 conv it takes 2.3x the float conv's time, the
    dense conv (4x the MACs, all zeros off the blocks) less than the float one. The
    outputs are the same numbers. The densified convs are listed in the file's metadata
    (:data:`DENSIFIED_KEY`) so that MACs and sparsity are counted as grouped.

    Args:
        proto: a static QDQ model; changed in place.
        max_groups: densify up to this many groups (the MACs grow by the group count).

    Returns:
        ``{conv node name: groups}`` of the densified convs.
    """
    inits = {i.name: i for i in proto.graph.initializer}
    uses: dict[str, int] = {}
    for node in proto.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    weights = weight_dequantizers(proto)
    done: dict[str, int] = {}
    for node in proto.graph.node:
        groups = next((a.i for a in node.attribute if a.name == "group"), 1)
        dq = weights.get(node.input[1]) if node.op_type == "Conv" else None
        if dq is None or not 1 < groups <= max_groups or uses.get(dq.input[0]) != 1:
            continue
        w = numpy_helper.to_array(inits[dq.input[0]])
        cout, cin_g = w.shape[:2]
        if w.dtype not in (np.int8, np.uint8) or cout % groups:
            continue
        zp = np.zeros(cout, dtype=w.dtype)
        if len(dq.input) > 2 and dq.input[2]:
            zp = np.broadcast_to(numpy_helper.to_array(inits[dq.input[2]]), (cout,))
        dense = np.empty((cout, cin_g * groups, *w.shape[2:]), dtype=w.dtype)
        dense[...] = zp.reshape(-1, *[1] * (w.ndim - 1))
        per = cout // groups
        for g in range(groups):
            rows = slice(g * per, (g + 1) * per)
            dense[rows, g * cin_g : (g + 1) * cin_g] = w[rows]
        inits[dq.input[0]].CopyFrom(numpy_helper.from_array(dense, dq.input[0]))
        for a in node.attribute:
            if a.name == "group":
                a.i = 1
        done[node.name] = groups
    if done:
        meta = {p.key: p for p in proto.metadata_props}
        entry = meta.get(DENSIFIED_KEY) or proto.metadata_props.add(key=DENSIFIED_KEY)
        entry.value = json.dumps(done, sort_keys=True)
    return done


def check_u8s8(proto: onnx.ModelProto) -> None:
    """Raise unless every weight is int8 and every activation uint8 in the QDQ graph
    (scalar constants added to activations are uint8, like the activation)."""
    inits = {i.name: i for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        src = node.input[0]
        if src in inits:
            init = inits[src]
            scalar = int(np.prod(init.dims)) <= 1
            if scalar and init.data_type == onnx.TensorProto.UINT8:
                continue  # a constant operand of an activation op (the + 3 of a hard gate)
            if init.data_type != onnx.TensorProto.INT8:
                raise RuntimeError(f"weight {src} is not int8 in the exported QDQ graph")
        elif len(node.input) > 2 and node.input[2] in inits:
            zp = inits[node.input[2]]
            if zp.data_type != onnx.TensorProto.UINT8:
                raise RuntimeError(f"activation {src} is not uint8 in the exported QDQ graph")


def quantize_float_output_gemm_biases(proto: onnx.ModelProto) -> int:
    """Give a float-output quantized linear an int32 bias, so onnxruntime runs it as QGemm.

    ``DequantizeLinear(x), DequantizeLinear(W) -> Gemm`` with a float bias initializer and
    no QuantizeLinear after it (a transformer's linear that feeds the float residual
    stream or GELU, :func:`pqd.quant.annotate.transformer_float_paths`) stays a float Gemm in
    onnxruntime 1.32: its QDQ Gemm fusion reads a bias only through an int32
    DequantizeLinear. The bias becomes ``round(b / (s_x * s_W))`` in int32 behind such a
    DequantizeLinear (scale ``s_x * s_W``, per output channel where ``W`` is), the
    layout QGemm adds in its int32 accumulator; the error is at most half an accumulator
    step per output. Returns how many biases were rewritten.
    """
    inits = {i.name: i for i in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    weight_dqs = weight_dequantizers(proto)
    quantize_inputs = {n.input[0] for n in proto.graph.node if n.op_type == "QuantizeLinear"}
    done = 0
    new_nodes: list[tuple[int, onnx.NodeProto]] = []
    for index, node in enumerate(proto.graph.node):
        if node.op_type != "Gemm" or len(node.input) < 3 or node.input[2] not in inits:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        act = producer.get(node.input[0])
        wdq = weight_dqs.get(node.input[1])
        if (
            node.output[0] in quantize_inputs
            or act is None
            or act.op_type != "DequantizeLinear"
            or wdq is None
            or attrs.get("transB", 0) != 1
            or attrs.get("alpha", 1.0) != 1.0
            or attrs.get("beta", 1.0) != 1.0
            or act.input[1] not in inits
            or wdq.input[1] not in inits
        ):
            continue
        s_x = numpy_helper.to_array(inits[act.input[1]]).astype(np.float64)
        s_w = numpy_helper.to_array(inits[wdq.input[1]]).astype(np.float64)
        bias = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
        if s_x.size != 1 or s_w.size not in (1, bias.size) or bias.ndim != 1:
            continue
        scale = (s_x.reshape(()) * s_w).astype(np.float32)
        q = np.clip(np.round(bias / scale), -(2**31), 2**31 - 1).astype(np.int32)
        name = f"{node.name or node.output[0]}_bias"
        q_name = add_constant(proto, q, f"{name}_int32")
        scale = scale.reshape(-1) if scale.size > 1 else scale.reshape(())
        s_name = add_constant(proto, scale, f"{name}_scale")
        dq = helper.make_node(
            "DequantizeLinear", [q_name, s_name], [f"{name}_dq"], name=f"{name}_dq", axis=0
        )
        new_nodes.append((index, dq))
        node.input[2] = dq.output[0]
        done += 1
    for index, dq in reversed(new_nodes):
        proto.graph.node.insert(index, dq)
    if done:
        used = {i for n in proto.graph.node for i in n.input}
        keep_initializers(proto.graph, used | {o.name for o in proto.graph.output})
    return done


def pack_int4_weights(proto: onnx.ModelProto) -> int:
    """Store every quantized weight (values already in [-8, 7]) as INT4, two per byte, and
    raise the opset to 21 (DequantizeLinear-21 reads INT4). Returns how many were packed."""
    import ml_dtypes

    inits = {i.name: i for i in proto.graph.initializer}
    packed = 0
    for dq in weight_dequantizers(proto).values():
        names = [dq.input[0]] + ([dq.input[2]] if len(dq.input) > 2 and dq.input[2] else [])
        for name in names:
            arr = numpy_helper.to_array(inits[name])
            if arr.size and (arr.min() < -8 or arr.max() > 7):
                raise RuntimeError(f"{name} holds values outside INT4's [-8, 7]")
            inits[name].CopyFrom(numpy_helper.from_array(arr.astype(ml_dtypes.int4), name))
        packed += 1
    for op in proto.opset_import:
        if op.domain in ("", "ai.onnx") and op.version < 21:
            op.version = 21
    return packed


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
    return {
        "compressed_path": path.name + ".xz",
        "compressed_size_bytes": packed_size,
        "compression_ratio": round(raw_size / packed_size, 3),
        "codec": "xz (lzma)",
    }
