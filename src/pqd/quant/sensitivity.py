"""Per-layer quantization sensitivity, and mixed precision chosen from it.

On a prepared and calibrated PT2E graph, quantizing one layer alone means switching on
only that layer's fake-quantizers (its weight's and its input activation's) with every
other one off; the layer's sensitivity is the validation-split top-1 drop (points) from
the float model. One graph serves every layer (flags, no re-export), so the analysis
costs one val evaluation per layer.

Mixed precision ranks layers by that drop and keeps the most sensitive ones float, one
more at a time, measuring the val accuracy of the whole quantized model each time, until
its drop is within the budget (``mixed_precision.max_drop_points``). The choice is made
before any QAT fine-tuning, so after QAT the drop is usually smaller than budgeted.
A float layer loses its weight quantizer and, where it is the only consumer, its input
quantizer; in onnxruntime such a layer runs as a float Conv/Gemm.

    pqd sensitivity recipes/quickstart.yaml --out runs/sens     # table + sensitivity.json
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from pqd.quant.layers import fake_quantizers, float_layer_quantizers, quantized_layers
from pqd.recipe import MixedPrecisionSpec
from pqd.train import evaluate


class _Switch:
    """Turns fake-quantizers on by name (all others off); restores the flags at exit."""

    def __init__(self, model: nn.Module, loader: Any, device: torch.device) -> None:
        self.model, self.loader, self.device = model, loader, device
        self.fqs = dict(fake_quantizers(model))

    def __enter__(self) -> _Switch:
        self.saved = {n: m.fake_quant_enabled.clone() for n, m in self.fqs.items()}
        return self

    def __exit__(self, *exc: Any) -> None:
        for n, m in self.fqs.items():
            m.fake_quant_enabled.copy_(self.saved[n])

    def accuracy(self, enabled: set[str]) -> float:
        """Val top-1 (fraction) with exactly the fake-quantizers in ``enabled`` on."""
        for n, m in self.fqs.items():
            m.fake_quant_enabled[0] = int(n in enabled)
        return evaluate(self.model, self.loader, device=self.device, progress=False)


def layer_sensitivity(model: nn.Module, loader: Any, device: torch.device) -> dict[str, Any]:
    """Accuracy drop (points) of quantizing each conv/linear layer alone, on ``loader``.

    Returns ``float_accuracy`` and ``quantized_accuracy`` (fractions), ``layers`` (graph
    order: ``layer``, ``op``, ``accuracy``, ``drop_points``) and ``ranking`` (layer names,
    most sensitive first; ties keep graph order).
    """
    layers = quantized_layers(model)
    with _Switch(model, loader, device) as sw:
        float_acc = sw.accuracy(set())
        full_acc = sw.accuracy(set(sw.fqs))
        rows = []
        for name, lq in layers.items():
            own = {fq for fq in [lq.weight_fq, *lq.input_fqs] if fq}
            acc = sw.accuracy(own)
            rows.append(
                {
                    "layer": name,
                    "op": lq.op,
                    "accuracy": acc,
                    "drop_points": round(100.0 * (float_acc - acc), 3),
                }
            )
    ranking = [r["layer"] for r in sorted(rows, key=lambda r: -r["drop_points"])]
    return {
        "float_accuracy": float_acc,
        "quantized_accuracy": full_acc,
        "layers": rows,
        "ranking": ranking,
    }


def choose_mixed_precision(
    model: nn.Module, loader: Any, device: torch.device, spec: MixedPrecisionSpec
) -> dict[str, Any]:
    """Layers to keep float: the most sensitive first, until the val drop <= budget.

    Returns ``sensitivity`` (see :func:`layer_sensitivity`), ``float_layers`` (the chosen
    names) and ``mixed_precision`` (budget, whether it was met, and the measured val
    accuracy for each number of float layers tried).
    """
    sens = layer_sensitivity(model, loader, device)
    ranked = sens["ranking"]
    limit = (
        len(ranked) if spec.max_float_layers is None else min(spec.max_float_layers, len(ranked))
    )
    float_acc = sens["float_accuracy"]
    trace = [
        {
            "float_layers": 0,
            "val_accuracy": sens["quantized_accuracy"],
            "drop_points": round(100.0 * (float_acc - sens["quantized_accuracy"]), 3),
        }
    ]
    k = 0
    with _Switch(model, loader, device) as sw:
        while trace[-1]["drop_points"] > spec.max_drop_points and k < limit:
            k += 1
            acc = sw.accuracy(set(sw.fqs) - float_layer_quantizers(model, ranked[:k]))
            trace.append(
                {
                    "float_layers": k,
                    "val_accuracy": acc,
                    "drop_points": round(100.0 * (float_acc - acc), 3),
                }
            )
    return {
        "sensitivity": sens,
        "float_layers": ranked[:k],
        "mixed_precision": {
            "max_drop_points": spec.max_drop_points,
            "max_float_layers": spec.max_float_layers,
            "met_budget": trace[-1]["drop_points"] <= spec.max_drop_points,
            "val_drop_points": trace[-1]["drop_points"],
            "trace": trace,
        },
    }


def format_table(result: dict[str, Any]) -> str:
    """The sensitivity table as text, most sensitive layer first."""
    rows = sorted(result["layers"], key=lambda r: result["ranking"].index(r["layer"]))
    width = max([5, *(len(r["layer"]) for r in rows)])
    lines = [
        f"{'rank':>4}  {'layer':<{width}}  {'op':<6}  {'val top-1':>9}  {'drop (points)':>13}",
        f"{'-' * 4}  {'-' * width}  {'-' * 6}  {'-' * 9}  {'-' * 13}",
    ]
    for i, r in enumerate(rows, 1):
        lines.append(
            f"{i:>4}  {r['layer']:<{width}}  {r['op']:<6}  "
            f"{100 * r['accuracy']:>8.2f}%  {r['drop_points']:>13.2f}"
        )
    lines.append(
        f"\nfloat model {100 * result['float_accuracy']:.2f}%, every layer quantized "
        f"{100 * result['quantized_accuracy']:.2f}% (val split, "
        f"{result.get('val_images', '?')} images, before any QAT)"
    )
    return "\n".join(lines)
