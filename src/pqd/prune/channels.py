"""Structured channel pruning with real surgery: a smaller dense network that runs faster.

Why a stage of its own (``stage: prune_channels``) rather than ``structure: channels`` on
``prune``: ``prune`` keeps every shape and holds weights at zero with masks (unstructured
or N:M), and its knobs are a sparsity, a scope and a mask schedule. Channel pruning
changes the architecture itself: it is driven by a channel ratio or by a MACs or measured
latency budget, rounds widths for the INT8 kernels, must rebuild a QAT graph when it runs
after ``quantize``, and leaves a record from which the pruned architecture is rebuilt.
Sharing one spec would make half of each stage's fields meaningless for the other.

How it works, with Torch-Pruning (TP) 1.6 doing the surgery:

1. ``DependencyGraph`` finds the groups of coupled channels (a conv's outputs, its BN, the
   next convs' inputs; every conv joined by a residual add; concatenations; depthwise
   convs follow their input). Each group is named by its root module.
2. Scoring is separate: :mod:`pqd.prune.importance` gives per-weight scores (any criterion), and
   :func:`group_scores` sums them over each channel's slices in every conv/linear of the
   group (``magnitude`` with ``p: 2`` is the group L2 norm, ``p: 1`` the group L1 norm).
3. :func:`plan_channels` keeps the best channels: ``scope: layer`` keeps the same fraction
   of every group, ``scope: global`` ranks channels of all groups together (scores
   divided by their group's mean, no group below ``1 - max_ratio``). Kept counts are
   rounded to a multiple of ``round_to`` (INT8 kernels prefer multiples of 8/16).
4. :func:`apply_structure` prunes the complement of the kept indices with TP. The same
   function replays a recorded structure on a fresh zoo model (:func:`rebuild_model`).

Never pruned: the output layer (the last conv/linear to run: its outputs are the
classes), the image channels (a network input has no producer), and ``norm`` (the
in-graph normalisation holds buffers only and sits outside every group; checked).

Attention (a module with a ``qkv`` linear and a ``head_dim``, as in :mod:`pqd.models.vit`):
its qkv group is planned by whole heads (:func:`attention_heads`; the head score is the sum
over the head's q, k and v channels, ``round_to`` does not apply, at least one head stays),
so surgery removes heads from qkv and the projection; MLP hidden units are ordinary groups.

Targets: ``ratio`` (fraction of channels removed), or ``target: {macs: f}`` (bisection on
the ratio until conv+linear MACs <= f x the baseline's), or ``target: {latency_ms: x}``
(bisection on the ratio, each candidate exported to ONNX, FP32 or INT8 as it will ship,
and timed on onnxruntime at batch 1; ``trials`` candidates at most, every one recorded).

Composition: after ``quantize`` the state holds a PT2E QAT graph, on which TP cannot
operate. Its state_dict carries the eager parameter names, so the eager model is rebuilt
(fresh zoo model + the recorded structure + the graph's eager entries), pruned, prepared
for QAT again (:func:`pqd.quant.prepare.prepare_qat`) and its activation observers
re-calibrated on ``calibration_batches`` training batches; ``state.quantized`` stays True.
Unstructured masks are carried through surgery exactly (the same structure is replayed
on a copy whose weights are the masks); N:M masks are re-imposed on layers whose input
width is still a multiple of M (magnitude within each group), else dropped and reported.

Schedules: ``oneshot`` (prune, then fine-tune ``epochs``) or ``iterative`` (``cycles``
prune/fine-tune rounds; after round i a fraction ``(1 - ratio)^(i / cycles)`` of each
group's stage-start channels remains, fine-tuning ``epochs / cycles`` each).
"""

from __future__ import annotations

import copy
import math
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn as nn

from pqd.errors import ModelError
from pqd.recipe import PruneChannelsSpec
from pqd.state import State
from pqd.train import is_graph

Record = dict[str, Any]
"""One surgery step: ``{"layer": root module name, "channels": count before, "kept": [...]}``."""


# ---------------------------------------------------------------------------- graph


