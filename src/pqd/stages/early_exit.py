"""The early_exit stage: attach exit heads, train them, calibrate thresholds
(the machinery: :mod:`pqd.exits`)."""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Any

from pqd.context import Context
from pqd.errors import RecipeError
from pqd.exits.heads import (
    calibrate_thresholds,
    carry_observers,
    eager_from_graph,
    exit_outputs,
    frozen_backbone,
)
from pqd.models.multi_exit import MultiExitNet, build_multi_exit, exit_costs
from pqd.recipe import EarlyExitSpec, ExitTarget
from pqd.registry import register_stage
from pqd.state import State
from pqd.train import LossHook, is_graph, set_train


def calibrate_net(net: MultiExitNet, ctx: Context, target: ExitTarget) -> dict[str, Any]:
    """Set ``net.thresholds`` from the validation split; returns what was found."""
    conf, correct, _ = exit_outputs(net, ctx.loader("val", 256), ctx.device, net.confidence)
    costs = exit_costs(net.part_macs)
    full = float(sum(net.part_macs["segments"]))
    found = calibrate_thresholds(conf, correct, costs, target, full)
    net.thresholds = [float(t) for t in found["thresholds"]]
    return {
        "val_exit_accuracy": [float(c.mean()) for c in correct],
        "val_accuracy_with_exits": found["accuracy"],
        "val_exit_fractions": found["exit_fractions"],
        "val_expected_macs_fraction": found["cost"] / full,
        "thresholds": [t if math.isfinite(t) else None for t in net.thresholds],
        "target_met": found["target_met"],
    }


@register_stage("early_exit")
def apply_early_exit(state: State, spec: EarlyExitSpec, ctx: Context) -> State:
    """Attach exit heads, train them (heads or joint), calibrate thresholds on val."""
    from pqd.quant.calibration import calibrate
    from pqd.quant.prepare import prepare_qat_parts
    from pqd.quant.scheme import quant_scheme

    if isinstance(state.model, MultiExitNet):
        raise RecipeError("early_exit: the model already has exits", "keep one early_exit stage")
    whole_graph = state.model if is_graph(state.model) else None
    eager = state.model
    if whole_graph is not None:  # the eager net of the graph (channel-pruned: rebuilt so)
        like = ctx.teacher
        if state.structure:
            from pqd.prune.channels import rebuild_model

            like = rebuild_model(ctx.new_model(), state.structure, ctx.example_input().cpu())
        eager = eager_from_graph(whole_graph, like)
    eager.to(ctx.device)
    example = ctx.example_input()
    net = build_multi_exit(
        eager,
        spec.positions,
        ctx.data.num_classes,
        example,
        head_channels=spec.head.channels,
        head_kernel=spec.head.kernel_size,
        head_stride=spec.head.stride,
        confidence=spec.confidence,
    )
    if spec.weights is not None and len(spec.weights) != net.num_exits:
        raise RecipeError(
            f"early_exit: weights has {len(spec.weights)} entries for {net.num_exits} exits "
            f"(positions {net.positions})",
            "give one weight per exit",
        )
    net.to(ctx.device)
    state.masks = {net.name_of(n): m for n, m in state.masks.items()}
    net.exit_loss = {
        "weights": spec.weights,
        "distill": spec.distill,
        "temperature": spec.temperature,
        "alpha": spec.alpha,
    }
    net.detach_heads = spec.mode == "heads"
    info: dict[str, Any] = {"positions": net.positions, "exits": net.num_exits}
    cfg = ctx.train
    if whole_graph is not None:
        prepare_qat_parts(net, example, copy.deepcopy(quant_scheme(whole_graph)))
        calib = ctx.loader("train", cfg.batch_size, seed=ctx.seed, shuffle=True)
        calibrate(net, calib, spec.calibration_batches, ctx.device)
        copied, total = carry_observers(whole_graph, [p for _, p in net.parts()])
        info["quantizers_carried_over"] = f"{copied}/{total}"
    state.model = net
    base: LossHook | None = None
    if spec.mode == "joint" and spec.distill == "teacher":
        base = ctx.teacher_loss(spec.temperature, spec.alpha)
    guard = frozen_backbone(net) if spec.mode == "heads" else contextlib.nullcontext()
    with guard:
        ctx.fit(state, cfg, spec.epochs, seed=ctx.seed, loss_fn=base, desc=ctx.desc)
    set_train(net, False)
    info.update(calibrate_net(net, ctx, spec.target))
    state.info.update(info)
    return state
