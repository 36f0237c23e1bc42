"""Early exit: heads after chosen blocks, trained, with confidence thresholds calibrated
on the validation split to meet a target (BranchyNet, Teerapittayanon et al., 2016).

The model becomes a :class:`~pqd.models.multi_exit.MultiExitNet`: segments of the
original ``features`` with a head after each but the last (``[conv-bn-relu] -> pool ->
linear``), the final segment ending with the original classifier; ``forward`` with exits
disabled is the original network. Training (shared loop): ``mode: heads`` freezes the
backbone (no gradient, BN statistics and fake-quant observers frozen) and trains the heads
on ``sum_k w_k * loss_k``; ``mode: joint`` adds that sum to the final head's loss and
trains everything. ``loss_k`` is cross-entropy, or with ``distill: final | teacher``
``alpha * KD(exit_k || source) + (1 - alpha) * CE`` where the source is the final head
(detached) or the baseline teacher (which then also distills the final head in joint mode).

Composition (any order):

- before prune / quantize / distill: exits stay attached; every later stage trains them
  with the same exit losses (``Context.fit`` adds them to the stage's own loss; in
  ``heads`` mode their gradients stop at the head inputs, so exits never change the
  backbone). prune ranks and masks the heads' weights with the rest; quantize
  fake-quantizes every segment and head as its own PT2E graph.
- after quantize: eager weights are recovered from the QAT graph (its eager state-dict
  keys), the segmented model is prepared per part, and the backbone's fake-quantizer
  state (activation ranges, weight observers) is copied over from the whole graph,
  matched by the module path of the op each quantizer observes; quantizers with no match
  (segment inputs, heads) are calibrated on ``calibration_batches`` training batches.
- after prune: masks are renamed to the segment names (``X`` -> ``segments.k.X``) and
  stay applied.

Thresholds: on the validation split, per exit, a confidence (top softmax probability,
or ``1 - entropy / ln(classes)``), and a search over per-exit thresholds for the target
(:func:`calibrate_thresholds`). The pipeline calibrates again on the deployed segment
files at export (the manifest's thresholds) and reports accuracy on the test split.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pqd.errors import RecipeError
from pqd.models.multi_exit import MultiExitNet
from pqd.recipe import ExitTarget, TrainSpec
from pqd.train import LossHook, eval_mode, is_graph, load_graph_weights, soft_kd

GRID_BUDGET = 200_000  # threshold combinations searched (per-exit grid = budget^(1/K))


# ---------------------------------------------------------------------------- confidence


def confidence(logits: np.ndarray | torch.Tensor, kind: str) -> np.ndarray:
    """Per-row confidence in [0, 1]: top softmax probability, or 1 - entropy / ln(classes)."""
    t = torch.as_tensor(np.asarray(logits, dtype=np.float32))
    logp = F.log_softmax(t, dim=1)
    if kind == "max_softmax":
        return logp.max(1).values.exp().numpy()
    if kind == "entropy":
        return (1.0 + (logp.exp() * logp).sum(1) / math.log(t.shape[1])).numpy()
    raise ValueError(f"unknown confidence {kind!r}")


def exit_assignment(conf: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """Index of the exit each input leaves at: the first ``k`` with ``conf[k] >= t_k``,
    else ``len(thresholds)`` (the final head). ``conf`` is [exits, N]."""
    n = conf.shape[1] if conf.ndim == 2 else 0
    where = np.full(n, len(thresholds), np.int64)
    for k in reversed(range(len(thresholds))):
        where[conf[k] >= thresholds[k]] = k
    return where


def exit_outcome(
    conf: np.ndarray,
    correct: np.ndarray,
    costs: Sequence[float] | np.ndarray,
    thresholds: Sequence[float],
) -> dict[str, Any]:
    """Accuracy (fraction), mean cost and exit fractions under ``thresholds``.

    ``correct`` is [exits + 1, N] (the last row: the final head), ``costs`` per exit + final.
    """
    where = exit_assignment(conf, thresholds)
    n = correct.shape[1]
    k_all = len(thresholds) + 1
    acc = float(correct[where, np.arange(n)].mean()) if n else float("nan")
    cost = float(np.asarray(costs, np.float64)[where].mean()) if n else float("nan")
    fractions = np.bincount(where, minlength=k_all) / max(1, n)
    return {"accuracy": acc, "cost": cost, "exit_fractions": [float(f) for f in fractions]}


def calibrate_thresholds(
    conf: np.ndarray,
    correct: np.ndarray,
    costs: Sequence[float],
    target: ExitTarget,
    full_cost: float,
) -> dict[str, Any]:
    """Per-exit thresholds meeting ``target`` on the given (validation) outputs.

    ``conf``: [K, N] confidences of the K exits; ``correct``: [K + 1, N] booleans (last row
    the final head); ``costs``: MACs of leaving at each exit and at the final head;
    ``full_cost``: MACs of the network without exits (the ``max_macs_fraction`` reference).

    ``max_drop_points``: the fewest mean MACs with accuracy >= final-head accuracy - X/100
    (ties: higher accuracy, then higher thresholds). ``max_macs_fraction``: the best
    accuracy with mean MACs <= Y * full_cost (ties: fewer MACs, then higher thresholds);
    when nothing meets it, the cheapest setting, with ``target_met`` False.
    Every threshold is one of the observed confidences (or inf: never exit); the search
    is exhaustive over a grid of up to ``GRID_BUDGET ** (1/K)`` quantiles per exit.
    """
    conf = np.asarray(conf, np.float64)
    correct = np.asarray(correct, bool)
    cost_of = np.asarray(costs, np.float64)
    k_exits, n = conf.shape[0], correct.shape[1]
    ref_acc = float(correct[-1].mean()) if n else float("nan")
    if k_exits == 0 or n == 0:
        return {
            "thresholds": [math.inf] * k_exits,
            "target_met": True,
            "reference_accuracy": ref_acc,
            **exit_outcome(conf, correct, cost_of, [math.inf] * k_exits),
        }
    per_exit = max(2, int(GRID_BUDGET ** (1.0 / k_exits)))
    grids = [_grid(conf[k], per_exit) for k in range(k_exits)]
    if target.max_drop_points is not None:
        floor = ref_acc - target.max_drop_points / 100.0 - 1e-9
        limit = None
    else:
        assert target.max_macs_fraction is not None  # ExitTarget holds exactly one of the two
        floor = None
        limit = target.max_macs_fraction * full_cost + 1e-6
    best_key: tuple | None = None
    best: tuple[float, ...] = tuple([math.inf] * k_exits)
    cheapest_key: tuple | None = None
    cheapest: tuple[float, ...] = best
    correct_sum = correct.astype(np.int64)
    last = k_exits - 1
    for prefix in itertools.product(*grids[:-1]):
        acc, cost = _last_exit_outcomes(prefix, grids[last], conf, correct_sum, cost_of)
        for g in range(len(grids[last])):
            thr = (*prefix, float(grids[last][g]))
            key_cheap = (cost[g], -acc[g])
            if cheapest_key is None or key_cheap < cheapest_key:
                cheapest_key, cheapest = key_cheap, thr
            if floor is not None:
                if acc[g] < floor:
                    continue
                key = (cost[g], -acc[g])
            else:
                if cost[g] > limit:
                    continue
                key = (-acc[g], cost[g])
            if best_key is None or key < best_key:
                best_key, best = key, thr
    met = best_key is not None
    chosen = list(best if met else cheapest)
    return {
        "thresholds": chosen,
        "target_met": met,
        "reference_accuracy": ref_acc,
        **exit_outcome(conf, correct, cost_of, chosen),
    }


def _last_exit_outcomes(
    prefix: tuple[float, ...],
    grid: np.ndarray,
    conf: np.ndarray,
    correct_sum: np.ndarray,
    costs: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """(accuracy, mean cost) per threshold of ``grid`` on the last exit, with ``prefix``
    the thresholds of the exits before it: :func:`calibrate_thresholds`' inner loop."""
    n = correct_sum.shape[1]
    remaining = np.ones(n, bool)
    acc_sum, cost_sum = 0, 0.0
    for k, t in enumerate(prefix):
        leave = remaining & (conf[k] >= t)
        acc_sum += int(correct_sum[k][leave].sum())
        cost_sum += costs[k] * int(leave.sum())
        remaining &= ~leave
    last = len(prefix)
    rem_conf = conf[last][remaining]
    leave = rem_conf[None, :] >= grid[:, None]  # [G, n_remaining]
    acc = (
        acc_sum + leave @ correct_sum[last][remaining] + (~leave) @ correct_sum[-1][remaining]
    ) / n
    n_leave = leave.sum(1)
    cost = (cost_sum + costs[last] * n_leave + costs[-1] * (int(remaining.sum()) - n_leave)) / n
    return acc, cost


