"""Quantization with PT2E (torchao): QAT, PTQ (calibration only) or dynamic.

prepare -> calibrate on the validation split -> the shared fine-tune loop -> (convert at
export). The model is captured with ``torch.export(strict=True)`` (non-strict capture
leaves no ``source_fn_stack`` and the quantizer silently skips every conv), then
``prepare_qat_pt2e`` inserts fake-quantizers and simulates BN folding. Every conv/linear
weight is checked to carry a fake-quantizer (unless mixed precision keeps it float).

The default recipe is torchao's X86InductorQuantizer one (activations asymmetric uint8
per tensor, weights symmetric int8 per output channel, BN folded), with the weights kept
in 7 bits ([-64, 63]) unless the deployment target has VNNI (``reduce_range`` in the
scheme, from ``ctx.target``; see :mod:`pqd.target`), re-annotated for
onnxruntime's QDQ fusions: each conv output gets its own quantizer instead of fusing
conv+add, residual adds are quantized on both inputs and output (QLinearAdd), and the
linear output is quantized (QGemm). Measured on ResNet-18, CIFAR, batch 1, 2 threads:
the X86 annotation left 8 of 20 convs in float in onnxruntime (7.9 ms); this one fuses
all 20 (1.8 ms).

Options (``QuantizeSpec``; measured in ``benchmarks/quantization.py``):

- ``weights``: per-channel or per-tensor, symmetric or asymmetric (torchao's quantizers
  accept only symmetric weight schemes: the asymmetric spec is swapped in after
  annotation), 8 or 4 bits (INT4 is stored as INT4 in the file; onnxruntime 1.32 runs
  it as DequantizeLinear + float Conv, so it is smaller but slower than INT8).
- ``activations``: asymmetric uint8 (U8S8, fused into QLinearConv) or symmetric int8
  (S8S8: onnxruntime 1.32 on x86 leaves those convs in float); the range comes from
  ``pqd.quant.calibration`` (minmax, percentile or entropy) on the validation split. In QAT
  with ``minmax`` the ranges then follow torchao's moving average; ``percentile`` and
  ``entropy`` ranges, and every PTQ range, are held fixed (later training adapts the
  weights to them, as NVIDIA's pytorch-quantization QAT does).
- ``mode: dynamic``: weights int8 (narrow range [-127, 127], so the file's integers are
  exactly the trained ones) and activations fake-quantized with each batch's own
  min/max, as onnxruntime's DynamicQuantizeLinear does at run time; exported as
  DynamicQuantizeLinear + ConvInteger / MatMulInteger.
- ``mixed_precision``: layers ranked by the val-split accuracy drop of quantizing each
  alone (:mod:`pqd.quant.sensitivity`); the most sensitive stay float until the quantized
  model's val drop is within ``max_drop_points``.

The scheme is kept in ``graph.meta["pqd_quant"]`` (it survives deepcopy), which the export
reads. PTQ and dynamic graphs are fake-quant graphs like QAT ones, so a later stage (KD,
pruning) can fine-tune them with quantization on.
"""

from __future__ import annotations

import copy
import functools
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

import pqd._pt2e_cache as _pt2e_cache
from pqd.errors import ModelError, RecipeError
from pqd.models.multi_exit import MultiExitNet
from pqd.quant.calibration import TensorStats
from pqd.recipe import QuantizeSpec
from pqd.train import set_train

_ADD_OPS = {torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor}
_RELU_OPS = {torch.ops.aten.relu.default, torch.ops.aten.relu_.default}
_WEIGHT_OPS = {
    torch.ops.aten.conv2d.default,
    torch.ops.aten.conv1d.default,
    torch.ops.aten.linear.default,
}
ANNOTATION = "quantization_annotation"
META_KEY = "pqd_quant"
_EPS = 2**-12  # torchao's x86 default
# scheme keys that change the quantized types (the rest: how ranges are set, which are float)
TYPE_KEYS = (
    "granularity",
    "weight_symmetric",
    "weight_bits",
    "activation_symmetric",
    "reduce_range",
)

