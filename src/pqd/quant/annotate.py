"""Annotations for onnxruntime's QDQ fusions, on top of torchao's x86 ones.

torchao's X86InductorQuantizer places quantizers where its own inductor kernels want
them; onnxruntime fuses a QDQ file into integer kernels only where a tensor is quantized
on every side of an op. These passes move the quantizers there (the quantizer that runs
them: :func:`pqd.quant.quantizer.ort_quantizer`): residual adds, linear outputs, the
activations and gates of mobile nets (:func:`close_float_islands`), and the float
residual stream and attention of transformers (:func:`transformer_float_paths`). Each
works on a captured graph's ``node.meta["quantization_annotation"]``; the annotation
class is passed in, so that torchao is imported only when a quantizer is built.
"""

from __future__ import annotations

import operator
from typing import Any

import torch

from pqd.quant.layers import WEIGHT_OPS
from pqd.quant.rewrite import HARD_GATE

ANNOTATION = "quantization_annotation"
_ADD_OPS = {torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor}
_RELU_OPS = {torch.ops.aten.relu.default, torch.ops.aten.relu_.default}


def annotate_ort_fusions(
    model: torch.fx.GraphModule, qspec: Any, weight_qspec: Any, static: bool, annotation_cls: Any
) -> None:
    """Adjust torchao's x86 annotation of ``model`` for onnxruntime's integer kernels.

    Every annotated conv/linear weight gets ``weight_qspec``; in a static scheme each
    residual add is quantized on both inputs and its output (QLinearAdd; after a ReLU,
    the ReLU's output), and each linear's output is quantized (QGemm).

    Args:
        model: the captured graph, after the x86 annotation; annotated in place.
        qspec: the activation QuantizationSpec.
        weight_qspec: the weight spec to swap in (the asymmetric one torchao's config
            cannot carry), or None to keep the config's.
        static: False for dynamic quantization (only the weight specs change).
        annotation_cls: torchao's QuantizationAnnotation.
    """
    for node in model.graph.nodes:
        if node.op != "call_function":
            continue
        ann = node.meta.get(ANNOTATION)
        if node.target in WEIGHT_OPS and ann is not None and weight_qspec is not None:
            w = node.args[1]
            if ann.input_qspec_map.get(w) is not None:
                ann.input_qspec_map[w] = weight_qspec
        if not static:
            continue
        if node.target in _ADD_OPS:
            _annotate_add(node, qspec, annotation_cls)
        elif (
            node.target == torch.ops.aten.linear.default
            and ann is not None
            and ann.output_qspec is None
        ):
            ann.output_qspec = qspec


def keep_conv_linear_annotations(model: torch.fx.GraphModule) -> None:
    """Dynamic quantization: only conv/linear inputs (and weights) keep their quantizers,
    as onnxruntime's integer ops quantize just those at run time."""
    for node in model.graph.nodes:
        ann = node.meta.get(ANNOTATION)
        if ann is not None and node.target not in WEIGHT_OPS:
            ann.input_qspec_map = {}
            ann.output_qspec = None


def _annotate_add(node: torch.fx.Node, qspec, annotation_cls) -> None:
    val = node.meta.get("val")
    inputs = [a for a in node.args[:2] if isinstance(a, torch.fx.Node)]
    # only float tensor adds (BN's num_batches_tracked += 1 is an add too) of two
    # activations: a parameter added in (a ViT's position embedding) stays float, else it
    # would be folded into a uint8 constant
    if (
        val is None
        or not getattr(val, "is_floating_point", lambda: False)()
        or len(inputs) != 2
        or any(a.op == "get_attr" for a in inputs)
    ):
        return
    users = list(node.users)
    if len(users) == 1 and users[0].target in _RELU_OPS:
        node.meta[ANNOTATION] = annotation_cls(
            input_qspec_map={a: qspec for a in inputs}, _annotated=True
        )
        users[0].meta[ANNOTATION] = annotation_cls(output_qspec=qspec, _annotated=True)
    else:
        node.meta[ANNOTATION] = annotation_cls(
            input_qspec_map={a: qspec for a in inputs}, output_qspec=qspec, _annotated=True
        )


def _is_float_tensor(node: Any) -> bool:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return val is not None and getattr(val, "is_floating_point", lambda: False)()


def _edge_quantized(producer: torch.fx.Node, consumer: torch.fx.Node) -> bool:
    ann, own = producer.meta.get(ANNOTATION), consumer.meta.get(ANNOTATION)
    return (ann is not None and ann.output_qspec is not None) or (
        own is not None and own.input_qspec_map.get(producer) is not None
    )


