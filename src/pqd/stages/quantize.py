"""INT8 quantization with PT2E (torchao): QAT, or PTQ calibration.

prepare -> the shared fine-tune loop -> (convert at export). The model is
captured with ``torch.export(strict=True)`` (non-strict capture leaves no
``source_fn_stack`` and the quantizer silently skips every conv), then
``prepare_qat_pt2e`` inserts fake-quantizers and simulates BN folding. Every
conv/linear weight is checked to carry a fake-quantizer; anything else is an error.

The quantization recipe is torchao's X86InductorQuantizer one (activations
asymmetric uint8 per tensor, weights symmetric int8 per output channel, BN
folded), re-annotated for onnxruntime's QDQ fusions: each conv output gets
its own quantizer instead of fusing conv+add, residual adds are quantized on
both inputs and output (QLinearAdd), and the linear output is quantized (QGemm).
Measured on ResNet-18, CIFAR, batch 1, 2 threads: the X86 annotation left 8 of
20 convs in float in onnxruntime (7.9 ms); this one fuses all 20 (1.8 ms).

PTQ uses the same fake-quant graph, calibrated on training images without
training, so a later stage (KD, pruning) can fine-tune it like a QAT graph.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from pqd import _pt2e_cache
from pqd.errors import ModelError
from pqd.recipe import QuantizeSpec
from pqd.registry import register_stage
from pqd.stages.base import Context, State
from pqd.train import set_train

_ADD_OPS = {torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor}
_RELU_OPS = {torch.ops.aten.relu.default, torch.ops.aten.relu_.default}
_WEIGHT_OPS = {torch.ops.aten.conv2d.default, torch.ops.aten.conv1d.default,
               torch.ops.aten.linear.default}
ANNOTATION = "quantization_annotation"


def ort_quantizer(is_qat: bool = True):  # -> X86InductorQuantizer subclass instance
    """The X86InductorQuantizer recipe, annotated for onnxruntime QDQ fusion (see module doc)."""
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    class OrtQDQQuantizer(X86InductorQuantizer):
        # conv(+bn)+add(+relu) fusions leave the conv output unquantized: onnxruntime
        # then keeps that conv in float. Skip them; the conv(+bn)(+relu) patterns apply.
        def _annotate_qat_conv2d_bn_binary_unary(self, *a, **k): return None
        def _annotate_qat_conv2d_bn_binary(self, *a, **k): return None
        def _annotate_conv2d_binary_unary(self, *a, **k): return None
        def _annotate_conv2d_binary(self, *a, **k): return None

        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            super().annotate(model)
            qspec = self.global_config.input_activation
            for node in model.graph.nodes:
                if node.op != "call_function":
                    continue
                if node.target in _ADD_OPS:
                    _annotate_add(node, qspec, QuantizationAnnotation)
                elif node.target == torch.ops.aten.linear.default:
                    ann = node.meta.get(ANNOTATION)
                    if ann is not None and ann.output_qspec is None:
                        ann.output_qspec = qspec
            return model

    quantizer = OrtQDQQuantizer()
    quantizer.set_global(get_default_x86_inductor_quantization_config(is_qat=is_qat))
    return quantizer


def _annotate_add(node: torch.fx.Node, qspec, annotation_cls) -> None:
    val = node.meta.get("val")
    inputs = [a for a in node.args[:2] if isinstance(a, torch.fx.Node)]
    # only float tensor adds (BN's num_batches_tracked += 1 is an add too)
    if val is None or not getattr(val, "is_floating_point", lambda: False)() or len(inputs) != 2:
        return
    users = list(node.users)
    if len(users) == 1 and users[0].target in _RELU_OPS:
        node.meta[ANNOTATION] = annotation_cls(
            input_qspec_map={a: qspec for a in inputs}, _annotated=True)
        users[0].meta[ANNOTATION] = annotation_cls(output_qspec=qspec, _annotated=True)
    else:
        node.meta[ANNOTATION] = annotation_cls(
            input_qspec_map={a: qspec for a in inputs}, output_qspec=qspec, _annotated=True)


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


def unquantized_weights(graph: torch.fx.GraphModule) -> list[str]:
    """Names of conv/linear nodes whose weight does not pass through a fake-quantizer."""
    missing = []
    for node in graph.graph.nodes:
        if node.op == "call_function" and node.target in _WEIGHT_OPS:
            w = node.args[1]
            fq = isinstance(w, torch.fx.Node) and w.op == "call_module" and hasattr(
                graph.get_submodule(str(w.target)), "observer_enabled")
            if not fq:
                missing.append(node.name)
    return missing


def prepare_qat(model: nn.Module, example: torch.Tensor) -> torch.fx.GraphModule:
    """Capture ``model`` and insert fake-quantizers; every conv/linear weight must get one."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    _pt2e_cache.install()
    bn_settings = {(m.eps, m.momentum) for m in model.modules()
                   if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    set_train(model, True)
    graph = prepare_qat_pt2e(capture(model, example), ort_quantizer(is_qat=True))
    _restore_bn_settings(graph, bn_settings)
    missing = unquantized_weights(graph)
    if missing:
        raise ModelError(
            f"quantize: {len(missing)} conv/linear layers got no INT8 weight quantizer "
            f"({', '.join(missing[:4])})",
            "use conv -> BatchNorm -> ReLU blocks with numeric padding (see pqd.models)",
        )
    return graph


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


@torch.no_grad()
def calibrate(model: nn.Module, loader, batches: int, device: torch.device) -> int:
    """Run ``batches`` batches in eval mode with observers on; returns images seen."""
    set_train(model, False)
    seen = 0
    for i, (x, _) in enumerate(loader):
        if i >= batches:
            break
        model(x.to(device))
        seen += x.shape[0]
    return seen


@register_stage("quantize")
def apply_quantize(state: State, spec: QuantizeSpec, ctx: Context) -> State:
    """Insert INT8 fake-quant (once), calibrate, then fine-tune (QAT) or stop (PTQ)."""
    cfg = ctx.stage_train()
    if not state.quantized:
        state.model = prepare_qat(state.model, ctx.example_input()).to(ctx.device)
        state.quantized = True
        calib = ctx.loader("train", cfg.batch_size, seed=ctx.stage_seed, shuffle=True)
        state.info["calibration_images"] = calibrate(
            state.model, calib, spec.calibration_batches, ctx.device)
    else:
        state.info["note"] = "already quantized: this stage continues QAT fine-tuning"
    if spec.mode == "qat":
        ctx.fit(state, cfg, spec.epochs, seed=ctx.stage_seed, desc=ctx.stage_desc)
    return state
