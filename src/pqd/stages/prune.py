"""Unstructured magnitude pruning: global or layer-wise, one-shot or gradual.

Prunable parameters are the conv and linear weights (every parameter with
ndim >= 2), matched by name, so the same code prunes an eager model and a
QAT graph. Masks are boolean keep-masks keyed by parameter name; once a weight
is pruned it stays pruned (new masks are ANDed with earlier ones), and
``Context.fit`` re-applies them after every optimizer step of every later stage.

Gradual pruning follows Zhu & Gupta (2017): sparsity rises as
``s_t = s_f * (1 - (1 - t / T)^3)`` over the first 75% of the stage's steps,
updated at ``GRADUAL_UPDATES`` evenly spaced steps, then the rest fine-tunes.
"""

from __future__ import annotations

import fnmatch

import torch
import torch.nn as nn

from pqd.errors import RecipeError
from pqd.recipe import PruneSpec
from pqd.registry import register_stage
from pqd.stages.base import Context, MaskKeeper, State

GRADUAL_UPDATES = 16
GRADUAL_END = 0.75  # fraction of the stage's steps over which sparsity rises


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


def magnitude_masks(
    weights: dict[str, torch.Tensor], sparsity: float, scope: str = "global"
) -> dict[str, torch.Tensor]:
    """Keep-masks zeroing the ``sparsity`` fraction of smallest-magnitude weights.

    ``global`` ranks all weights together; ``layer`` prunes each tensor to the
    same fraction. Exactly ``round(sparsity * n)`` weights are pruned (ties are
    broken by position), so the achieved sparsity is exact.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if scope == "layer":
        return {name: _keep_largest(w.detach().abs().flatten(), sparsity).view_as(w)
                for name, w in weights.items()}
    if scope != "global":
        raise ValueError(f"unknown scope {scope!r}")
    names = list(weights)
    flat = torch.cat([weights[n].detach().abs().flatten().float().cpu() for n in names])
    keep = _keep_largest(flat, sparsity)
    masks, offset = {}, 0
    for n in names:
        size = weights[n].numel()
        masks[n] = keep[offset : offset + size].view(weights[n].shape).to(weights[n].device)
        offset += size
    return masks


def _keep_largest(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    k = round(sparsity * scores.numel())
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        idx = torch.topk(scores.float(), k, largest=False, sorted=False).indices
        keep[idx] = False
    return keep


def cubic_sparsity(step: int, total: int, final: float, initial: float = 0.0) -> float:
    """Zhu & Gupta's cubic schedule: sparsity at ``step`` of a ramp of ``total`` steps."""
    if total <= 0 or step >= total:
        return final
    return final + (initial - final) * (1.0 - step / total) ** 3


def sparsity_of(masks: dict[str, torch.Tensor]) -> float:
    """Fraction of masked-out entries over all masks (0 when there are none)."""
    total = sum(m.numel() for m in masks.values())
    return 0.0 if total == 0 else sum(int((~m).sum()) for m in masks.values()) / total


@register_stage("prune")
def apply_prune(state: State, spec: PruneSpec, ctx: Context) -> State:
    """Prune ``state.model`` to ``spec.sparsity`` and fine-tune with masks held at zero."""
    params = prunable_parameters(state.model, spec.exclude)
    if not params:
        raise RecipeError(
            "prune: no prunable (conv/linear) weights left after 'exclude'",
            "loosen the exclude patterns",
        )
    previous = {n: state.masks[n] for n in params if n in state.masks}

    def update(sparsity: float) -> None:
        new = magnitude_masks(params, sparsity, spec.scope)
        for n, m in previous.items():
            new[n] = new[n] & m.to(new[n].device)
        state.masks.update(new)
        MaskKeeper(state.model, new)(state.model)  # zero the newly pruned weights now

    cfg = ctx.stage_train()
    if spec.schedule == "oneshot" or spec.epochs == 0:
        update(spec.sparsity)
        on_step = None
    else:
        update(0.0)  # register the masks so that ctx.fit keeps them
        last = {"s": -1.0}

        def on_step(step: int, total: int) -> None:
            ramp = max(1, int(total * GRADUAL_END))
            every = max(1, ramp // GRADUAL_UPDATES)
            if step % every == 0 or step == ramp:
                s = cubic_sparsity(min(step + every, ramp), ramp, spec.sparsity)
                if s != last["s"]:
                    update(s)
                    last["s"] = s

    ctx.fit(state, cfg, spec.epochs, seed=ctx.stage_seed, on_step=on_step, desc=ctx.stage_desc)
    if spec.schedule == "gradual" and spec.epochs > 0:
        update(spec.sparsity)  # the ramp ends at the target; make it exact
    state.info["mask_sparsity"] = sparsity_of({n: state.masks[n] for n in params})
    return state