def _quantize_edge(producer: Any, consumer: torch.fx.Node, qspec, annotation_cls) -> None:
    """Quantize the tensor ``producer`` -> ``consumer``: at the producer's output when the
    quantizer annotated the producer (a conv whose activation it fused, a BN output),
    otherwise on the consumer's input."""
    if not _is_float_tensor(producer) or _edge_quantized(producer, consumer):
        return
    ann = producer.meta.get(ANNOTATION)
    if ann is not None and producer.op == "call_function":
        ann.output_qspec = qspec
        ann._annotated = True
        return
    own = consumer.meta.setdefault(ANNOTATION, annotation_cls(_annotated=True))
    own.input_qspec_map[producer] = qspec


# activations that onnxruntime cannot fold into a QLinearConv (relu / relu6 / hardtanh it
# can: their range is the output quantizer's); quantizing their input and output lets the
# conv before them and the op after them run in integer
_UNARY_OPS = {
    getattr(torch.ops.aten, f"{name}{suffix}").default
    for name in ("hardswish", "silu", "hardsigmoid", "sigmoid", "tanh")
    for suffix in ("", "_")
} | {torch.ops.aten.gelu.default}
_MUL_OPS = {torch.ops.aten.mul.Tensor, torch.ops.aten.mul_.Tensor}
_MAXPOOL_OPS = {torch.ops.aten.max_pool2d.default}


def _fixed_uint8(hi: float):
    """A fixed uint8 quantizer on [0, ``hi``], zero point 0."""
    from torchao.quantization.pt2e.quantizer import FixedQParamsQuantizationSpec

    return FixedQParamsQuantizationSpec(
        dtype=torch.uint8,
        scale=hi / 255,
        zero_point=0,
        quant_min=0,
        quant_max=255,
        qscheme=torch.per_tensor_affine,
    )


def _annotate_hard_gate(node: torch.fx.Node, qspec, annotation_cls) -> None:
    """``x + 3`` -> uint8 on [0, 6]; ``relu6`` unquantized (the saturation is the clamp);
    ``/ 6`` -> uint8 on [0, 1] (see :func:`pqd.quant.rewrite.split_hard_gates`)."""
    tag = node.meta[HARD_GATE]
    ann = annotation_cls(_annotated=True)
    if tag == "add3":
        x, three = node.args[0], node.args[1]
        _quantize_edge(x, node, qspec, annotation_cls)
        own = node.meta.get(ANNOTATION)
        if own is not None:
            ann.input_qspec_map.update(own.input_qspec_map)
        ann.input_qspec_map[three] = qspec
        ann.output_qspec = _fixed_uint8(6.0)
    elif tag == "div6":
        ann.output_qspec = _fixed_uint8(1.0)
        for user in node.users:  # the fixed range quantizes the edge, not a learned one
            own = user.meta.get(ANNOTATION)
            if own is not None:
                own.input_qspec_map.pop(node, None)
    node.meta[ANNOTATION] = ann


def close_float_islands(model: torch.fx.GraphModule, qspec, annotation_cls) -> int:
    """Annotate the blocks of mobile nets that torchao's x86 recipe leaves float in a QDQ
    file, so that onnxruntime fuses them into integer kernels.

    - conv -> hardswish / SiLU / GELU / sigmoid / hardsigmoid: the x86 recipe quantizes
      only the activation's output (its own kernels fuse the activation into the conv);
      onnxruntime has no such fusion and then runs the conv in float. The conv output is
      quantized too (QLinearConv), and so is the activation's output.
    - ``x * gate`` of two tensors (squeeze-excite): both inputs and the output (QLinearMul).
    - ``torch.cat``: every input and the output (QLinearConcat).
    - max pooling whose input is already quantized: the output shares that quantizer, and
      its own input quantizer is dropped; same scale on both sides lets onnxruntime run
      MaxPool on the uint8 tensor (it drops the Q/DQ pair only when the two are equal).

    Args:
        model: the captured graph, after the x86 annotation.
        qspec: the activation QuantizationSpec.
        annotation_cls: torchao's QuantizationAnnotation.

    Returns:
        How many nodes were (re)annotated.
    """
    from torchao.quantization.pt2e.quantizer import SharedQuantizationSpec

    done = 0
    for node in model.graph.nodes:
        if node.op != "call_function" or not _is_float_tensor(node):
            continue
        if HARD_GATE in node.meta:
            _annotate_hard_gate(node, qspec, annotation_cls)
            done += 1
            continue
        if node.target in _UNARY_OPS or node.target in _MUL_OPS:
            inputs = [a for a in node.args[:2] if isinstance(a, torch.fx.Node)]
            if node.target in _MUL_OPS and not (
                len(inputs) == 2 and all(_is_float_tensor(a) for a in inputs)
            ):
                continue  # a scale by a constant: no integer op to gain
            inputs = inputs[:1] if node.target in _UNARY_OPS else inputs
        elif node.target == torch.ops.aten.cat.default:
            inputs = [a for a in node.args[0] if isinstance(a, torch.fx.Node)]
        elif node.target in _MAXPOOL_OPS:
            src = node.args[0]
            src_ann = src.meta.get(ANNOTATION) if isinstance(src, torch.fx.Node) else None
            if src_ann is None or src_ann.output_qspec is None:
                continue
            ann = node.meta.setdefault(ANNOTATION, annotation_cls(_annotated=True))
            ann.input_qspec_map.pop(src, None)
            ann._annotated = True
            ann.output_qspec = SharedQuantizationSpec(src)
            done += 1
            continue
        else:
            continue
        for a in inputs:
            _quantize_edge(a, node, qspec, annotation_cls)
        ann = node.meta.setdefault(ANNOTATION, annotation_cls(_annotated=True))
        if ann.output_qspec is None:
            ann.output_qspec = qspec
        ann._annotated = True
        done += 1
    return done


