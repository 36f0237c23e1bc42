"""Mask pruning: unstructured or N:M, any importance criterion, four schedules.

Prunable parameters are the conv and linear weights (every parameter with
ndim >= 2), matched by name, so the same code prunes an eager model and a
QAT graph. Masks are boolean keep-masks keyed by parameter name; once a weight
is pruned it stays pruned (new masks are ANDed with earlier ones and earlier
zeros are ranked first), and ``Context.fit`` re-applies them after every
optimizer step of every later stage.

Scores come from :mod:`pqd.prune.importance` (``criterion``); masks only read them.

Structures:

- ``unstructured``: the ``sparsity`` fraction of lowest-scored weights, ranked
  over all layers (``scope: global``) or within each layer (``scope: layer``).
- ``nm``: N:M sparsity: in every group of ``m`` consecutive INPUT channels, the
  ``n`` best-scored weights stay and ``m - n`` are zero. Axis: dimension 1 of the
  weight, i.e. for a linear ``W[out, in]`` groups ``W[o, k*m:(k+1)*m]``, for a conv
  ``W[out, in, kh, kw]`` groups ``W[o, k*m:(k+1)*m, y, x]`` at every (o, y, x).
  The exported ONNX weights have the same layout, and
  :func:`pqd.measurement.sparsity.nm_report` checks the pattern there. Layers whose
  input width (per group) is not a multiple of ``m`` are excluded and reported
  (the RGB stem: 3 channels; depthwise convs: 1).

Schedules:

- ``oneshot``: prune to the target, fine-tune ``epochs``.
- ``gradual``: Zhu & Gupta (2017): sparsity rises as ``s_t = s_f * (1 - (1 - t / T)^3)``
  over the first 75% of the stage's steps, updated at ``GRADUAL_UPDATES`` evenly
  spaced steps (re-scored each time), then the rest fine-tunes.
- ``iterative``: ``cycles`` rounds; round i prunes to ``s_i = 1 - (1 - s)^(i / k)``
  and retrains ``epochs / k`` (Han et al. 2015).
- ``rewind`` (lottery tickets, Frankle & Carbin 2019; late rewinding, Frankle et al.
  2019) with ``oneshot`` or ``iterative``: a first training pass (``epochs``, or
  ``epochs / cycles``) runs before any pruning and the rewind point is saved: the
  weights at the stage start (``rewind: stage_start``) or after ``rewind_epoch``
  epochs of that pass (``rewind: epoch``). Each prune step then resets every
  parameter and BatchNorm statistic to the rewind point, zeroes the pruned weights,
  and retrains (``epochs``, or ``epochs / cycles`` per round). Rewinding to an epoch of
  the BASELINE's training is not offered: the baseline loop keeps no early checkpoint.

For N:M the schedules prune ``round(s_t * m)`` weights per group at sparsity ``s_t``
and end at exactly ``m - n``.

Movement scores accumulate over the stage's training (every optimizer step) when a
schedule trains before pruning (gradual, iterative, rewind); for one-shot pruning they
come from ``score_batches`` gradient steps (see :mod:`pqd.prune.importance`).
"""

from __future__ import annotations

import fnmatch

import torch
import torch.nn as nn

from pqd.state import MaskKeeper

GRADUAL_UPDATES = 16
GRADUAL_END = 0.75  # fraction of the stage's steps over which sparsity rises
KD_SCORE_TEMPERATURE = 4.0  # criterion_loss: kd uses the distill stage's default loss
KD_SCORE_ALPHA = 0.9


def prunable_parameters(
    model: nn.Module, exclude: list[str] | None = None
) -> dict[str, nn.Parameter]:
    """Conv/linear weights (``*.weight`` with ndim >= 2) by name, minus names matching
    ``exclude`` patterns. Other parameters of rank >= 2 (a ViT's class token and position
    embedding) are not weights of a layer and are never pruned."""
    exclude = exclude or []
    return {
        name: p
        for name, p in model.named_parameters()
        if p.ndim >= 2
        and name.rsplit(".", 1)[-1] == "weight"
        and not any(fnmatch.fnmatchcase(name, pat) for pat in exclude)
    }


# ---------------------------------------------------------------------------- masks


