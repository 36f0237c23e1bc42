"""The prune stage: masks (unstructured, N:M) by a criterion, on a schedule
(the machinery: :mod:`pqd.prune.masks`, :mod:`pqd.prune.importance`)."""

from __future__ import annotations

from typing import Any

import torch

from pqd.context import Context, score_batches, scoring_loss
from pqd.errors import RecipeError
from pqd.prune import importance
from pqd.prune.masks import (
    GRADUAL_END,
    GRADUAL_UPDATES,
    cubic_sparsity,
    iterative_sparsities,
    masks_from_scores,
    nm_eligible,
    nm_masks,
    prunable_parameters,
    rewind_to,
    snapshot,
    sparsity_of,
    split_epochs,
)
from pqd.recipe import PruneSpec
from pqd.registry import register_stage
from pqd.state import MaskKeeper, State
from pqd.train import is_graph


def reinitialize(state: State, ctx: Context) -> None:
    """Give ``state.model`` fresh initial weights (same architecture; stage-seeded)."""
    from pqd.prune.channels import rebuild_model

    if is_graph(state.model):
        raise RecipeError(
            "prune: at_init needs an unquantized model", "put the prune stage before quantize"
        )
    torch.manual_seed(ctx.seed)
    example = ctx.example_input().cpu()  # (drawn before the fresh weights, as always)
    fresh = rebuild_model(ctx.new_model(), state.structure, example)
    state.model.load_state_dict(fresh.state_dict())


@register_stage("prune")
def apply_prune(state: State, spec: PruneSpec, ctx: Context) -> State:
    """Prune ``state.model`` to ``spec``'s target and fine-tune with masks held at zero."""
    info: dict[str, Any] = {
        "criterion": spec.criterion,
        "schedule": spec.schedule,
        "structure": spec.structure,
    }
    params = _prunable(state, spec, info)
    if spec.at_init:
        reinitialize(state, ctx)
        params = {n: p for n, p in state.model.named_parameters() if n in params}
    cfg = ctx.train
    batches = score_batches(ctx, spec.score_batches) if spec.criterion != "magnitude" else []
    loss = scoring_loss(spec.criterion_loss, ctx)
    tracker = (
        importance.MovementTracker(state.model, params) if spec.criterion == "movement" else None
    )

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
            new = nm_masks(
                scores, spec.n, spec.m, zeros=min(round(sparsity * spec.m), spec.m - spec.n)
            )
        else:
            new = masks_from_scores(scores, sparsity, spec.scope)
        for n, m in previous.items():
            new[n] = new[n] & m.to(new[n].device)
        state.masks.update(new)
        MaskKeeper(state.model, new)(state.model)  # zero the newly pruned weights now

    target = spec.target_sparsity
    seed = ctx.seed

    def fit(epochs: int, on_step=None, round_index: int = 0, hook_state=None) -> None:
        ctx.fit(
            state,
            cfg,
            epochs,
            seed=seed + round_index,
            on_step=on_step,
            after_step=tracker,
            desc=ctx.desc,
            hook_state=hook_state,
        )

    if spec.rewind != "none":
        _prune_with_rewind(state, spec, ctx, update, fit, info)
    elif spec.schedule == "iterative":
        _prune_iteratively(spec, update, fit, info)
    elif spec.schedule == "oneshot" or spec.epochs == 0:
        update(target)
        fit(spec.epochs)
    else:  # gradual
        _prune_gradually(spec, update, fit)
    pruned = {n: state.masks[n] for n in params}
    info["mask_sparsity"] = sparsity_of(pruned)
    if spec.structure == "nm":
        for n in params:
            state.nm_layers[n] = [spec.n, spec.m]
        info["nm_layers"] = len(params)
    state.info.update(info)
    return state


def _prunable(state: State, spec: PruneSpec, info: dict[str, Any]) -> dict[str, torch.nn.Parameter]:
    """The weights the stage prunes: conv/linear weights not excluded and, for N:M, those
    whose input width is a multiple of M (the others are listed in ``info``)."""
    params = prunable_parameters(state.model, spec.exclude)
    if spec.structure == "nm":
        excluded = [n for n, p in params.items() if not nm_eligible(p, spec.m)]
        params = {n: p for n, p in params.items() if n not in excluded}
        info["nm"] = f"{spec.n}:{spec.m}"
        info["nm_excluded"] = excluded
    if not params:
        raise RecipeError(
            "prune: no prunable (conv/linear) weights left after 'exclude'"
            + (
                f" and the N:M width rule (input width multiple of {spec.m})"
                if spec.structure == "nm"
                else ""
            ),
            "loosen the exclude patterns",
        )
    return params


def _prune_iteratively(spec: PruneSpec, update, fit, info: dict[str, Any]) -> None:
    """The iterative schedule: ``cycles`` rounds of pruning further, then training."""
    sequence = iterative_sparsities(spec.target_sparsity, spec.cycles)
    epochs = split_epochs(spec.epochs, spec.cycles)
    for i, (s, e) in enumerate(zip(sequence, epochs, strict=True)):
        update(s)
        fit(e, round_index=i)
    info["sparsity_sequence"] = [round(s, 6) for s in sequence]


def _prune_gradually(spec: PruneSpec, update, fit) -> None:
    """The gradual schedule: the masks grow along the cubic ramp while the model trains,
    and end at the target."""
    target = spec.target_sparsity
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


def _prune_with_rewind(
    state: State, spec: PruneSpec, ctx: Context, update, fit, info: dict[str, Any]
) -> None:
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
    info["rewind"] = spec.rewind if spec.rewind == "stage_start" else f"epoch {spec.rewind_epoch}"
    info["sparsity_sequence"] = [round(s, 6) for s in sequence]
