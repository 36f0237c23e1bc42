"""A latency model of the target CPU, built by measuring exported ONNX pieces.

``pqd plan`` must rank thousands of channel-width candidates against a latency budget
without exporting each one. This package measures instead of counting:

1. **Layers and groups.** Every conv/linear of the network is tied to the channel groups
   of :func:`pqd.prune.channels.channel_groups` that set its output and input widths. A
   candidate is ``{group root: removed fraction}`` (the ``ratios`` of a ``prune_channels``
   stage); each group keeps ``round_keep((1 - r) * C)`` channels, rounded to ``round_to``
   as the stage rounds them, so a candidate's per-layer widths are known without surgery.
2. **Lookup tables.** Layers with the same kind, kernel, stride, padding, dilation, depthwise
   flag and input size form a *family*; for each family the table holds the measured batch-1
   p50 of a one-layer ONNX piece (conv -> BN -> ReLU, or linear) at a grid of input x output
   widths (the ``levels`` keep fractions of the full widths, rounded like the stage). Pieces
   are exported as they ship: INT8 through the PT2E QAT prepare + calibrate + QDQ export path
   (:func:`pqd.quant.prepare.prepare_qat`, :func:`pqd.onnx_export.export_onnx`), or FP32; they are
   timed on the chosen runtime and thread count, interleaved (:func:`compare_latency`).
   Between grid points a layer's time is bilinear in its widths, on a table made monotone
   (running maximum along both width axes), so the prediction never falls when a width grows.
3. **Whole-network overhead.** Pieces timed alone each pay a call and a quantize/dequantize
   at their ends that the whole network does not, and miss what lies between layers (adds,
   pools). Whole networks at uniform widths (every level, dense included) and a few of
   random mixed widths (``MIXED``, their own seed) are exported and timed;
   ``predict = overhead_ms + scale * sum(pieces)`` is fitted to them (least squares,
   ``scale >= 0``).
4. **Cache.** Pieces depend on shapes only, so one JSON file per machine fingerprint
   (CPU model and the SIMD flags that decide INT8 speed, runtime and its version, threads,
   precision, opset) holds every piece ever measured there, and the fit per architecture
   (``$PQD_CACHE_DIR/latency``, default ``~/.cache/pqd/latency``).

:meth:`LatencyModel.validate` exports random candidates whole and reports the model's
error against their measured p50 (median and worst, relative) and the share predicted
within +-10%, the unit nn-Meter and LitePred report.

    lm = LatencyModel(build_model("resnet18", 10, mean, std), torch.rand(2, 3, 32, 32))
    lm.build()
    lm.predict({"net.features.1.conv1": 0.5})    # ms, batch 1, p50
    lm.validate(n=20)                            # {"median_error", "within_10", ...}

Modules: :mod:`~pqd.latency_model.layers` (layers, groups and kept widths, step 1),
:mod:`~pqd.latency_model.measure` (fingerprint, pieces exported and timed),
:mod:`~pqd.latency_model.tables` (monotone tables, interpolation, the overhead fit) and
:mod:`~pqd.latency_model.model` (:class:`LatencyModel`: build, cache, predict, validate).
"""

from pqd.latency_model.layers import Layer, kept_channels, network_layers
from pqd.latency_model.measure import default_cache_dir, export_as_shipped, fingerprint
from pqd.latency_model.model import LEVELS, LatencyModel, Ratios, validation_text
from pqd.latency_model.tables import bilinear, fit_overhead, monotone

__all__ = [
    "LEVELS",
    "LatencyModel",
    "Layer",
    "Ratios",
    "bilinear",
    "default_cache_dir",
    "export_as_shipped",
    "fingerprint",
    "fit_overhead",
    "kept_channels",
    "monotone",
    "network_layers",
    "validation_text",
]