def output_layer(model: nn.Module, example: torch.Tensor) -> nn.Module | None:
    """The last conv/linear module to run in a forward pass (the classifier's output)."""
    last: list[nn.Module] = []
    run_with_layer_hooks(model, example, lambda mod, i, o: last.append(mod))
    return last[-1] if last else None


class _eval:
    """Evaluation mode inside the block, every module's previous flag restored after."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.modes = {m: m.training for m in self.model.modules()}
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        for m, flag in self.modes.items():
            m.training = flag


LayerHook = Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]
"""A forward hook on a conv/linear: ``hook(module, inputs, output)``."""


def run_with_layer_hooks(model: nn.Module, example: torch.Tensor, hook: LayerHook) -> None:
    """Run ``model`` on ``example`` once (eval mode, no grad) with ``hook`` on every
    conv/linear module; the hooks are removed and the training flags restored after.

    Args:
        model: an eager network.
        example: its input batch.
        hook: called after each conv/linear module's forward, in execution order.
    """
    hooks = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    try:
        with torch.no_grad(), _eval(model):
            model(example)
    finally:
        for h in hooks:
            h.remove()


def dependency_graph(model: nn.Module, example: torch.Tensor):  # -> tp.DependencyGraph
    """Torch-Pruning's dependency graph of an eager ``model`` (traced in eval mode)."""
    import torch_pruning as tp

    if is_graph(model):
        raise ModelError(
            "channel surgery needs an eager model, got an exported graph",
            "rebuild the eager model first (see eager_model)",
        )
    with _eval(model):
        return tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)


def channel_groups(model: nn.Module, example: torch.Tensor, exclude: Sequence[str] = ()):
    """(graph, {root name: TP group}) for every prunable channel group of ``model``.

    The output layer and modules whose names match an ``exclude`` pattern keep their
    output channels (a group that would prune them is skipped).
    """
    import fnmatch

    dg = dependency_graph(model, example)
    names = {m: n for n, m in model.named_modules()}
    ignored = [m for m, n in names.items() if any(fnmatch.fnmatchcase(n, p) for p in exclude)]
    out = output_layer(model, example)
    if out is not None:
        ignored.append(out)
    norm = getattr(model, "norm", None)
    groups = {}
    for group in dg.get_all_groups(
        ignored_layers=ignored, root_module_types=[nn.Conv2d, nn.Linear]
    ):
        members = {dep.target.module for dep, _ in group}
        if norm is not None and norm in members:
            raise ModelError(
                "channel pruning would touch the in-graph normalisation 'norm'",
                "exclude the layers that feed it",
            )
        groups[names[group[0].dep.target.module]] = group
    return dg, groups


# ---------------------------------------------------------------------------- scoring


def group_scores(
    group, weight_scores: dict[str, torch.Tensor], names: dict[nn.Module, str], dg, p: int = 1
) -> torch.Tensor:
    """Per-channel score of a TP group: the sum of per-weight scores over each channel's
    slices in every conv/linear of the group (output rows of producers, input columns of
    consumers). ``p = 2`` with squared-magnitude scores returns the group L2 norm.

    ``weight_scores`` is keyed by parameter name (``<module>.weight``); members without
    scores (BN, grouped convs' inputs) do not count.
    """
    n_channels = len(group[0].idxs)
    total = torch.zeros(n_channels, dtype=torch.float64)
    for i, (dep, idxs) in enumerate(group):
        module = dep.target.module
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        key = f"{names.get(module)}.weight"
        if key not in weight_scores:
            continue
        s = weight_scores[key].detach().double().cpu()
        out_fn = dg.is_out_channel_pruning_fn(dep.handler)
        depthwise = isinstance(module, nn.Conv2d) and module.groups > 1
        if out_fn or (depthwise and module.groups == module.in_channels):
            local = s[list(idxs)].flatten(1).sum(1)
        elif depthwise:
            continue  # grouped (not depthwise) conv inputs: counted through their outputs
        else:
            local = s.transpose(0, 1)[list(idxs)].flatten(1).sum(1)
        root = group[i].root_idxs
        if root is None or any(r is None for r in root):
            continue
        total.scatter_add_(0, torch.tensor(list(root), dtype=torch.long), local)
    return total.sqrt() if p == 2 else total


