"""Mask pruning: unstructured or N:M, any importance criterion, four schedules.

Prunable parameters are the conv and linear weights (every parameter with
ndim >= 2), matched by name, so the same code prunes an eager model and a
QAT graph. Masks are boolean keep-masks keyed by parameter name; once a weight
is pruned it stays pruned (new masks are ANDed with earlier ones and earlier
zeros are ranked first), and ``Context.fit`` re-applies them after every
optimizer step of every later stage.

Scores come from :mod:`pqd.importance` (``criterion``); masks only read them.

Structures:

- ``unstructured``: the ``sparsity`` fraction of lowest-scored weights, ranked
  over all layers (``scope: global``) or within each layer (``scope: layer``).
- ``nm``: N:M sparsity: in every group of ``m`` consecutive INPUT channels, the
  ``n`` best-scored weights stay and ``m - n`` are zero. Axis: dimension 1 of the
  weight, i.e. for a linear ``W[out, in]`` groups ``W[o, k*m:(k+1)*m]``, for a conv
  ``W[out, in, kh, kw]`` groups ``W[o, k*m:(k+1)*m, y, x]`` at every (o, y, x).
  The exported ONNX weights have the same layout, and
  :func:`pqd.measure.sparsity.nm_report` checks the pattern there. Layers whose
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
come from ``score_batches`` gradient steps (see :mod:`pqd.importance`).
"""

from __future__ import annotations

import fnmatch
from typing import Any

import torch
import torch.nn as nn

from pqd import importance
from pqd.errors import RecipeError
from pqd.recipe import PruneSpec
from pqd.registry import register_stage
from pqd.stages.base import Context, MaskKeeper, State
from pqd.train import is_graph, kd_loss

GRADUAL_UPDATES = 16
GRADUAL_END = 0.75  # fraction of the stage's steps over which sparsity rises
KD_SCORE_TEMPERATURE = 4.0  # criterion_loss: kd uses the distill stage's default loss
KD_SCORE_ALPHA = 0.9