def masks_from_scores(
    scores: dict[str, torch.Tensor], sparsity: float, scope: str = "global"
) -> dict[str, torch.Tensor]:
    """Keep-masks zeroing the ``sparsity`` fraction of LOWEST-scored entries.

    ``global`` ranks all tensors together; ``layer`` prunes each tensor to the same
    fraction. Exactly ``round(sparsity * n)`` entries are pruned (ties broken by
    position), so the achieved sparsity is exact.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if scope == "layer":
        return {
            name: _keep_largest(s.detach().flatten(), sparsity).view_as(s)
            for name, s in scores.items()
        }
    if scope != "global":
        raise ValueError(f"unknown scope {scope!r}")
    names = list(scores)
    flat = torch.cat([scores[n].detach().flatten().float().cpu() for n in names])
    keep = _keep_largest(flat, sparsity)
    masks, offset = {}, 0
    for n in names:
        size = scores[n].numel()
        masks[n] = keep[offset : offset + size].view(scores[n].shape).to(scores[n].device)
        offset += size
    return masks


def magnitude_masks(
    weights: dict[str, torch.Tensor], sparsity: float, scope: str = "global"
) -> dict[str, torch.Tensor]:
    """Keep-masks zeroing the ``sparsity`` fraction of smallest-magnitude weights."""
    return masks_from_scores({n: w.detach().abs() for n, w in weights.items()}, sparsity, scope)


def _keep_largest(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    k = round(sparsity * scores.numel())
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        idx = torch.topk(scores.float(), k, largest=False, sorted=False).indices
        keep[idx] = False
    return keep


def nm_eligible(weight: torch.Tensor, m: int) -> bool:
    """True when ``weight`` (linear [out, in] or conv [out, in, kh, kw]) has an input
    width that is a positive multiple of ``m``."""
    return weight.ndim in (2, 4) and weight.shape[1] >= m and weight.shape[1] % m == 0


def nm_masks(
    scores: dict[str, torch.Tensor], n: int, m: int, zeros: int | None = None
) -> dict[str, torch.Tensor]:
    """N:M keep-masks: in every group of ``m`` consecutive entries along dimension 1 (the
    input channels), the ``m - zeros`` best-scored stay (``zeros`` defaults to ``m - n``).

    Every tensor must satisfy :func:`nm_eligible`. Ties keep the lower index.
    """
    zeros = m - n if zeros is None else zeros
    if not 0 <= zeros < m:
        raise ValueError(f"zeros per group must be in [0, {m}), got {zeros}")
    masks = {}
    for name, s in scores.items():
        if not nm_eligible(s, m):
            raise ValueError(f"{name}: input width {tuple(s.shape)[1:2]} is not a multiple of {m}")
        moved = s.detach().float().movedim(1, -1)  # [..., in]
        groups = moved.reshape(*moved.shape[:-1], -1, m)
        # stable ranking: ties keep the lower index
        order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(-1, order[..., : m - zeros], True)
        masks[name] = keep.reshape(moved.shape).movedim(-1, 1).contiguous()
    return masks


def cubic_sparsity(step: int, total: int, final: float, initial: float = 0.0) -> float:
    """Zhu & Gupta's cubic schedule: sparsity at ``step`` of a ramp of ``total`` steps."""
    if total <= 0 or step >= total:
        return final
    return final + (initial - final) * (1.0 - step / total) ** 3


def iterative_sparsities(final: float, cycles: int) -> list[float]:
    """Sparsity after each round of iterative pruning: ``1 - (1 - final)^(i / cycles)``."""
    return [1.0 - (1.0 - final) ** (i / cycles) for i in range(1, cycles + 1)]


def sparsity_of(masks: dict[str, torch.Tensor]) -> float:
    """Fraction of masked-out entries over all masks (0 when there are none)."""
    total = sum(m.numel() for m in masks.values())
    return 0.0 if total == 0 else sum(int((~m).sum()) for m in masks.values()) / total


# ---------------------------------------------------------------------------- scoring data


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every parameter and BatchNorm running statistic (the rewind point)."""
    keep = {n for n, _ in model.named_parameters()}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            keep |= {f"{mod_name}.{b}" if mod_name else b for b, _ in mod.named_buffers()}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in keep}


@torch.no_grad()
def rewind_to(
    model: nn.Module, point: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]
) -> None:
    """Reset ``model`` to the rewind ``point``, then zero the masked-out weights."""
    own = model.state_dict()
    for k, v in point.items():
        own[k].copy_(v)
    MaskKeeper(model, masks)(model)


# ---------------------------------------------------------------------------- the stage


def split_epochs(epochs: int, parts: int) -> list[int]:
    """``epochs`` split into ``parts`` near-equal integer shares (earlier ones larger)."""
    return [epochs // parts + (1 if i < epochs % parts else 0) for i in range(parts)]
