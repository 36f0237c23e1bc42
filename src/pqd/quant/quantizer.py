"""torchao's X86InductorQuantizer recipe, re-annotated for onnxruntime's QDQ fusions.

The default recipe is torchao's x86 one (activations asymmetric uint8 per tensor, weights
symmetric int8 per output channel, BN folded), with the weights kept in 7 bits
([-64, 63]) unless the deployment target has VNNI (``reduce_range`` in the scheme; see
:mod:`pqd.quant.scheme`). The quantizer re-annotates it for onnxruntime (the passes:
:mod:`pqd.quant.annotate`): each conv output gets its own quantizer instead of fusing
conv+add, residual adds are quantized on both inputs and output (QLinearAdd), and the
linear output is quantized (QGemm). With the x86 annotation alone onnxruntime keeps many
of a ResNet's convs in float; with this one it fuses them all into integer kernels.

The other schemes (per-tensor, asymmetric or 4-bit weights, symmetric activations,
dynamic) build their own torchao config (:func:`quantization_config`). torchao is
imported inside the functions: it takes over a second to import.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from pqd.quant.annotate import (
    annotate_ort_fusions,
    close_float_islands,
    keep_conv_linear_annotations,
    transformer_float_paths,
)
from pqd.quant.rewrite import split_hard_gates, split_silu
from pqd.quant.scheme import DEFAULT_SCHEME, TYPE_KEYS, weight_range

_EPS = 2**-12  # torchao's x86 default


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


def _activation_spec(scheme: dict[str, Any]) -> Any:
    """The activation QuantizationSpec of ``scheme``: uint8 with each batch's own range
    (dynamic), symmetric int8, or asymmetric uint8 (torchao's x86 default)."""
    from torchao.quantization.pt2e.fake_quantize import FusedMovingAvgObsFakeQuantize
    from torchao.quantization.pt2e.quantizer import QuantizationSpec

    dynamic = scheme["mode"] == "dynamic"
    if dynamic:
        ctr = dynamic_fake_quantize().with_args()  # type: ignore[attr-defined]
    else:
        ctr = FusedMovingAvgObsFakeQuantize.with_args(eps=_EPS)
    if not dynamic and scheme["activation_symmetric"]:
        dtype, qmin, qmax, qscheme = torch.int8, -128, 127, torch.per_tensor_symmetric
    else:
        dtype, qmin, qmax, qscheme = torch.uint8, 0, 255, torch.per_tensor_affine
    return QuantizationSpec(
        dtype=dtype,
        quant_min=qmin,
        quant_max=qmax,
        qscheme=qscheme,
        is_dynamic=False,
        observer_or_fake_quant_ctr=ctr,
    )


def _weight_spec(scheme: dict[str, Any], symmetric: bool) -> Any:
    """The weight QuantizationSpec of ``scheme`` (its range, granularity and ``symmetric``)."""
    from torchao.quantization.pt2e.fake_quantize import FusedMovingAvgObsFakeQuantize
    from torchao.quantization.pt2e.observer import (
        MovingAverageMinMaxObserver,
        MovingAveragePerChannelMinMaxObserver,
    )
    from torchao.quantization.pt2e.quantizer import QuantizationSpec

    qmin, qmax = weight_range(scheme)
    per_channel = scheme["granularity"] == "per_channel"
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
        observer_or_fake_quant_ctr=FusedMovingAvgObsFakeQuantize.with_args(observer=obs, eps=_EPS),
    )


def quantization_config(scheme: dict[str, Any]):  # -> (QuantizationConfig, weight spec)
    """torchao QAT config for ``scheme``, and the weight spec to put on every conv/linear.

    The second item differs from the config's weight spec only for asymmetric weights:
    torchao's quantizers reject asymmetric weight schemes, so the config carries the
    symmetric twin and :func:`ort_quantizer` swaps the real one in after annotation.
    """
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import QuantizationConfig

    act = _activation_spec(scheme)
    config = QuantizationConfig(act, act, _weight_spec(scheme, True), None, True)
    return config, _weight_spec(scheme, scheme["weight_symmetric"])


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
            annotate_ort_fusions(model, qspec, weight_qspec, static, QuantizationAnnotation)
            if static:
                close_float_islands(model, qspec, QuantizationAnnotation)
                transformer_float_paths(model, qspec, QuantizationAnnotation)
            else:  # dynamic: only conv/linear inputs carry activation quantizers
                keep_conv_linear_annotations(model)
            return model

    quantizer = OrtQDQQuantizer()
    quantizer.set_global(config)
    return quantizer