def round_keep(keep: float, channels: int, round_to: int | None) -> int:
    """Kept channel count: ``keep`` rounded to a multiple of ``round_to``, within [1, channels]."""
    k = round(keep)
    if round_to and round_to > 1:
        k = max(round_to, round(keep / round_to) * round_to)
    return int(min(channels, max(1, k)))


def plan_channels(
    scores: dict[str, torch.Tensor],
    keep_fraction: float | dict[str, float],
    scope: str = "layer",
    round_to: int | None = None,
    max_ratio: float = 0.9,
) -> dict[str, list[int]]:
    """Kept channel indices (sorted) per group, from per-channel ``scores``.

    ``keep_fraction`` is the fraction of channels to keep (a float, or one per group,
    relative to each group's current count). ``layer``: each group keeps its best
    ``round(f * C)`` channels. ``global``: channels are ranked across groups by their
    score divided by the group's mean |score|; each group keeps those above the global
    cut, at least ``(1 - max_ratio) * C``. Counts are then rounded to ``round_to``.
    Ties keep the lower index.
    """
    if not scores:
        return {}
    fractions = (
        keep_fraction
        if isinstance(keep_fraction, dict)
        else dict.fromkeys(scores, float(keep_fraction))
    )
    counts: dict[str, float] = {}
    if scope == "layer":
        counts = {n: fractions[n] * len(s) for n, s in scores.items()}
    elif scope == "global":
        normed = {n: s.double() / max(float(s.abs().mean()), 1e-12) for n, s in scores.items()}
        flat = torch.cat(list(normed.values()))
        budget = round(sum(fractions[n] * len(s) for n, s in scores.items()))
        order = torch.argsort(flat, descending=True, stable=True)
        kept = torch.zeros(len(flat), dtype=torch.bool)
        kept[order[:budget]] = True
        offset = 0
        for n, s in normed.items():
            floor = math.ceil((1.0 - max_ratio) * len(s))
            counts[n] = max(int(kept[offset : offset + len(s)].sum()), floor)
            offset += len(s)
    else:
        raise ValueError(f"unknown scope {scope!r}")
    plan = {}
    for n, s in scores.items():
        k = round_keep(counts[n], len(s), round_to)
        order = torch.argsort(s.double(), descending=True, stable=True)
        plan[n] = sorted(order[:k].tolist())
    return plan


# ---------------------------------------------------------------------------- surgery


def apply_structure(
    model: nn.Module, example: torch.Tensor, records: Sequence[Record]
) -> nn.Module:
    """Prune ``model`` in place to the recorded structure (TP surgery, step by step).

    Each record keeps ``kept`` of the ``channels`` output channels of the group rooted at
    ``layer``; its group is found again in the current dependency graph. Used both for
    fresh pruning and to rebuild a pruned architecture from a fresh model.
    """
    if not records:
        return model
    dg = dependency_graph(model, example)
    modules = dict(model.named_modules())
    for rec in records:
        layer = modules.get(rec["layer"])
        if layer is None:
            raise ModelError(
                f"pruned structure names layer {rec['layer']!r} that the model lacks",
                "rebuild it on the model it was recorded on",
            )
        pruner = dg.get_pruner_of_module(layer)
        channels = pruner.get_out_channels(layer)
        if channels != rec["channels"]:
            raise ModelError(
                f"pruned structure expects {rec['channels']} channels at "
                f"{rec['layer']!r}, the model has {channels}",
                "rebuild it on the model it was recorded on",
            )
        kept = set(rec["kept"])
        pruned = [i for i in range(channels) if i not in kept]
        if pruned:
            dg.get_pruning_group(layer, pruner.prune_out_channels, pruned).prune(
                record_history=False
            )
    return model


def rebuild_model(
    model: nn.Module, structure: Sequence[Record], example: torch.Tensor | None = None
) -> nn.Module:
    """``model`` (a fresh, unpruned eager model, e.g. ``Context.new_model()``) pruned to
    ``structure`` (e.g. ``State.structure``), in place; returned.

    Load a pruned checkpoint into it with ``load_state_dict``; ``example`` (needed only when
    ``structure`` is not empty) defaults to a [2, 3, 32, 32] input.
    """
    if example is None:
        example = torch.rand(2, 3, 32, 32)
    return apply_structure(model, example, structure)