# reduce_range: 8-bit weights kept in [-64, 63] (the portable target, see pqd.target)
DEFAULT_SCHEME: dict[str, Any] = {
    "mode": "qat",
    "granularity": "per_channel",
    "weight_symmetric": True,
    "weight_bits": 8,
    "activation_symmetric": False,
    "observer": "minmax",
    "percentile": 99.99,
    "reduce_range": True,
    "float_layers": [],
}


def scheme_of(spec: QuantizeSpec, reduce_range: bool = True) -> dict[str, Any]:
    """The quantization scheme of a quantize stage as plain data (kept on the graph).

    Args:
        spec: the stage's options.
        reduce_range: 7-bit weights (the deployment target has no VNNI or is unknown;
            see :mod:`pqd.target`); False: full 8-bit weights (``x86-vnni``).
    """
    return {
        "mode": spec.mode,
        "granularity": spec.weights.granularity,
        "weight_symmetric": spec.weights.symmetric,
        "weight_bits": spec.weights.bits,
        "activation_symmetric": spec.activations.symmetric,
        "observer": spec.activations.observer,
        "percentile": spec.activations.percentile,
        "reduce_range": reduce_range,
        "float_layers": [],
    }


def weight_range(scheme: dict[str, Any]) -> tuple[int, int]:
    """``(quant_min, quant_max)`` of the scheme's integer weights.

    INT4 is [-8, 7]; dynamic weights are narrow and symmetric (onnxruntime's integer ops);
    ``reduce_range`` keeps 8-bit weights in 7 bits so that no pair of them can saturate
    the int16 sums of x86 kernels without VNNI. Schemes saved before ``reduce_range``
    existed were full 8-bit.
    """
    reduced = bool(scheme.get("reduce_range", False))
    if scheme["weight_bits"] == 4:
        return -8, 7
    if scheme["mode"] == "dynamic":
        return (-63, 63) if reduced else (-127, 127)
    return (-64, 63) if reduced else (-128, 127)


def graphs_in(model: nn.Module) -> list[tuple[str, torch.fx.GraphModule]]:
    """``(name, graph)`` for every PT2E graph in ``model`` (the model itself when it is one)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.fx.GraphModule)]


def quant_scheme(model: nn.Module) -> dict[str, Any]:
    """The scheme stored on the model's (first) quantized graph; the default if none is."""
    for _, g in graphs_in(model):
        if META_KEY in g.meta:
            return g.meta[META_KEY]
    return copy.deepcopy(DEFAULT_SCHEME)


def precision_label(scheme: dict[str, Any]) -> str:
    """Short text for the record: ``int8``, ``int8-dynamic``, ``int4w-uint8a``, ``+fp32``..."""
    if scheme["mode"] == "dynamic":
        label = "int8-dynamic"
    else:
        act = "int8a" if scheme["activation_symmetric"] else "uint8a"
        label = (
            "int8"
            if scheme["weight_bits"] == 8 and act == "uint8a"
            else f"int{scheme['weight_bits']}w-{act}"
        )
    n_float = len(scheme.get("float_layers", []))
    return label + (f"+fp32({n_float} layers)" if n_float else "")


# ---------------------------------------------------------------------------- quantizer


@functools.cache
def dynamic_fake_quantize() -> type:
    """The dynamic activation fake-quantizer class (built on first use: torchao is imported
    lazily, it takes over a second)."""
    from torchao.quantization.pt2e.fake_quantize import FakeQuantizeBase

    class _DynamicActFakeQuantize(FakeQuantizeBase):
        """uint8 fake-quant whose range is each call's own min/max (with 0 inside), as
        onnxruntime's DynamicQuantizeLinear computes it at run time. Gradients pass straight
        through inside the range. There is nothing to observe: ``observer_enabled`` (shared
        eval switch) changes nothing."""

        def __init__(self, **_: Any) -> None:
            super().__init__()
            self.dtype = torch.uint8
            self.is_dynamic = True

        def calculate_qparams(self, **_: Any):
            raise RuntimeError("dynamic fake-quant has no fixed qparams")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not int(self.fake_quant_enabled[0]):
                return x
            v = x.detach()
            lo = torch.clamp(v.min(), max=0.0).float()
            hi = torch.clamp(v.max(), min=0.0).float()
            scale = torch.clamp((hi - lo) / 255.0, min=1e-12).reshape(1)
            zp = torch.clamp(torch.round(-lo / scale), 0, 255).to(torch.int32).reshape(1)
            return torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, 255)

    return _DynamicActFakeQuantize


