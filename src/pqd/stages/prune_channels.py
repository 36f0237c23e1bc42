"""The prune_channels stage: channel surgery to a ratio or a MACs/latency target
(the machinery: :mod:`pqd.prune.channels`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from pqd.context import Context, score_batches, scoring_loss
from pqd.errors import ModelError, RecipeError
from pqd.prune.channels import (
    Record,
    apply_structure,
    artifact_latency_ms,
    carry_masks,
    channel_groups,
    count_macs,
    find_ratio,
    plan_records,
    prune_copy,
    rebuild_model,
    reimpose_nm,
    weight_names,
)
from pqd.recipe import PruneChannelsSpec
from pqd.registry import register_stage
from pqd.state import State
from pqd.train import is_graph, load_graph_weights


def eager_model(state: State, ctx: Context) -> nn.Module:
    """``state.model`` itself when eager; for a QAT graph, the eager model with its weights.

    The graph's state_dict has every eager key (plus fake-quant buffers): a fresh model
    rebuilt to ``state.structure`` loads them.
    """
    if not is_graph(state.model):
        return state.model
    example = ctx.example_input().cpu()
    eager = rebuild_model(ctx.new_model(), state.structure, example)
    missing = load_graph_weights(eager, state.model)
    if missing:
        raise ModelError(
            f"the QAT graph lacks eager weights {missing[:3]}",
            "prune channels before quantize for this model",
        )
    return eager.to(ctx.device)


@register_stage("prune_channels")
def apply_prune_channels(state: State, spec: PruneChannelsSpec, ctx: Context) -> State:
    """Remove channels (TP surgery) to ``spec.ratio``, ``spec.ratios`` (per group) or
    ``spec.target``, then fine-tune."""
    from pqd.models.multi_exit import MultiExitNet
    from pqd.prune import importance
    from pqd.prune.masks import split_epochs

    if isinstance(state.model, MultiExitNet):
        raise RecipeError(
            "prune_channels cannot run after early_exit (channel surgery across "
            "the exit segments is not supported)",
            "put prune_channels before early_exit, or use prune (masks)",
        )
    cfg = ctx.train
    example = ctx.example_input()
    quantized = state.quantized
    eager = eager_model(state, ctx)
    batches = score_batches(ctx, spec.score_batches) if spec.criterion != "magnitude" else []
    loss = scoring_loss(spec.criterion_loss, ctx)

    def scores_of(model: nn.Module) -> dict[str, torch.Tensor]:
        return importance.score(spec.criterion, model, batches, loss, weight_names(model))

    base_macs = count_macs(ctx.teacher, example.to(next(ctx.teacher.parameters()).device))
    start_macs = count_macs(eager, example)
    info: dict[str, Any] = {
        "criterion": spec.criterion,
        "scope": spec.scope,
        "macs_baseline": base_macs,
        "macs_before": start_macs,
    }
    # removed fraction of each group's stage-start channels: one for all, or one per group
    ratio, ratios = _ratios(eager, example, spec, ctx, quantized, base_macs, info, scores_of)
    # kept fraction of each group's stage-start channels after each round (a group's own
    # ratio when ``ratios`` names it)
    n_rounds = 1 if spec.schedule == "oneshot" else spec.cycles

    def kept_after(i: int, root: str) -> float:
        r = ratios.get(root, 0.0) if ratios is not None else float(ratio or 0.0)
        return (1.0 - r) ** ((i + 1) / n_rounds)

    epochs = [spec.epochs] if spec.schedule == "oneshot" else split_epochs(spec.epochs, spec.cycles)
    start_channels: dict[str, int] = {}
    steps: list[Record] = []
    for i, n_epochs in enumerate(epochs):
        if i > 0:
            eager = eager_model(state, ctx)
        _, groups = channel_groups(eager, example, spec.exclude)
        current = {root: len(g[0].idxs) for root, g in groups.items()}
        if not start_channels:
            start_channels = dict(current)
        keep = {
            root: min(1.0, kept_after(i, root) * start_channels.get(root, c) / c)
            for root, c in current.items()
        }
        records = plan_records(eager, example, scores_of(eager), keep, spec)
        if records:  # else nothing to cut: the state (graph or eager) stays as it is
            _cut(state, eager, example, records, spec, ctx, quantized, i, info)
            steps.extend(records)
        ctx.fit(state, cfg, n_epochs, seed=ctx.seed + i, desc=ctx.desc)
    final = eager_model(state, ctx)
    info["macs_after"] = count_macs(final, example)
    info["macs_fraction_of_baseline"] = round(info["macs_after"] / base_macs, 4)
    info["channels"] = {
        root: [start_channels.get(root, 0), len(rec["kept"])]
        for root, rec in {r["layer"]: r for r in steps}.items()
    }
    info["surgery_steps"] = len(steps)
    if quantized:
        info["requantized"] = (
            "eager weights recovered from the QAT graph, pruned, QAT "
            "re-prepared and observers re-calibrated"
        )
    state.info.update(info)
    return state


def _ratios(
    model: nn.Module,
    example: torch.Tensor,
    spec: PruneChannelsSpec,
    ctx: Context,
    quantized: bool,
    base_macs: int,
    info: dict[str, Any],
    scores_of: Callable[[nn.Module], dict[str, torch.Tensor]],
) -> tuple[float | None, dict[str, float] | None]:
    """The removed fraction of the channel groups: ``(ratio, None)`` for all groups alike
    (``spec.ratio``, or the one that meets ``spec.target``), or ``(None, per-group ratios)``
    (``spec.ratios``); noted in ``info``."""
    ratios: dict[str, float] | None = None
    ratio = spec.ratio
    if spec.ratios is not None:
        ratios = _group_ratios(model, example, spec)
        info["ratios"] = dict(spec.ratios)
        ratio = None
    elif ratio is None:
        assert spec.target is not None
        scores = scores_of(model)
        ratio = _target_ratio(model, example, scores, spec, ctx, quantized, base_macs, info)
    if ratio is not None:
        info["ratio"] = ratio
    return ratio, ratios


def _cut(
    state: State,
    eager: nn.Module,
    example: torch.Tensor,
    records: list[Record],
    spec: PruneChannelsSpec,
    ctx: Context,
    quantized: bool,
    round_index: int,
    info: dict[str, Any],
) -> None:
    """One round's surgery: ``records`` applied to ``eager`` (masks carried, N:M
    re-imposed), which becomes ``state.model``, re-prepared for QAT and calibrated when the
    state is quantized."""
    from pqd.models import check_output_shape
    from pqd.quant.calibration import calibrate
    from pqd.quant.prepare import prepare_qat
    from pqd.train import prepare_model

    if state.masks:
        state.masks = carry_masks(eager, state.masks, example, records)
    apply_structure(eager, example, records)
    state.structure = [*state.structure, *records]
    if state.nm_layers:
        reimpose_nm(state, eager, info)
    check_output_shape(eager, ctx.data.num_classes, int(example.shape[-1]))
    if quantized:
        graph = prepare_qat(eager.cpu(), example.cpu()).to(ctx.device)
        seed = ctx.seed + round_index
        calib = ctx.loader("train", ctx.train.batch_size, seed=seed, shuffle=True)
        calibrate(graph, calib, spec.calibration_batches, ctx.device)
        state.model = graph
    else:
        state.model = prepare_model(eager, ctx.train, ctx.device)


def _group_ratios(
    model: nn.Module, example: torch.Tensor, spec: PruneChannelsSpec
) -> dict[str, float]:
    """``spec.ratios`` checked against the model's channel groups (root module names)."""
    assert spec.ratios is not None
    _, groups = channel_groups(model, example, spec.exclude)
    unknown = sorted(set(spec.ratios) - set(groups))
    if unknown:
        known = ", ".join(sorted(groups)[:6]) + (", ..." if len(groups) > 6 else "")
        raise RecipeError(
            f"prune_channels ratios names {unknown[0]!r}, which roots no channel group of "
            "this model",
            f"key ratios by group root module names ({known})",
        )
    return dict(spec.ratios)