def carry_masks(
    model: nn.Module,
    masks: dict[str, torch.Tensor],
    example: torch.Tensor,
    records: Sequence[Record],
) -> dict[str, torch.Tensor]:
    """The keep-masks of ``model`` after ``records`` are applied to it (exact slicing).

    A copy of the (unpruned) model whose masked weights hold their masks as 0/1 goes
    through the same surgery; its sliced weights are the new masks.
    """
    if not masks:
        return {}
    shadow = copy.deepcopy(model)
    params = dict(shadow.named_parameters())
    with torch.no_grad():
        for n, m in masks.items():
            params[n].copy_(m.to(params[n].device, params[n].dtype))
    apply_structure(shadow, example, records)
    return {n: p.detach() != 0 for n, p in shadow.named_parameters() if n in masks}


# ---------------------------------------------------------------------------- measuring


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Conv + linear multiply-accumulates per image of an eager model (forward hooks)."""
    total = [0]

    def hook(mod: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        per_image = out.numel() // out.shape[0]
        if isinstance(mod, nn.Conv2d):
            kh, kw = mod.kernel_size
            total[0] += per_image * (mod.in_channels // mod.groups) * kh * kw
        else:  # the hooks sit on convs and linears only
            total[0] += per_image * cast(nn.Linear, mod).in_features

    run_with_layer_hooks(model, example, hook)
    return total[0]


def artifact_latency_ms(
    model: nn.Module,
    example: torch.Tensor,
    *,
    int8: bool,
    calibration: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
    threads: int = 2,
    repeats: int = 100,
) -> float:
    """Batch-1 p50 latency (ms) on onnxruntime of ``model`` exported as it would ship.

    ``int8``: prepared for QAT on a copy, observers calibrated on ``calibration``
    batches, exported as INT8 QDQ; else exported FP32.
    """
    from pqd.measurement.latency import time_files
    from pqd.onnx_export import export_onnx
    from pqd.quant.calibration import calibrate
    from pqd.quant.prepare import prepare_qat

    m = copy.deepcopy(model).cpu().float()
    example = example.cpu()
    if int8:
        m = prepare_qat(m, example)
        calibrate(
            m,
            list(calibration) or [(torch.rand(8, *example.shape[1:]), None)],
            max(1, len(calibration)),
            torch.device("cpu"),
        )
    with tempfile.TemporaryDirectory() as tmp:
        path, _ = export_onnx(m, Path(tmp) / "candidate.onnx", example, quantized=int8)
        stats = time_files(
            {"candidate": path},
            "onnxruntime",
            threads,
            (1, *example.shape[1:]),
            warmup=max(10, repeats // 5),
            repeats=repeats,
            rounds=2,
        )
    return stats["candidate"].p50


def prune_copy(
    model: nn.Module,
    example: torch.Tensor,
    scores: dict[str, torch.Tensor],
    ratio: float,
    spec: PruneChannelsSpec,
) -> tuple[nn.Module, list[Record]]:
    """A pruned copy of ``model`` at channel ``ratio`` (for target searches)."""
    m = copy.deepcopy(model)
    records = plan_records(m, example, scores, 1.0 - ratio, spec)
    return apply_structure(m, example, records), records


def find_ratio(
    measure: Callable[[float], float], budget: float, hi: float, trials: int
) -> tuple[float, bool, list[dict[str, float]]]:
    """Smallest channel ratio in [0, hi] whose ``measure(ratio) <= budget`` (bisection).

    Assumes ``measure`` falls as the ratio grows; at most ``trials`` calls. Returns the
    ratio (``hi`` when even that misses the budget), whether it met the budget, and
    every trial ``{"ratio", "value"}``.
    """
    tried: list[dict[str, float]] = []

    def probe(r: float) -> float:
        v = measure(r)
        tried.append({"ratio": round(r, 4), "value": v})
        return v

    if probe(0.0) <= budget:
        return 0.0, True, tried
    if probe(hi) > budget:
        return hi, False, tried
    lo, top = 0.0, hi
    for _ in range(max(0, trials - 2)):
        mid = (lo + top) / 2
        if probe(mid) <= budget:
            top = mid
        else:
            lo = mid
    return top, True, tried


# ---------------------------------------------------------------------------- the stage


def plan_records(
    model: nn.Module,
    example: torch.Tensor,
    scores: dict[str, torch.Tensor],
    keep: float | dict[str, float],
    spec: PruneChannelsSpec,
) -> list[Record]:
    """Surgery records keeping ``keep`` of each group's current channels (see plan_channels)."""
    dg, groups = channel_groups(model, example, spec.exclude)
    names = {m: n for n, m in model.named_modules()}
    p = 2 if spec.criterion == "magnitude" and spec.p == 2 else 1
    weight_scores = {n: s.pow(2) for n, s in scores.items()} if p == 2 else scores
    per_group = {root: group_scores(g, weight_scores, names, dg, p) for root, g in groups.items()}
    if isinstance(keep, dict):
        keep = {root: keep.get(root, 1.0) for root in per_group}
    heads = attention_heads(model)
    per_head = {r: head_scores(s, heads[r]) for r, s in per_group.items() if r in heads}
    channels = {r: s for r, s in per_group.items() if r not in heads}
    plan = plan_channels(channels, _only(keep, channels), spec.scope, spec.round_to, spec.max_ratio)
    kept_heads = plan_channels(per_head, _only(keep, per_head), spec.scope, None, spec.max_ratio)
    for root, hs in kept_heads.items():
        plan[root] = head_channels(hs, len(per_head[root]), heads[root])
    return [
        {"layer": root, "channels": len(per_group[root]), "kept": kept}
        for root, kept in plan.items()
        if len(kept) < len(per_group[root])
    ]