def quantization_config(scheme: dict[str, Any]):  # -> (QuantizationConfig, weight spec)
    """torchao QAT config for ``scheme``, and the weight spec to put on every conv/linear.

    The second item differs from the config's weight spec only for asymmetric weights:
    torchao's quantizers reject asymmetric weight schemes, so the config carries the
    symmetric twin and :func:`ort_quantizer` swaps the real one in after annotation.
    """
    from torchao.quantization.pt2e.fake_quantize import FusedMovingAvgObsFakeQuantize
    from torchao.quantization.pt2e.observer import (
        MovingAverageMinMaxObserver,
        MovingAveragePerChannelMinMaxObserver,
    )
    from torchao.quantization.pt2e.quantizer import QuantizationSpec
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import QuantizationConfig

    dynamic = scheme["mode"] == "dynamic"
    if dynamic:
        act = QuantizationSpec(
            dtype=torch.uint8,
            quant_min=0,
            quant_max=255,
            qscheme=torch.per_tensor_affine,
            is_dynamic=False,
            observer_or_fake_quant_ctr=dynamic_fake_quantize().with_args(),  # type: ignore[attr-defined]
        )
    elif scheme["activation_symmetric"]:
        act = QuantizationSpec(
            dtype=torch.int8,
            quant_min=-128,
            quant_max=127,
            qscheme=torch.per_tensor_symmetric,
            is_dynamic=False,
            observer_or_fake_quant_ctr=FusedMovingAvgObsFakeQuantize.with_args(eps=_EPS),
        )
    else:  # torchao's x86 default
        act = QuantizationSpec(
            dtype=torch.uint8,
            quant_min=0,
            quant_max=255,
            qscheme=torch.per_tensor_affine,
            is_dynamic=False,
            observer_or_fake_quant_ctr=FusedMovingAvgObsFakeQuantize.with_args(eps=_EPS),
        )
    qmin, qmax = weight_range(scheme)
    per_channel = scheme["granularity"] == "per_channel"

    def weight_spec(symmetric: bool) -> Any:
        if per_channel:
            qscheme = torch.per_channel_symmetric if symmetric else torch.per_channel_affine
            obs = MovingAveragePerChannelMinMaxObserver
        else:
            qscheme = torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine
            obs = MovingAverageMinMaxObserver
        return QuantizationSpec(
            dtype=torch.int8,
            quant_min=qmin,
            quant_max=qmax,
            qscheme=qscheme,
            ch_axis=0 if per_channel else None,
            is_dynamic=False,
            observer_or_fake_quant_ctr=FusedMovingAvgObsFakeQuantize.with_args(
                observer=obs, eps=_EPS
            ),
        )

    config = QuantizationConfig(act, act, weight_spec(True), None, True)
    return config, weight_spec(scheme["weight_symmetric"])


