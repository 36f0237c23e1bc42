"""Cheap accuracy estimates: adaptive-BN validation of a pruned baseline (EagleEye) and
per-group sensitivity curves summed over groups."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np

from pqd.latency_model.model import LatencyModel, Ratios


def adaptive_bn_eval(
    model: Any,
    example: Any,
    ratios: Ratios,
    spec: Any,
    calib_x: Any,
    val_x: Any,
    val_y: Any,
    batch_size: int = 128,
) -> tuple[float, float]:
    """Accuracy estimate of a candidate without training (EagleEye's adaptive BN, Li et al.
    2020): the trained baseline pruned by surgery to ``ratios`` (magnitude scores, the
    stage's rounding), its BatchNorm statistics re-estimated on ``calib_x``, then its top-1
    on ``val_x``. Pruning shifts every later layer's input statistics; with the stale ones
    the pruned nets all look equally broken, with fresh ones their order follows the
    fine-tuned accuracy far better than weight norms do.

    Args:
        model: the trained baseline (eager, left unchanged).
        example: an input batch for the dependency graph.
        ratios: removed fraction per group root (absent: 0).
        spec: the template's ``PruneChannelsSpec`` (exclude, round_to, scope, heads).
        calib_x, val_x: uint8 images ``[N, 3, H, W]``; val_y: labels ``[N]``.
        batch_size: images per forward pass.

    Returns:
        ``(validation top-1 as a fraction 0-1, mean validation cross-entropy in nats)``; the
        loss moves smoothly where the top-1 of a few hundred images is noise.
    """
    import torch

    from pqd.prune import importance
    from pqd.prune.channels import apply_structure, plan_records, weight_names

    m = copy.deepcopy(model).cpu().eval()
    keep = {g: 1.0 - float(r) for g, r in ratios.items() if r > 0}
    if keep:
        scores = importance.score("magnitude", m, None, names=weight_names(m))
        apply_structure(m, example, plan_records(m, example, scores, keep, spec))
    bns = [x for x in m.modules() if isinstance(x, torch.nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        if bns and len(calib_x):
            for bn in bns:
                bn.reset_running_stats()
                bn.momentum = None  # cumulative average over the calibration images
                bn.train()
            for i in range(0, len(calib_x), batch_size):
                m(calib_x[i : i + batch_size].float() / 255)
            for bn in bns:
                bn.eval()
        right, loss = 0, 0.0
        for i in range(0, len(val_x), batch_size):
            logits = m(val_x[i : i + batch_size].float() / 255)
            y = val_y[i : i + batch_size]
            right += int((logits.argmax(1) == y).sum())
            loss += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
    n = max(1, len(val_x))
    return right / n, loss / n


def sensitivity_curves(
    lm: LatencyModel,
    evaluate: Callable[[Ratios], float],
    levels: list[float],
    say: Callable[[str], None] = lambda _m: None,
) -> dict[str, Any]:
    """Per-group pruning sensitivity: ``evaluate`` (e.g. the adaptive-BN validation loss) of
    the baseline with one group at a time pruned to each keep level, the others dense.

    Args:
        lm: the latency model (its ``groups``).
        evaluate: candidate ratios -> loss (lower is better).
        levels: keep fractions to evaluate (those below 1.0 are used).
        say: progress lines.

    Returns:
        ``{"dense": loss, "levels": [...ascending keeps, 1.0], "groups": {root: [loss per
        level]}}``.
    """
    keeps = [*sorted({round(v, 6) for v in levels if v < 1.0}), 1.0]
    dense = evaluate({})
    out: dict[str, Any] = {"dense": round(dense, 6), "levels": keeps, "groups": {}}
    for i, root in enumerate(lm.groups):
        losses = [evaluate({root: round(1.0 - v, 6)}) for v in keeps[:-1]]
        out["groups"][root] = [round(x, 6) for x in [*losses, dense]]
        say(f"sensitivity {i + 1}/{len(lm.groups)}: {root}")
    return out


def sensitivity_loss(curves: dict[str, Any], ratios: Ratios) -> float:
    """Cheap accuracy estimate (lower is better): the baseline's validation loss plus the sum
    of each group's own loss increase at its keep fraction (linear between measured levels;
    additive across groups, as layer-wise sensitivity analysis assumes)."""
    keeps = curves["levels"]
    total = float(curves["dense"])
    for root, losses in curves["groups"].items():
        keep = 1.0 - float(ratios.get(root, 0.0))
        total += max(0.0, float(np.interp(keep, keeps, losses)) - float(curves["dense"]))
    return total