def _target_ratio(
    model: nn.Module,
    example: torch.Tensor,
    scores: dict[str, torch.Tensor],
    spec: PruneChannelsSpec,
    ctx: Context,
    quantized: bool,
    base_macs: int,
    info: dict[str, Any],
) -> float:
    """Channel ratio meeting ``spec.target`` (MACs fraction or measured latency)."""
    target = spec.target
    assert target is not None
    if target.macs is not None:
        budget = target.macs * base_macs

        def macs_at(r: float) -> float:
            return float(count_macs(prune_copy(model, example, scores, r, spec)[0], example))

        ratio, met, tried = find_ratio(macs_at, budget, spec.max_ratio, target.trials)
        info["target"] = {
            "macs": target.macs,
            "budget_macs": int(budget),
            "met": met,
            "trials": [{"ratio": t["ratio"], "macs": int(t["value"])} for t in tried],
        }
        return ratio
    int8 = target.precision == "int8" or (
        target.precision == "auto" and (quantized or ctx.quantize_later)
    )
    calib = []
    if int8:
        loader = ctx.loader("train", 32, seed=ctx.seed, shuffle=True)
        calib = [(x.cpu(), y) for _, (x, y) in zip(range(2), loader, strict=False)]
    threads = ctx.threads

    def latency_at(r: float) -> float:
        m = prune_copy(model, example, scores, r, spec)[0] if r > 0 else model
        return artifact_latency_ms(m, example, int8=int8, calibration=calib, threads=threads)

    ratio, met, tried = find_ratio(
        latency_at, float(target.latency_ms), spec.max_ratio, target.trials
    )
    info["target"] = {
        "latency_ms": target.latency_ms,
        "precision": "int8" if int8 else "fp32",
        "met": met,
        "trials": [{"ratio": t["ratio"], "latency_ms": round(t["value"], 4)} for t in tried],
    }
    if not met:
        info["target"]["note"] = (
            f"even max_ratio {spec.max_ratio} missed the budget; pruned to max_ratio"
        )
    return ratio