def ort_quantizer(is_qat: bool = True, scheme: dict[str, Any] | None = None):
    """The X86InductorQuantizer recipe, annotated for onnxruntime QDQ fusion (see module doc).

    ``scheme`` (default: U8S8 per-channel int8) picks the weight/activation specs; in
    dynamic mode only conv/linear inputs and weights are quantized, as onnxruntime's
    integer ops do.
    """
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    scheme = scheme or DEFAULT_SCHEME
    static = scheme["mode"] != "dynamic"
    default = (
        static
        and not scheme.get("reduce_range", False)
        and all(scheme[k] == DEFAULT_SCHEME[k] for k in TYPE_KEYS if k != "reduce_range")
    )
    if default:  # exactly torchao's x86 recipe (full 8-bit weights: the x86-vnni target)
        config, weight_qspec = get_default_x86_inductor_quantization_config(is_qat=is_qat), None
    else:
        config, weight_qspec = quantization_config(scheme)

    class OrtQDQQuantizer(X86InductorQuantizer):
        # conv(+bn)+add(+relu) fusions leave the conv output unquantized: onnxruntime
        # then keeps that conv in float. Skip them; the conv(+bn)(+relu) patterns apply.
        def _annotate_qat_conv2d_bn_binary_unary(self, *a, **k):
            return None

        def _annotate_qat_conv2d_bn_binary(self, *a, **k):
            return None

        def _annotate_conv2d_binary_unary(self, *a, **k):
            return None

        def _annotate_conv2d_binary(self, *a, **k):
            return None

        def transform_for_annotation(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            model = super().transform_for_annotation(model)
            if static:
                split_silu(model)
                split_hard_gates(model)
            return model

        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            super().annotate(model)
            qspec = self.global_config.input_activation
            for node in model.graph.nodes:
                if node.op != "call_function":
                    continue
                ann = node.meta.get(ANNOTATION)
                if node.target in _WEIGHT_OPS and ann is not None and weight_qspec is not None:
                    w = node.args[1]
                    if ann.input_qspec_map.get(w) is not None:
                        ann.input_qspec_map[w] = weight_qspec
                if not static:
                    continue
                if node.target in _ADD_OPS:
                    _annotate_add(node, qspec, QuantizationAnnotation)
                elif (
                    node.target == torch.ops.aten.linear.default
                    and ann is not None
                    and ann.output_qspec is None
                ):
                    ann.output_qspec = qspec
            if static:
                close_float_islands(model, qspec, QuantizationAnnotation)
                transformer_float_paths(model, qspec, QuantizationAnnotation)
            if not static:  # dynamic: only conv/linear inputs carry activation quantizers
                for node in model.graph.nodes:
                    ann = node.meta.get(ANNOTATION)
                    if ann is not None and node.target not in _WEIGHT_OPS:
                        ann.input_qspec_map = {}
                        ann.output_qspec = None
            return model

    quantizer = OrtQDQQuantizer()
    quantizer.set_global(config)
    return quantizer


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


_SILU_OPS = {torch.ops.aten.silu.default, torch.ops.aten.silu_.default}
_KEPT_META = ("val", "tensor_meta", "stack_trace")


def split_silu(model: torch.fx.GraphModule) -> int:
    """Rewrite each ``silu(x)`` as ``x * sigmoid(x)`` (the same function), so that
    :func:`close_float_islands` can quantize the sigmoid's output between the two.

    ONNX has no SiLU op: it exports as ``Sigmoid`` then ``Mul`` with no quantizer in
    between, and onnxruntime runs both in float on a dequantized tensor. With the gate
    quantized, onnxruntime runs ``QLinearSigmoid`` (a 256-entry lookup table) and
    ``QLinearMul`` on uint8 tensors instead.

    Args:
        model: the captured graph, before annotation; rewritten in place.

    Returns:
        How many SiLUs were split.
    """
    done = 0
    for node in list(model.graph.nodes):
        if node.op != "call_function" or node.target not in _SILU_OPS:
            continue
        x = node.args[0]
        with model.graph.inserting_before(node):
            gate = model.graph.call_function(torch.ops.aten.sigmoid.default, (x,))
            prod = model.graph.call_function(torch.ops.aten.mul.Tensor, (x, gate))
        for new in (gate, prod):  # not its module stack: no conv-bn-SiLU fusion
            new.meta = {k: node.meta[k] for k in _KEPT_META if k in node.meta}
        node.replace_all_uses_with(prod)
        model.graph.erase_node(node)
        done += 1
    if done:
        model.graph.lint()
        model.recompile()
    return done


_HARD_OPS = {
    getattr(torch.ops.aten, f"{name}{suffix}").default
    for name in ("hardswish", "hardsigmoid")
    for suffix in ("", "_")
}
HARD_GATE = "pqd_hard_gate"  # node.meta tag: "add3" / "relu6" / "div6" (split_hard_gates)


def split_hard_gates(model: torch.fx.GraphModule) -> int:
    """Rewrite ``hardsigmoid(x)`` as ``relu6(x + 3) / 6`` and ``hardswish(x)`` as
    ``x * (relu6(x + 3) / 6)`` (the same functions), tagged for :func:`close_float_islands`.

    onnxruntime has no integer HardSigmoid / HardSwish (it runs them as float HardSigmoid
    and Mul on a dequantized tensor). Quantized with fixed ranges (``x + 3`` on [0, 6], the
    gate on [0, 1], both with zero point 0) the uint8 codes of ``relu6(x + 3)`` and of the
    gate are the same integers: :func:`pqd.onnx_export.drop_requantize` then removes the
    ``/ 6`` and onnxruntime runs ``QLinearAdd`` (the saturation to uint8 is the relu6) and
    ``QLinearMul``.

    Args:
        model: the captured graph, before annotation; rewritten in place.

    Returns:
        How many hardswish / hardsigmoid nodes were split.
    """
    done = 0
    for node in list(model.graph.nodes):
        if node.op != "call_function" or node.target not in _HARD_OPS:
            continue
        x = node.args[0]
        name = f"_pqd_three_{done}"
        model.register_buffer(name, torch.tensor(3.0))
        graph = model.graph
        with graph.inserting_before(node):
            three = graph.get_attr(name)
            t = graph.call_function(torch.ops.aten.add.Tensor, (x, three))
            r = graph.call_function(torch.ops.aten.clamp.default, (t, 0.0, 6.0))
            gate = graph.call_function(torch.ops.aten.div.Tensor, (r, 6.0))
            out = gate
            if "hardswish" in str(node.target):
                out = graph.call_function(torch.ops.aten.mul.Tensor, (x, gate))
        val = node.meta.get("val")
        three.meta = (
            {"val": torch.empty((), dtype=val.dtype, device=val.device)} if val is not None else {}
        )
        roles = [(t, "add3"), (r, "relu6"), (gate, "div6")] + (
            [(out, None)] if out is not gate else []
        )
        for new, tag in roles:
            new.meta = {k: node.meta[k] for k in _KEPT_META if k in node.meta}
            if tag is not None:
                new.meta[HARD_GATE] = tag
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        done += 1
    if done:
        model.graph.lint()
        model.recompile()
    return done


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
    ``/ 6`` -> uint8 on [0, 1] (see :func:`split_hard_gates`)."""
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


def capture(model: nn.Module, example: torch.Tensor) -> torch.fx.GraphModule:
    """``torch.export`` (strict, dynamic batch) of ``model`` as a GraphModule."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    model = model.to(memory_format=torch.contiguous_format)
    try:
        ep = torch.export.export(model, (example,), dynamic_shapes=({0: batch},), strict=True)
    except Exception as exc:
        raise ModelError(
            f"quantize: torch.export could not capture the model ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})",
            "remove data-dependent control flow and padding='same' from forward()",
        ) from None
    return ep.module()


def _is_fake_quant(graph: torch.fx.GraphModule, node: Any) -> bool:
    return (
        isinstance(node, torch.fx.Node)
        and node.op == "call_module"
        and hasattr(graph.get_submodule(str(node.target)), "fake_quant_enabled")
    )


def unquantized_weights(graph: torch.fx.GraphModule) -> list[str]:
    """Names of conv/linear nodes whose weight does not pass through a fake-quantizer."""
    return [
        node.name
        for node in graph.graph.nodes
        if node.op == "call_function"
        and node.target in _WEIGHT_OPS
        and not _is_fake_quant(graph, node.args[1])
    ]


def prepare_qat(
    model: nn.Module, example: torch.Tensor, scheme: dict[str, Any] | None = None
) -> torch.fx.GraphModule:
    """Capture ``model`` and insert fake-quantizers; every conv/linear weight must get one."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    _pt2e_cache.install()
    scheme = copy.deepcopy(scheme or DEFAULT_SCHEME)
    bn_settings = {
        (m.eps, m.momentum)
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }
    set_train(model, True)
    graph = prepare_qat_pt2e(capture(model, example), ort_quantizer(True, scheme))
    _restore_bn_settings(graph, bn_settings)
    missing = unquantized_weights(graph)
    if missing:
        raise ModelError(
            f"quantize: {len(missing)} conv/linear layers got no INT8 weight quantizer "
            f"({', '.join(missing[:4])})",
            "use conv -> BatchNorm -> ReLU blocks with numeric padding (see pqd.models)",
        )
    graph.meta[META_KEY] = scheme
    return graph


@torch.no_grad()
def refresh_bn_stats(model: nn.Module, loader, batches: int, device: torch.device) -> int:
    """Re-estimate every BatchNorm's running mean and variance as the plain average over
    ``batches`` batches of ``loader`` (the rest of the model stays in eval mode).

    Why before QAT: PT2E folds each BN into its conv with the *running* variance, the
    activation ranges are calibrated with the running statistics, but QAT trains with the
    batch statistics. After a short baseline the running averages lag far behind the
    weights (momentum 0.1 remembers ~10 steps), so the train-mode activations overflow
    the calibrated ranges, the clamped convs' outputs have a tiny batch variance, and
    every BN's backward pass multiplies the gradient by gamma / that std: on a 50-conv
    depthwise net (MobileNetV2) the first QAT gradient norm reached 1e5-1e10.
    With statistics that match the weights the three agree. A well-trained baseline's
    statistics barely change.

    Args:
        model: an eager model (a captured graph has no BN modules: nothing happens).
        loader: yields ``(images, labels)`` batches.
        batches: how many batches to average over.
        device: where the model is.

    Returns:
        Images seen (0: the statistics were left as they were).
    """
    bns = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    if not bns:
        return 0
    saved = [(m, m.momentum, copy.deepcopy(m.state_dict())) for m in bns]
    was = model.training
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches seen
        m.train()
    forward = model.forward_all if isinstance(model, MultiExitNet) else model
    seen = 0
    try:
        for i, (x, _) in enumerate(loader):
            if i >= batches:
                break
            if x.shape[0] < 2:  # one image has no batch variance
                continue
            forward(x.to(device))
            seen += x.shape[0]
    finally:
        for m, momentum, state in saved:
            m.momentum = momentum
            if seen == 0:
                m.load_state_dict(state)
        model.train(was)
    return seen


def prepare_qat_parts(
    net: nn.Module, example: torch.Tensor, scheme: dict[str, Any] | None = None
) -> nn.Module:
    """Per-part QAT for a multi-exit net: every segment and head becomes its own PT2E graph
    with its own fake-quantizers (each part is exported to its own ONNX file). Parameter
    names do not change (a part keeps its internal names)."""
    from pqd.models.multi_exit import part_inputs

    inputs = part_inputs(net, example)
    for name, part in list(net.parts()):
        net.set_part(name, prepare_qat(part, inputs[name], scheme))
    tie_boundary_quantizers(net)
    return net


def _fq_target(graph: torch.fx.GraphModule, node: Any) -> str | None:
    if (
        isinstance(node, torch.fx.Node)
        and node.op == "call_module"
        and hasattr(graph.get_submodule(str(node.target)), "observer_enabled")
    ):
        return str(node.target)
    return None


def tie_boundary_quantizers(net: nn.Module) -> int:
    """Make the next segment and the head read a segment's output with the segment's own
    output fake-quantizer (one shared module): at a boundary the INT8 files then
    dequantize and re-quantize with the same scale, which is exact, so the segments run
    one by one give the same numbers as the same segments chained into one graph.
    Returns how many input quantizers now share their producer's."""
    tied = 0
    for k in range(len(net.segments) - 1):
        seg = net.segments[k]
        output = next(n for n in seg.graph.nodes if n.op == "output")
        produced = output.args[0]
        src = _fq_target(seg, produced[0] if isinstance(produced, (tuple, list)) else produced)
        if src is None:
            continue  # the segment ends in float: the next parts keep their own quantizers
        shared = seg.get_submodule(src)
        for reader in (net.segments[k + 1], net.heads[k]):
            placeholder = next(n for n in reader.graph.nodes if n.op == "placeholder")
            fqs = [t for u in placeholder.users if (t := _fq_target(reader, u))]
            if len(fqs) == 1:
                reader.set_submodule(fqs[0], shared)  # type: ignore[attr-defined]
                tied += 1
    return tied


def _restore_bn_settings(graph: torch.fx.GraphModule, settings: set[tuple[float, float]]) -> None:
    """prepare_qat_pt2e's conv-BN fusion resets BN momentum/eps to 0.1/1e-5: put them back."""
    if len(settings) != 1:
        return  # mixed settings cannot be mapped back node by node; keep torchao's
    eps, momentum = next(iter(settings))
    if (eps, momentum) == (1e-5, 0.1):
        return
    for node in graph.graph.nodes:
        if node.op == "call_function" and "batch_norm" in str(node.target):
            args = list(node.args)
            # aten.batch_norm / _native_batch_norm_legit: (..., training, momentum, eps)
            if len(args) >= 3 and isinstance(args[-1], float) and isinstance(args[-2], float):
                args[-2], args[-1] = momentum, eps
                node.args = tuple(args)
    graph.recompile()


# ---------------------------------------------------------------------------- layers


@dataclass
class LayerQuant:
    """The fake-quantizers of one conv/linear layer in a prepared graph.

    ``weight_fq`` / ``input_fqs`` are model-qualified fake-quantizer names (as
    :func:`fake_quantizers` yields them); ``*_node`` are their call_module nodes.
    """

    name: str  # eager module path, e.g. net.features.1.0.0
    op: str  # conv | linear
    graph: torch.fx.GraphModule
    node: torch.fx.Node
    weight_node: torch.fx.Node | None
    input_nodes: list[torch.fx.Node] = field(default_factory=list)
    prefix: str = ""

    def qualified(self, node: torch.fx.Node) -> str:
        return f"{self.prefix}.{node.target}" if self.prefix else str(node.target)

    @property
    def weight_fq(self) -> str | None:
        return None if self.weight_node is None else self.qualified(self.weight_node)

    @property
    def input_fqs(self) -> list[str]:
        return [self.qualified(n) for n in self.input_nodes]


def _module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return node.name
    return str(list(stack.values())[-1][0])


def quantized_layers(model: nn.Module) -> dict[str, LayerQuant]:
    """Every conv/linear layer of the model's graphs, by eager module path (in graph order)."""
    layers: dict[str, LayerQuant] = {}
    for prefix, graph in graphs_in(model):
        for node in graph.graph.nodes:
            if node.op != "call_function" or node.target not in _WEIGHT_OPS:
                continue
            name = _module_path(node)
            w, x = node.args[1], node.args[0]
            layers[f"{prefix}.{name}" if prefix else name] = LayerQuant(
                name=f"{prefix}.{name}" if prefix else name,
                op="linear" if node.target == torch.ops.aten.linear.default else "conv",
                graph=graph,
                node=node,
                weight_node=w if _is_fake_quant(graph, w) else None,
                input_nodes=[x] if _is_fake_quant(graph, x) else [],
                prefix=prefix,
            )
    return layers


def fake_quantizers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(model-qualified name, module)`` for every fake-quantizer in the model's graphs."""
    for prefix, graph in graphs_in(model):
        for name, mod in graph.named_children():
            if hasattr(mod, "fake_quant_enabled"):
                yield (f"{prefix}.{name}" if prefix else name), mod


def float_layer_quantizers(model: nn.Module, names: list[str]) -> set[str]:
    """The fake-quantizers that keeping ``names`` in float removes: their weights', and
    their inputs' where every consumer of that input is kept float too."""
    layers = quantized_layers(model)
    chosen = {layers[n].node for n in names}
    out: set[str] = set()
    for n in names:
        lq = layers[n]
        if lq.weight_node is not None:
            out.add(lq.qualified(lq.weight_node))
        for fq in lq.input_nodes:
            if all(u in chosen for u in fq.users):
                out.add(lq.qualified(fq))
    return out


def keep_float(model: nn.Module, names: list[str]) -> None:
    """Remove the fake-quantizers of layers ``names`` (see :func:`float_layer_quantizers`)
    from the graphs, so those layers train and export in float."""
    unknown = sorted(set(names) - set(quantized_layers(model)))
    if unknown:
        raise RecipeError(
            f"quantize: no conv/linear layer named {unknown[0]!r}",
            "name layers as `pqd sensitivity` lists them",
        )
    layers = quantized_layers(model)
    drop = float_layer_quantizers(model, names)
    for prefix, graph in graphs_in(model):
        for node in list(graph.graph.nodes):
            qual = f"{prefix}.{node.target}" if prefix else str(node.target)
            if node.op == "call_module" and qual in drop:
                node.replace_all_uses_with(node.args[0])
                graph.graph.erase_node(node)
                graph.delete_submodule(str(node.target))
        graph.recompile()
        scheme = graph.meta.setdefault(META_KEY, copy.deepcopy(DEFAULT_SCHEME))
        chosen = set(scheme.get("float_layers", [])) | set(names)
        scheme["float_layers"] = [n for n in layers if n in chosen and layers[n].graph is graph]


# ---------------------------------------------------------------------------- calibration


@torch.no_grad()
def calibrate(
    model: nn.Module,
    loader,
    batches: int,
    device: torch.device,
    scheme: dict[str, Any] | None = None,
    forward_loop: Callable[[nn.Module], None] | None = None,
) -> int:
    """Set every activation range from ``batches`` batches of ``loader``, or from what
    ``forward_loop(model)`` runs through the model (the user's own calibration loop, as in
    ModelOpt's ``mtq.quantize``); returns images seen.

    The float network runs (fake-quant off); weight quantizers observe their weights;
    each static activation quantizer gets the range of ``scheme["observer"]`` over the
    batches (:class:`pqd.quant.calibration.TensorStats`). Afterwards fake-quant is on and
    activation observers are off, except in QAT with minmax ranges, where torchao's
    moving average goes on tracking them during training.
    """
    scheme = scheme or quant_scheme(model)
    weight_names = {lq.weight_fq for lq in quantized_layers(model).values() if lq.weight_fq}
    fqs = dict(fake_quantizers(model))
    acts = {
        n: m
        for n, m in fqs.items()
        if n not in weight_names
        and not getattr(m, "is_dynamic", False)
        and hasattr(getattr(m, "activation_post_process", None), "min_val")  # not fixed
    }
    for name, m in fqs.items():
        m.fake_quant_enabled[0] = 0
        m.observer_enabled[0] = 1 if name in weight_names else 0
    stats = {n: TensorStats() for n in acts}
    observer = scheme["observer"]
    symmetric = scheme["activation_symmetric"]
    set_train(model, False)
    multi = isinstance(model, MultiExitNet)

    def run(observe) -> int:
        hooks = [
            m.register_forward_pre_hook(lambda _m, args, n=n: observe(stats[n], args[0]))
            for n, m in acts.items()
        ]
        seen = 0
        if forward_loop is not None:
            counted: list[int] = []
            hooks.append(
                model.register_forward_pre_hook(lambda _m, args: counted.append(len(args[0])))
            )
            try:
                with torch.no_grad():
                    forward_loop(model)
            finally:
                for h in hooks:
                    h.remove()
            return sum(counted)
        try:
            for i, (x, _) in enumerate(loader):
                if i >= batches:
                    break
                if multi:
                    model.forward_all(x.to(device))  # the exit heads' quantizers too
                else:
                    model(x.to(device))
                seen += x.shape[0]
        finally:
            for h in hooks:
                h.remove()
        return seen

    seen = run(lambda s, x: s.observe_range(x))
    if observer != "minmax":
        for s in stats.values():
            s.start_histogram(symmetric or observer == "entropy")
        run(lambda s, x: s.observe_histogram(x))
    for name, m in acts.items():
        s = stats[name]
        if s.hi < s.lo:  # never reached (dead branch): keep torchao's defaults
            continue
        nonneg = s.lo >= 0.0 and not symmetric
        lo, hi = s.range(
            observer,
            symmetric=symmetric,
            levels=256 if nonneg else 128,
            percentile=scheme["percentile"],
        )
        obs = m.activation_post_process
        obs.min_val.resize_(()).fill_(lo)
        obs.max_val.resize_(()).fill_(hi)
        scale, zp = obs.calculate_qparams()
        m.scale.resize_(scale.shape).copy_(scale)
        m.zero_point.resize_(zp.shape).copy_(zp)
    for name in weight_names:  # the fused observer computes qparams only with fake-quant on
        m = fqs[name]
        scale, zp = m.calculate_qparams()
        m.scale.resize_(scale.shape).copy_(scale)
        m.zero_point.resize_(zp.shape).copy_(zp)
    track = scheme["mode"] == "qat" and observer == "minmax"
    for name, m in fqs.items():
        m.fake_quant_enabled[0] = 1
        if name in acts:
            m.observer_enabled[0] = 1 if track else 0
    return seen


# ---------------------------------------------------------------------------- the stage