def prunable_parameters(
    model: nn.Module, exclude: list[str] | None = None
) -> dict[str, nn.Parameter]:
    """Conv/linear weights (ndim >= 2) by name, minus names matching ``exclude`` patterns."""
    exclude = exclude or []
    return {
        name: p
        for name, p in model.named_parameters()
        if p.ndim >= 2 and not any(fnmatch.fnmatchcase(name, pat) for pat in exclude)
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
        return {name: _keep_largest(s.detach().flatten(), sparsity).view_as(s)
                for name, s in scores.items()}
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


def nm_masks(scores: dict[str, torch.Tensor], n: int, m: int,
             zeros: int | None = None) -> dict[str, torch.Tensor]:
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
            raise ValueError(f"{name}: input width {tuple(s.shape)[1:2]} is not a multiple "
                             f"of {m}")
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


def score_batches(ctx: Context, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` training batches (no augmentation, stage-seeded shuffle) for scoring."""
    batch = min(ctx.train.batch_size, 128)
    loader = ctx.loader("train", batch, seed=ctx.seed, shuffle=True)
    out = []
    for x, y in loader:
        out.append((x, y))
        if len(out) >= count:
            break
    return out


def scoring_loss(kind: str, ctx: Context) -> importance.LossFn:
    """Cross-entropy, or the distill stage's KD loss against ``ctx.teacher`` (``kd``).

    While the student still equals the teacher the KD term has zero gradient and the
    scores come from its cross-entropy share (``1 - KD_SCORE_ALPHA``).
    """
    if kind == "ce":
        return importance.cross_entropy
    return kd_loss(ctx.teacher, KD_SCORE_TEMPERATURE, KD_SCORE_ALPHA, 0.0, device=ctx.device,
                   amp="off")


def reinitialize(state: State, ctx: Context) -> None:
    """Give ``state.model`` fresh initial weights (same architecture; stage-seeded)."""
    from pqd.stages.prune_channels import rebuild_model

    if is_graph(state.model):
        raise RecipeError("prune: at_init needs an unquantized model",
                          "put the prune stage before quantize")
    torch.manual_seed(ctx.seed)
    example = ctx.example_input().cpu()  # (drawn before the fresh weights, as always)
    fresh = rebuild_model(ctx.new_model(), state.structure, example)
    state.model.load_state_dict(fresh.state_dict())


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every parameter and BatchNorm running statistic (the rewind point)."""
    keep = {n for n, _ in model.named_parameters()}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            keep |= {f"{mod_name}.{b}" if mod_name else b for b, _ in mod.named_buffers()}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in keep}


@torch.no_grad()
def rewind_to(model: nn.Module, point: dict[str, torch.Tensor],
              masks: dict[str, torch.Tensor]) -> None:
    """Reset ``model`` to the rewind ``point``, then zero the masked-out weights."""
    own = model.state_dict()
    for k, v in point.items():
        own[k].copy_(v)
    MaskKeeper(model, masks)(model)


# ---------------------------------------------------------------------------- the stage


@register_stage("prune")
def apply_prune(state: State, spec: PruneSpec, ctx: Context) -> State:
    """Prune ``state.model`` to ``spec``'s target and fine-tune with masks held at zero."""
    params = prunable_parameters(state.model, spec.exclude)
    info: dict[str, Any] = {"criterion": spec.criterion, "schedule": spec.schedule,
                            "structure": spec.structure}
    if spec.structure == "nm":
        excluded = [n for n, p in params.items() if not nm_eligible(p, spec.m)]
        params = {n: p for n, p in params.items() if n not in excluded}
        info["nm"] = f"{spec.n}:{spec.m}"
        info["nm_excluded"] = excluded
    if not params:
        raise RecipeError(
            "prune: no prunable (conv/linear) weights left after 'exclude'"
            + (f" and the N:M width rule (input width multiple of {spec.m})"
               if spec.structure == "nm" else ""),
            "loosen the exclude patterns",
        )
    if spec.at_init:
        reinitialize(state, ctx)
        params = {n: p for n, p in state.model.named_parameters() if n in params}
    cfg = ctx.train
    batches = score_batches(ctx, spec.score_batches) if spec.criterion != "magnitude" else []
    loss = scoring_loss(spec.criterion_loss, ctx)
    tracker = (importance.MovementTracker(state.model, params)
               if spec.criterion == "movement" else None)

    def scores_now() -> dict[str, torch.Tensor]:
        if tracker is not None and tracker.steps > 0:
            return {n: s.clone() for n, s in tracker.scores.items()}
        return importance.score(spec.criterion, state.model, batches, loss, list(params))

    def update(sparsity: float) -> None:
        if sparsity <= 0.0:
            scores = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        else:
            scores = scores_now()
        # once pruned, always pruned: earlier zeros (of earlier stages and of earlier
        # rounds of this one) rank below everything, whatever the criterion says
        previous = {n: state.masks[n] for n in params if n in state.masks}
        for n, m in previous.items():
            scores[n] = scores[n].masked_fill(~m.to(scores[n].device), float("-inf"))
        if spec.structure == "nm":
            new = nm_masks(scores, spec.n, spec.m, zeros=min(round(sparsity * spec.m),
                                                             spec.m - spec.n))
        else:
            new = masks_from_scores(scores, sparsity, spec.scope)
        for n, m in previous.items():
            new[n] = new[n] & m.to(new[n].device)
        state.masks.update(new)
        MaskKeeper(state.model, new)(state.model)  # zero the newly pruned weights now

    target = spec.target_sparsity
    seed = ctx.seed

    def fit(epochs: int, on_step=None, round_index: int = 0, hook_state=None) -> None:
        ctx.fit(state, cfg, epochs, seed=seed + round_index, on_step=on_step,
                after_step=tracker, desc=ctx.desc, hook_state=hook_state)

    if spec.rewind != "none":
        _prune_with_rewind(state, spec, ctx, update, fit, info)
    elif spec.schedule == "iterative":
        sequence = iterative_sparsities(target, spec.cycles)
        epochs = split_epochs(spec.epochs, spec.cycles)
        for i, (s, e) in enumerate(zip(sequence, epochs, strict=True)):
            update(s)
            fit(e, round_index=i)
        info["sparsity_sequence"] = [round(s, 6) for s in sequence]
    elif spec.schedule == "oneshot" or spec.epochs == 0:
        update(target)
        fit(spec.epochs)
    else:  # gradual
        update(0.0)  # register the masks so that ctx.fit keeps them
        last = {"s": -1.0}  # checkpointed with each epoch (hook_state) for resume

        def on_step(step: int, total: int) -> None:
            ramp = max(1, int(total * GRADUAL_END))
            every = max(1, ramp // GRADUAL_UPDATES)
            if step % every == 0 or step == ramp:
                s = cubic_sparsity(min(step + every, ramp), ramp, target)
                if s != last["s"]:
                    update(s)
                    last["s"] = s

        fit(spec.epochs, on_step=on_step, hook_state=last)
        update(target)  # the ramp ends at the target; make it exact
    pruned = {n: state.masks[n] for n in params}
    info["mask_sparsity"] = sparsity_of(pruned)
    if spec.structure == "nm":
        for n in params:
            state.nm_layers[n] = [spec.n, spec.m]
        info["nm_layers"] = len(params)
    state.info.update(info)
    return state


def split_epochs(epochs: int, parts: int) -> list[int]:
    """``epochs`` split into ``parts`` near-equal integer shares (earlier ones larger)."""
    return [epochs // parts + (1 if i < epochs % parts else 0) for i in range(parts)]


def _prune_with_rewind(state: State, spec: PruneSpec, ctx: Context, update, fit,
                       info: dict[str, Any]) -> None:
    """Train, prune, rewind survivors, retrain (once, or per iterative round)."""
    target = spec.target_sparsity
    if spec.schedule == "iterative":
        sequence = iterative_sparsities(target, spec.cycles)
        epochs = split_epochs(spec.epochs, spec.cycles)
    else:
        sequence, epochs = [target], [spec.epochs]
    point: dict[str, dict[str, torch.Tensor]] = {}
    if spec.rewind == "stage_start":
        point["w"] = snapshot(state.model)
    first = epochs[0]
    at = spec.rewind_epoch

    def capture(step: int, total: int) -> None:
        if spec.rewind == "epoch" and "w" not in point and step == at * (total // first):
            point["w"] = snapshot(state.model)

    fit(first, on_step=capture)
    if "w" not in point:  # rewind_epoch == the whole first pass
        point["w"] = snapshot(state.model)
    for i, (s, e) in enumerate(zip(sequence, epochs, strict=True)):
        update(s)
        rewind_to(state.model, point["w"], state.masks)
        fit(e, round_index=i + 1)
    info["rewind"] = (spec.rewind if spec.rewind == "stage_start"
                      else f"epoch {spec.rewind_epoch}")
    info["sparsity_sequence"] = [round(s, 6) for s in sequence]
