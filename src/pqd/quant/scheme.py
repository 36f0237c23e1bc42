"""The quantization scheme: what a quantize stage asks for, as plain data kept on the graph.

A scheme is a small dict (``DEFAULT_SCHEME`` holds every key) built from a stage's
``QuantizeSpec`` by :func:`scheme_of`. It is kept in ``graph.meta["pqd_quant"]`` (it
survives deepcopy), where the quantizer, calibration, the export and the record read it,
so a prepared graph carries its own description. Options (measured in
``benchmarks/quantization.py``):

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
- ``reduce_range``: 8-bit weights kept in 7 bits ([-64, 63]) unless the deployment target
  has VNNI (from ``ctx.target``; see :mod:`pqd.target`).
- ``mixed_precision``: layers ranked by the val-split accuracy drop of quantizing each
  alone (:mod:`pqd.quant.sensitivity`); the most sensitive stay float until the quantized
  model's val drop is within ``max_drop_points``. Their names are the scheme's
  ``float_layers``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

from pqd.recipe import QuantizeSpec

META_KEY = "pqd_quant"
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