def _grid(values: np.ndarray, size: int) -> np.ndarray:
    """Candidate thresholds, highest first: inf (never exit) then up to ``size - 1``
    observed values (all of them when few, else evenly spaced quantiles)."""
    uniq = np.unique(values)
    if len(uniq) > size - 1:
        idx = np.unique(np.round(np.linspace(0, len(uniq) - 1, size - 1)).astype(int))
        uniq = uniq[idx]
    return np.concatenate([[math.inf], uniq[::-1]])


# ---------------------------------------------------------------------------- training


def with_exit_losses(
    net: MultiExitNet, base: LossHook | None, teacher: nn.Module, cfg: TrainSpec
) -> LossHook:
    """``base`` (the stage's loss on the final logits; cross-entropy when None) plus the
    weighted exit losses set by the early_exit stage (``net.exit_loss``)."""
    spec = net.exit_loss
    weights = spec.get("weights") or [1.0] * net.num_exits
    distill, temperature, alpha = (
        spec.get("distill", "none"),
        spec.get("temperature", 4.0),
        spec.get("alpha", 0.5),
    )
    smoothing = cfg.label_smoothing

    def loss(final: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        total = (
            F.cross_entropy(final, y, label_smoothing=smoothing)
            if base is None
            else base(final, y, x)
        )
        source = None
        if distill == "final":
            source = final.detach().float()
        elif distill == "teacher":
            with torch.no_grad():
                source = teacher(x).float()
        for w, logits in zip(weights, net.exit_logits, strict=True):
            logits = logits.float()
            term = F.cross_entropy(logits, y, label_smoothing=smoothing)
            if source is not None:
                term = alpha * soft_kd(logits, source, temperature) + (1.0 - alpha) * term
            total = total + w * term
        return total

    return loss


@contextlib.contextmanager
def frozen_backbone(net: MultiExitNet) -> Iterator[None]:
    """Segments get no gradient, keep BN statistics and fake-quant observers; restored after."""
    seg_params = [p for s in net.segments for p in s.parameters()]
    grads = [p.requires_grad for p in seg_params]
    fqs = [m for s in net.segments for m in s.modules() if hasattr(m, "observer_enabled")]
    observed = [fq.observer_enabled.clone() for fq in fqs]
    for p in seg_params:
        p.requires_grad_(False)
    for fq in fqs:
        fq.observer_enabled[0] = 0
    net.frozen_backbone = True
    try:
        yield
    finally:
        net.frozen_backbone = False
        for p, g in zip(seg_params, grads, strict=True):
            p.requires_grad_(g)
        for fq, s in zip(fqs, observed, strict=True):
            fq.observer_enabled.copy_(s)


# ---------------------------------------------------------------------------- composition


def eager_from_graph(graph: nn.Module, like: nn.Module) -> nn.Module:
    """A copy of eager model ``like`` holding the weights and BN statistics of ``graph``
    (a PT2E QAT graph of the same architecture: its state_dict has the eager keys)."""
    eager = copy.deepcopy(like)
    missing = load_graph_weights(eager, graph)
    if missing:
        raise RecipeError(
            f"early_exit: the quantized model lacks weights of the eager net ({missing[:3]})",
            "put early_exit before quantize, or keep the architecture unchanged between them",
        )
    return eager


def _fq_keys(graph: torch.fx.GraphModule) -> dict[str, list[tuple]]:
    """For each fake-quantizer of a PT2E graph: match keys (most specific first) by the
    module path and op of its producer and of its consumers."""

    def where(node: torch.fx.Node) -> tuple:
        if node.op == "get_attr":
            return ("attr", str(node.target))
        if node.op == "placeholder":
            return ("input",)
        stack = node.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else ""
        return (str(node.target), path)

    out: dict[str, list[tuple]] = {}
    for node in graph.graph.nodes:
        if node.op != "call_module" or not hasattr(
            graph.get_submodule(str(node.target)), "observer_enabled"
        ):
            continue
        src = node.args[0]
        users = tuple(sorted((where(u), u.args.index(node)) for u in node.users if node in u.args))
        keys = [("both", where(src), users)]
        if src.op != "placeholder":
            keys.append(("producer", where(src)))
        if any(u[0][0] != "output" for u in users):  # "feeds the graph output" says nothing
            keys.append(("consumers", users))
        out[str(node.target)] = keys
    return out


def carry_observers(source: torch.fx.GraphModule, parts: Sequence[nn.Module]) -> tuple[int, int]:
    """Copy fake-quantizer state from ``source`` (whole-network QAT graph) into the
    matching quantizers of ``parts``; returns (copied, total distinct quantizers in parts).
    A key must be unique in the source to be used."""
    src_keys = _fq_keys(source)
    index: dict[tuple, list[str]] = {}
    for name, keys in src_keys.items():
        for key in keys:
            index.setdefault(key, []).append(name)
    copied = total = 0
    seen: set[int] = set()
    for part in parts:
        if not is_graph(part):
            continue
        for name, keys in _fq_keys(part).items():
            dst = part.get_submodule(name)
            if id(dst) in seen:  # shared at a segment boundary: loaded once
                continue
            seen.add(id(dst))
            total += 1
            for key in keys:
                hits = index.get(key, [])
                if len(hits) != 1:
                    continue
                src_state = source.get_submodule(hits[0]).state_dict()
                dst_state = dst.state_dict()
                if src_state.keys() != dst_state.keys() or any(
                    src_state[k].shape != dst_state[k].shape for k in src_state
                ):
                    continue
                dst.load_state_dict(src_state)
                copied += 1
                break
    return copied, total


# ---------------------------------------------------------------------------- the stage


@torch.no_grad()
def exit_outputs(
    net: MultiExitNet, loader: Any, device: torch.device, kind: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(confidences [K, N], correct [K + 1, N], targets [N]) of ``net`` on ``loader``
    (evaluation mode, fp32, observers frozen)."""
    logits: list[list[torch.Tensor]] = []
    ys = []
    with eval_mode(net):
        for x, y in loader:
            logits.append([o.float().cpu() for o in net.forward_all(x.to(device))])
            ys.append(y.cpu())
    y_all = torch.cat(ys).numpy()
    per_exit = [torch.cat([b[k] for b in logits]).numpy() for k in range(net.num_exits + 1)]
    conf = (
        np.stack([confidence(lg, kind) for lg in per_exit[:-1]])
        if net.num_exits
        else np.zeros((0, len(y_all)))
    )
    correct = np.stack([lg.argmax(1) == y_all for lg in per_exit])
    return conf, correct, y_all