# ops that only move or view a tensor: a quantizer passes through them unchanged
_VIEW_OPS = {
    torch.ops.aten.reshape.default,
    torch.ops.aten.view.default,
    torch.ops.aten.permute.default,
    torch.ops.aten.transpose.int,
    torch.ops.aten.unbind.int,
    torch.ops.aten.select.int,
    operator.getitem,
}
_SOFTMAX_OPS = {torch.ops.aten.softmax.int, torch.ops.aten._softmax.default}


def _through_views(node: Any) -> Any:
    """The node that ``node`` views (reshape / permute / unbind ...), or ``node`` itself."""
    while isinstance(node, torch.fx.Node) and node.target in _VIEW_OPS:
        node = node.args[0]
    return node


def _users_through_views(node: torch.fx.Node, target: Any) -> bool:
    """Whether every use of ``node``, looking through views, is a ``target`` call that
    quantizes that input itself."""
    users = list(node.users)
    while users:
        user = users.pop()
        if user.target in _VIEW_OPS:
            users += list(user.users)
            continue
        ann = user.meta.get(ANNOTATION)
        if user.target != target or ann is None or not ann.input_qspec_map:
            return False
    return True


def transformer_float_paths(model: torch.fx.GraphModule, qspec, annotation_cls) -> int:
    """Place a transformer's quantizers where onnxruntime runs integer kernels and nowhere
    else (ViT: :mod:`pqd.models.vit`); convs and conv-net blocks are left as they are.

    - residual stream in float: an add of a linear's output (the attention projection,
      the MLP's fc2) to the stream is a float Add, and that linear's output is not
      quantized (QGemm with a float output). The stream then meets LayerNorm without a
      DequantizeLinear, and each block drops a requantize of the stream (QLinearAdd)
      whose rounding onnxruntime and torch compute differently.
    - linear -> GELU: the linear's output stays float (QGemm writes float, GELU reads it,
      the GELU output is quantized once, for the next linear).
    - attention: softmax's output is quantized, so ``attn @ v`` reads two quantized
      tensors and writes the quantized input of the projection (QLinearMatMul);
      ``q @ k^T`` reads the qkv linear's quantized output (MatMulIntegerToFloat).

    Args:
        model: the captured graph, after the x86 annotation and :func:`close_float_islands`.
        qspec: the activation QuantizationSpec.
        annotation_cls: torchao's QuantizationAnnotation.

    Returns:
        How many nodes were (re)annotated.
    """
    done = 0

    def float_output(linear: torch.fx.Node) -> None:
        ann = linear.meta.get(ANNOTATION)
        if ann is not None:
            ann.output_qspec = None

    for node in model.graph.nodes:
        if node.op != "call_function" or not _is_float_tensor(node):
            continue
        if node.target in _ADD_OPS:
            inputs = [a for a in node.args[:2] if isinstance(a, torch.fx.Node)]
            linears = [
                _through_views(a)
                for a in inputs
                if _through_views(a).target == torch.ops.aten.linear.default
            ]
            # a hard gate's ``x + 3`` after a linear (MobileNetV3's classifier) and any add
            # of a constant are not the residual stream: they stay integer
            constant = any(a.op == "get_attr" for a in inputs)
            if not linears or len(inputs) != 2 or constant:
                continue
            node.meta.pop(ANNOTATION, None)  # float add, float stream
            for lin in linears:
                float_output(lin)
            done += 1
        elif node.target == torch.ops.aten.gelu.default:
            src = _through_views(node.args[0])
            if src.target != torch.ops.aten.linear.default:
                continue
            float_output(src)
            ann = node.meta.get(ANNOTATION)
            if ann is not None:
                ann.input_qspec_map.pop(node.args[0], None)
                # the next linear quantizes the GELU output on its own input edge (behind
                # the 2-D view): a quantizer here as well would requantize it
                if _users_through_views(node, torch.ops.aten.linear.default):
                    ann.output_qspec = None
            done += 1
        elif node.target in _SOFTMAX_OPS:
            if not any(u.target == torch.ops.aten.matmul.default for u in node.users):
                continue
            ann = node.meta.setdefault(ANNOTATION, annotation_cls(_annotated=True))
            ann.output_qspec = qspec
            ann._annotated = True
            done += 1
    return done