def attention_heads(model: nn.Module) -> dict[str, int]:
    """``{qkv linear name: head width}`` for every attention module of ``model``: a module
    with a ``qkv`` linear (outputs ``[3, heads, head_dim]``, as in timm and
    :mod:`pqd.models.vit`) and a ``head_dim``. Their channel groups are pruned by whole
    heads: the same heads in q, k and v, and the projection's matching inputs."""
    return {
        f"{n}.qkv": int(m.head_dim)
        for n, m in model.named_modules()
        if isinstance(getattr(m, "qkv", None), nn.Linear) and hasattr(m, "head_dim")
    }


def head_scores(channel_scores: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Per-head score: the sum of a qkv group's channel scores over each head's q, k and v
    slices (channels laid out ``[3, heads, head_dim]``)."""
    return channel_scores.reshape(3, -1, head_dim).sum(dim=(0, 2))


def head_channels(kept_heads: Sequence[int], heads: int, head_dim: int) -> list[int]:
    """qkv output channels (sorted) of the ``kept_heads`` among ``heads`` heads."""
    return sorted(
        j * heads * head_dim + h * head_dim + i
        for j in range(3)
        for h in kept_heads
        for i in range(head_dim)
    )


def _only(keep: float | dict[str, float], groups: dict[str, Any]) -> float | dict[str, float]:
    return {r: keep[r] for r in groups} if isinstance(keep, dict) else keep


def weight_names(model: nn.Module) -> list[str]:
    return [
        f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    ]


def reimpose_nm(state: State, model: nn.Module, info: dict[str, Any]) -> None:
    """Re-impose N:M masks on layers still eligible after surgery; drop the others."""
    from pqd.prune.masks import nm_eligible, nm_masks

    params = dict(model.named_parameters())
    dropped = []
    for name, (n, m) in list(state.nm_layers.items()):
        w = params[name]
        if not nm_eligible(w, m):
            dropped.append(name)
            del state.nm_layers[name]
            continue
        new = nm_masks({name: w.detach().abs()}, n, m)[name]
        state.masks[name] = state.masks.get(name, new) & new
        with torch.no_grad():
            w.mul_(state.masks[name])
    if dropped:
        info["nm_dropped"] = dropped
