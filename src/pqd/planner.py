"""``pqd plan``: the most accurate model under a latency budget on this CPU.

    result = plan(load_recipe("recipes/resnet18-structured.yaml"), latency_ms=1.5,
                  out="runs/plan")
    result["pick"]["measured_ms"], result["pick"]["accuracy"]

The recipe is the template: its stages run for every trained candidate, with its
``prune_channels`` stage (one is put first, 1 epoch, when it has none) given per-group
``ratios``; a static ``quantize`` stage makes the target INT8, else FP32. Steps:

1. **Latency model** (:class:`pqd.latency_model.LatencyModel`): measured lookup tables of
   exported pieces on the chosen runtime and threads, cached per machine and runtime; its
   error on ``validate`` random whole candidates (median, worst) is reported.
2. **Honest refusals**, from whole networks timed side by side here: the dense model already
   meets the budget (nothing to prune), or even the fastest candidate (every group at the
   lowest level) misses it; each is one line naming the measured latency. Every later panel
   of whole files also times the dense network and is scaled to the dense time the budget was
   set against (:func:`measure_against_dense`): a VM drifting during a plan moves all files
   alike.
3. **Candidates**: per-group keep levels (the table's levels and their midpoints): uniform
   ones (also at 0.05 steps), a greedy path (step down the group that adds least estimated
   loss per predicted ms saved) and random ones. The cheap accuracy estimate is a
   per-group **sensitivity analysis** (:func:`sensitivity_curves`): the adaptive-BN
   validation loss of the baseline with one group pruned to each level, summed over groups
   (:func:`sensitivity_loss`). First **the uniform reference** is measured: uniform pruning
   at the smallest ratio (0.05 steps) whose whole file meets the budget, what a user would
   do by hand; those uniform files also calibrate the latency model near the budget
   (median measured / predicted). Candidates whose prediction, so scaled, meets the budget
   (and ``size_mb``)
   are ranked by the estimate; the best ``screen`` are re-ranked by a dearer one: their
   joint adaptive-BN validation loss (:func:`adaptive_bn_eval`, EagleEye). The best
   ``max(2k, 4)`` of those are exported whole and timed, and the best ``k`` within the
   budget are trained with the uniform reference. When those whole files ran slower than
   predicted (too few within the budget) or faster (by more than the tolerance: the model is
   calibrated on uniform networks), the predictions are scaled by what they measured and the
   candidates the budget then admits are screened the same way (:func:`recalibrated`,
   :func:`widened`).
4. **Training**: the chosen are trained for real through the normal pipeline (the
   template's stages: prune_channels with explicit ratios, then e.g. QAT and KD from the
   one shared baseline) on the search executors (sequential, processes, Ray), into run
   folders keyed by their resolved recipe: running the same command again resumes.
5. **Measuring and the pick**: each run is measured as ``pqd run`` does, then all final
   files are timed once more side by side; among those within the budget (``tolerance``,
   default 5%, allows timing noise) a planned network is picked only when it beats the
   uniform reference on the validation images beyond noise (paired McNemar, Holm over the
   planned ones: :func:`choose_pick`), else the uniform reference is; the pick's test top-1
   is reported with its paired comparison against the uniform reference, and its recipe is
   written as ``pick.yaml`` (``pqd run pick.yaml`` redoes it).

Writes ``DIR/plan.json``, ``DIR/report.md``, ``DIR/report.html`` (self-contained),
``DIR/plots/*.png`` and ``DIR/pick.yaml``.
"""

from __future__ import annotations

import copy
import itertools
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from pqd.errors import PqdError, RecipeError
from pqd.latency_model import LEVELS, LatencyModel, Ratios
from pqd.recipe import Recipe, dump_recipe, recipe_from_dict
from pqd.stats import ALPHA, compare_paired, holm

PLAN_FILE = "plan.json"
PICK_FILE = "pick.yaml"
SENSITIVITY_FILE = "sensitivity.json"
SELECTION_FILE = "selection.json"
PLAN_VERSION = 1


class PlanError(PqdError):
    """The budget cannot be planned for (already met, or below every candidate)."""


def _say(msg: str) -> None:
    print(f"pqd plan: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- template


def template(recipe: Recipe, runtime: str, threads: int) -> tuple[dict[str, Any], int, str]:
    """The recipe as plain data for the candidates: measured on ``runtime`` with ``threads``
    at batch 1, and a ``prune_channels`` stage (inserted first with 1 epoch if absent).

    Returns:
        ``(recipe data, index of the prune_channels stage, precision "int8" | "fp32")``.
    """
    data = recipe.model_dump(mode="json")
    data.pop("search", None)
    stages = data["stages"]
    kinds = [s["stage"] for s in stages]
    if "early_exit" in kinds:
        raise RecipeError(
            "pqd plan does not search early-exit thresholds yet",
            "remove the early_exit stage from the recipe to plan its channels and precision",
        )
    if kinds.count("prune_channels") > 1:
        raise RecipeError(
            "pqd plan sets the ratios of one prune_channels stage, the recipe has "
            f"{kinds.count('prune_channels')}",
            "keep one prune_channels stage",
        )
    quant = [s for s in stages if s["stage"] == "quantize"]
    if any(q.get("mode") == "dynamic" for q in quant):
        raise RecipeError(
            "pqd plan models static INT8 (QAT or PTQ) or FP32 files, not dynamic quantization",
            "use quantize mode qat or ptq",
        )
    if "prune_channels" not in kinds:
        stages.insert(0, {"stage": "prune_channels", "ratios": {}, "epochs": 1})
    index = [s["stage"] for s in stages].index("prune_channels")
    pc = stages[index]
    for key in ("ratio", "target"):
        pc.pop(key, None)
    pc["ratios"] = {}
    pc["scope"] = "layer"
    data["measure"] = {
        **data["measure"],
        "runtimes": [runtime],
        "threads": threads,
        "batch_sizes": [1],
    }
    return data, index, "int8" if quant else "fp32"


def candidate_recipe(
    base: dict[str, Any], index: int, ratios: Ratios, name: str, checkpoint: str
) -> Recipe:
    """The template with ``ratios`` (groups at 0 left out) in its prune_channels stage."""
    data = copy.deepcopy(base)
    data["name"] = name
    data["stages"][index]["ratios"] = {g: r for g, r in sorted(ratios.items()) if r > 0}
    data["baseline"] = {**data["baseline"], "checkpoint": checkpoint}
    return recipe_from_dict(data, f"plan candidate {name}")


# ---------------------------------------------------------------------------- estimate


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


def _cached_json(
    path: Path, key: dict[str, Any], compute: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """What ``compute`` returned when ``path`` holds it for the same ``key`` (e.g. the
    sensitivity curves of the same baseline checkpoint, calibration, groups, rounding and
    data), else computed and written there: a resumed plan does not evaluate it again."""
    from pqd.checkpoint import atomic_write_text

    if path.is_file():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            if saved.get("key") == key:
                return dict(saved["value"])
        except (ValueError, KeyError, TypeError):
            pass  # unreadable: computed again and rewritten
    value = compute()
    atomic_write_text(path, json.dumps({"key": key, "value": value}, indent=1))
    return value


DENSE = "__dense__"


def measure_against_dense(
    lm: LatencyModel, candidates: dict[str, Ratios], dense_ms: float | None
) -> dict[str, float]:
    """Whole candidates timed in one panel with the dense network, each scaled by
    ``dense_ms`` / the dense network's p50 in this panel: a VM that slows down or speeds up
    between panels (the dense ResNet-18 file moved 9% within one run here) moves every file
    alike, so times from panels minutes apart stay comparable with a budget set earlier.

    Args:
        lm: the latency model (exports and times whole candidates).
        candidates: name -> ratios.
        dense_ms: the dense p50 (ms) the budget was set against; None: no scaling.

    Returns:
        name -> p50 in ms, on the scale of ``dense_ms``.
    """
    if dense_ms is None:
        return lm.measure(candidates)
    times = lm.measure({DENSE: {}, **candidates})
    drift = dense_ms / times.pop(DENSE)
    return {n: t * drift for n, t in times.items()}


FINAL_PANELS = 5  # panels of whole trained files; their median decides (VM noise, see docs/plan.md)


class FilePanel(NamedTuple):
    """Whole files timed in several panels with the dense file (:func:`files_against_dense`)."""

    ms: dict[str, float]  # name -> median over panels of the scaled p50 (ms)
    dense_raw_ms: float  # the dense file's median raw p50 (ms)
    spread: dict[str, float]  # name -> (max - min) / median of its scaled p50s (fraction)


def files_against_dense(
    lm: LatencyModel,
    paths: dict[str, Path],
    dense_file: Path,
    dense_ms: float,
    panels: int = FINAL_PANELS,
) -> FilePanel:
    """Exported files timed with the dense file in ``panels`` panels
    (:meth:`LatencyModel.time_paths`), each panel scaled as :func:`measure_against_dense`
    scales candidates, then the median over panels. On a shared 2-core VM one panel's
    file-to-dense ratio moved by up to 18% from the next; the median of several is what a
    decision within a 5% tolerance can rest on, and the spread says how far to trust it.

    Args:
        lm: the latency model (its runtime, threads and timing).
        paths: name -> ONNX file.
        dense_file: the dense network's file.
        dense_ms: the dense p50 (ms) the budget was set against.
        panels: how many panels (at least 1).

    Returns:
        A :class:`FilePanel`: median scaled p50s (ms), the dense file's median raw p50 (ms),
        and each file's spread over the panels (fraction).
    """
    scaled: dict[str, list[float]] = {n: [] for n in paths}
    dense_raw: list[float] = []
    for _ in range(max(1, panels)):
        raw = lm.time_paths({DENSE: dense_file, **paths})
        d = raw.pop(DENSE)
        dense_raw.append(d)
        for n, t in raw.items():
            scaled[n].append(t * dense_ms / d)
    ms = {n: float(np.median(v)) for n, v in scaled.items()}
    spread = {n: (max(v) - min(v)) / ms[n] if ms[n] > 0 else 0.0 for n, v in scaled.items()}
    return FilePanel(ms, float(np.median(dense_raw)), spread)


def uniform_by_measurement(
    lm: LatencyModel,
    budget_ms: float,
    ratios: list[float],
    tolerance: float,
    dense_ms: float | None = None,
) -> tuple[float, float]:
    """What a user does by hand: the smallest of ``ratios`` (uniform over every group) whose
    whole exported file meets ``budget_ms`` when measured here (all timed in one panel; with
    ``dense_ms``, against the dense network as :func:`measure_against_dense` does).

    Returns:
        ``(ratio, measured ms)``; the largest ratio and its time when none meets it.
    """
    steps = sorted(ratios)
    measured = measure_against_dense(lm, {f"{r:g}": lm.uniform(1.0 - r) for r in steps}, dense_ms)
    return first_within(steps, measured, budget_ms, tolerance)


def uniform_reference(
    lm: LatencyModel,
    budget_ms: float,
    steps: list[float],
    tolerance: float,
    dense_ms: float | None,
    width: float = 0.1,
) -> tuple[float, float, dict[str, float]]:
    """:func:`uniform_by_measurement` without exporting every step: a window of steps around
    the latency model's guess is measured; while the answer sits at the window's lower end
    (or no step meets the budget), the next window below (above) it is measured, until the
    step below the answer has been timed too, over the budget.

    Args:
        lm: the latency model.
        budget_ms: the budget (ms).
        steps: uniform ratios, ascending (e.g. :func:`ratio_steps`).
        tolerance: fraction over the budget a measured time may run.
        dense_ms: as :func:`measure_against_dense`.
        width: the window's half width (in ratio).

    Returns:
        ``(ratio, its measured ms, {f"{ratio:g}": measured ms of every step timed})``.
    """
    if not steps:
        raise PqdError("no uniform ratio to measure", "give prune_channels max_ratio >= 0.05")
    measured: dict[str, float] = {}
    guess = next((r for r in steps if lm.predict(lm.uniform(1.0 - r)) <= budget_ms), steps[-1])
    must: list[float] = []
    for _ in range(len(steps)):
        window = [
            r
            for r in steps
            if (guess - width - 1e-9 <= r <= guess + width + 1e-9 or r in must)
            and f"{r:g}" not in measured
        ]
        if window:
            measured.update(
                measure_against_dense(lm, {f"{r:g}": lm.uniform(1.0 - r) for r in window}, dense_ms)
            )
        timed = [r for r in steps if f"{r:g}" in measured]
        ratio, ms = first_within(timed, measured, budget_ms, tolerance)
        if ms <= budget_ms * (1 + tolerance):
            below = [r for r in steps if r < ratio]
            if not below or f"{below[-1]:g}" in measured:
                break  # the step below was timed over the budget (or there is none)
            guess, must = ratio - width, [below[-1]]  # the next window: just below it
        else:
            above = [r for r in steps if r > max(timed)]
            if not above:
                break  # even the most pruned step misses it
            guess, must = above[0] + width, [above[0]]  # the next: just above the last
    return ratio, ms, measured


def near_budget_scale(lm: LatencyModel, uniform_ms: dict[str, float], ratio: float) -> float:
    """Median measured / predicted over the uniform files timed within 0.1 of ``ratio`` whose
    keep is inside the latency tables (below the lowest level the prediction is clamped, so
    its ratio says nothing about the model); 1.0 when none is."""
    inside = [
        t / lm.predict(lm.uniform(1.0 - float(r)))
        for r, t in uniform_ms.items()
        if 1.0 - float(r) >= lm.levels[0] - 1e-9 and abs(float(r) - ratio) <= 0.1 + 1e-9
    ]
    return float(np.median(inside)) if inside else 1.0


def first_within(
    steps: list[float], measured: dict[str, float], budget_ms: float, tolerance: float
) -> tuple[float, float]:
    """The smallest ratio of ``steps`` whose measured time (``measured[f"{r:g}"]``, ms) is
    within ``budget_ms`` (plus ``tolerance``): ``(ratio, ms)``; else the largest ratio's."""
    for r in sorted(steps):
        if measured[f"{r:g}"] <= budget_ms * (1 + tolerance):
            return r, measured[f"{r:g}"]
    last = max(steps)
    return last, measured[f"{last:g}"]


def ratio_steps(max_ratio: float, step: float = 0.05) -> list[float]:
    """Uniform ratios ``step, 2 step, ...`` up to ``max_ratio``."""
    return [round(step * i, 2) for i in range(1, int(max_ratio / step + 1e-9) + 1)]


# ---------------------------------------------------------------------------- candidates


def search_levels(levels: tuple[float, ...]) -> list[float]:
    """The table's keep levels and the midpoints between them."""
    mids = [(a + b) / 2 for a, b in itertools.pairwise(levels)]
    return sorted({round(v, 6) for v in (*levels, *mids)})


def generate(
    lm: LatencyModel,
    estimate: Callable[[Ratios], float],
    n_random: int,
    seed: int,
) -> list[Ratios]:
    """Uniform candidates, a greedy path down from dense, and random ones (deduplicated)."""
    levels = search_levels(lm.levels)
    groups = list(lm.groups)
    seen: dict[tuple[float, ...], Ratios] = {}

    def add(keep: dict[str, float]) -> None:
        r = {g: round(1.0 - keep[g], 6) for g in groups}
        seen.setdefault(tuple(r[g] for g in groups), r)

    for v in sorted({*levels, *(round(1.0 - r, 6) for r in ratio_steps(0.9))}):
        if v >= levels[0]:
            add(dict.fromkeys(groups, v))
    # greedy: least estimated loss added per predicted ms saved, one level at a time
    idx = dict.fromkeys(groups, len(levels) - 1)

    def ratios_of(ix: dict[str, int]) -> Ratios:
        return {g: round(1.0 - levels[i], 6) for g, i in ix.items()}

    while any(i > 0 for i in idx.values()):
        now = ratios_of(idx)
        t_now, e_now = lm.predict(now), estimate(now)
        best, best_cost = None, float("inf")
        for g in groups:
            if idx[g] == 0:
                continue
            trial = {**idx, g: idx[g] - 1}
            r = ratios_of(trial)
            saved = t_now - lm.predict(r)
            cost = (estimate(r) - e_now) / max(saved, 1e-9)
            if cost < best_cost:
                best, best_cost = g, cost
        assert best is not None
        idx[best] -= 1
        add({g: levels[i] for g, i in idx.items()})
    rng = np.random.default_rng(seed)
    for _ in range(n_random):
        add({g: float(rng.choice(levels)) for g in groups})
    return list(seen.values())


# ---------------------------------------------------------------------------- the plan


@dataclass
class PlanSetup:
    """What a plan (and the plan benchmark) builds before choosing candidates.

    Attributes:
        base_data: the recipe as data, with ``prune_channels`` at ``index``.
        index: position of the ``prune_channels`` stage.
        precision: ``int8`` or ``fp32``, the precision the latency tables time.
        stage: the ``prune_channels`` stage's data (``base_data["stages"][index]``).
        data: the loaded data set.
        example: a random input batch of 2 at the data's resolution.
        fresh: an untrained model of the recipe.
        lm: the built latency model.
    """

    base_data: dict[str, Any]
    index: int
    precision: str
    stage: dict[str, Any]
    data: Any
    example: Any
    fresh: Any
    lm: LatencyModel


def setup_latency_model(
    recipe: Recipe,
    runtime: str,
    threads: int,
    levels: tuple[float, ...] = LEVELS,
    *,
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    timing: dict[str, int] | None = None,
    say: Callable[[str], None] | None = None,
) -> PlanSetup:
    """Load the data, build the recipe's model and its measured latency model (cached).

    Args:
        recipe: a recipe with one ``prune_channels`` stage.
        runtime: ``onnxruntime`` or ``openvino``.
        threads: intra-op threads of every timing.
        levels: keep fractions of the latency tables (ascending, ending at 1.0).
        data_dir: folder holding the data sets.
        cache_dir: latency cache folder (default ``PQD_CACHE_DIR`` or ~/.cache/pqd/latency).
        timing: ``{"warmup", "repeats", "rounds"}`` of the latency model's panels.
        say: a one-line progress callback (default: silent).

    Returns:
        The :class:`PlanSetup`.
    """
    import torch

    from pqd.models import build_model
    from pqd.pipeline import recipe_data

    base_data, index, precision = template(recipe, runtime, threads)
    pc = base_data["stages"][index]
    data = recipe_data(recipe, data_dir)
    example = torch.rand(2, 3, *data.train_x.shape[-2:])
    fresh = build_model(
        recipe.model.name, data.num_classes, data.mean, data.std, **recipe.model.kwargs
    )
    lm = LatencyModel(
        fresh,
        example,
        runtime=runtime,
        threads=threads,
        precision=precision,
        levels=levels,
        round_to=pc.get("round_to", 8),
        exclude=tuple(pc.get("exclude", [])),
        cache_dir=cache_dir,
        say=say,
        **(timing or {}),
    ).build()
    return PlanSetup(base_data, index, precision, pc, data, example, fresh, lm)


def measured_scale(rows: list[dict[str, Any]]) -> float | None:
    """Median measured / predicted time over the ``rows`` already timed whole
    (``premeasured_ms``); None when none is."""
    ratios = [
        r["premeasured_ms"] / r["predicted_ms"]
        for r in rows
        if "premeasured_ms" in r and r["predicted_ms"] > 0
    ]
    return float(np.median(ratios)) if ratios else None


def widened(
    rows: list[dict[str, Any]], latency_ms: float, scale: float, tolerance: float
) -> list[dict[str, Any]]:
    """Candidates to try when the whole files ran faster than the calibrated model said:
    the model is calibrated on uniform networks, and a planned network's whole file can run
    well under the budget it was predicted to fill (ResNet-18 on an AVX-512 Xeon: 6-8% under),
    which leaves channels on the table that the hand-made uniform answer keeps. When the
    timed rows' median measured / predicted ratio is below ``scale`` by more than
    ``tolerance``, every prediction is scaled by it and the not yet timed rows that then meet
    the budget are returned, best first by the cheap estimate, each with its ``scale``.

    Args:
        rows: every candidate row (``predicted_ms``, ``estimated_loss``, ``premeasured_ms``
            once timed whole).
        latency_ms: the budget (ms).
        scale: the scale the rows were screened with (the near-budget calibration).
        tolerance: how far below ``scale`` the measured ratio must be (timing noise).

    Returns:
        The rows to screen next (empty when the timed files did not run faster).
    """
    measured = measured_scale(rows)
    if measured is None or measured >= scale * (1 - tolerance):
        return []
    best_first = sorted(rows, key=lambda r: (r["estimated_loss"], r["predicted_ms"]))
    return _admitted(best_first, latency_ms, measured)


def recalibrated(
    feasible: list[dict[str, Any]], latency_ms: float, above: float = 1.0
) -> list[dict[str, Any]]:
    """Candidates to try when the whole files measured over the budget: the latency model's
    median measured / predicted ratio over the rows already timed whole (``premeasured_ms``)
    scales every prediction, and the not yet timed candidates whose scaled prediction meets
    the budget are returned in ``feasible``'s order, each with its ``scale``.

    Args:
        feasible: candidate rows (``predicted_ms``, ``premeasured_ms`` once timed whole),
            best first by the cheap estimate.
        latency_ms: the budget (ms).
        above: the scale the rows were already screened with (1.0: the raw model).

    Returns:
        The rows to screen next (empty when the timed rows' median measured / predicted
        ratio does not exceed ``above``).
    """
    scale = measured_scale(feasible)
    if scale is None or scale <= above:
        return []
    return _admitted(feasible, latency_ms, scale)


def _admitted(pool: list[dict[str, Any]], latency_ms: float, scale: float) -> list[dict[str, Any]]:
    """The rows of ``pool`` not yet timed whole whose prediction times ``scale`` meets the
    budget (ms), in ``pool``'s order, each tagged with that ``scale``."""
    out = [r for r in pool if "premeasured_ms" not in r and r["predicted_ms"] * scale <= latency_ms]
    for r in out:
        r["scale"] = round(scale, 4)
    return out


def plan(
    recipe: Recipe | str | Path,
    latency_ms: float,
    out: str | Path,
    *,
    size_mb: float | None = None,
    threads: int | None = None,
    runtime: str | None = None,
    k: int = 3,
    validate: int = 20,
    n_random: int = 2000,
    screen: int = 16,
    calib_images: int = 256,
    levels: tuple[float, ...] = LEVELS,
    tolerance: float = 0.05,
    dense_ms: float | None = None,
    data_dir: str | None = None,
    executor: str = "sequential",
    workers: int | None = None,
    address: str | None = None,
    cache_dir: str | Path | None = None,
    timing: dict[str, int] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Plan (or resume planning) the most accurate candidate within ``latency_ms``.

    Args:
        recipe: the template job (model, data, baseline, stages; see module doc), or the
            path of its YAML file.
        latency_ms: budget, batch-1 p50 in milliseconds of the exported file.
        out: plan folder (created; the same call again resumes).
        size_mb: optional budget on the weights' size (MB, 1e6 bytes), predicted.
        threads: runtime threads (default: the recipe's ``measure.threads``).
        runtime: ``onnxruntime`` or ``openvino`` (default: the recipe's first runtime).
        k: candidates trained for real.
        validate: random whole candidates measured to report the latency model's error
            (0: none).
        n_random: random candidates estimated besides the uniform and greedy ones.
        screen: feasible candidates (best by the sensitivity estimate) whose adaptive-BN
            validation loss ranks them for training.
        calib_images: training images re-estimating BatchNorm statistics per screened one.
        levels: keep fractions of the latency tables (ascending, ending at 1.0).
        tolerance: fraction over the budget a measured pick may run (timing noise).
        dense_ms: the dense model's p50 (ms) the budget was set against, measured earlier
            (e.g. a benchmark's 0.5x of it); default: measured at the start. Every later
            panel times the dense network too and is scaled to it, so a machine that drifts
            during the plan does not move candidates across the budget.
        data_dir: folder holding the data sets.
        executor, workers, address: as ``pqd search`` (sequential, processes, Ray).
        cache_dir: latency cache folder (default ``PQD_CACHE_DIR`` or ~/.cache/pqd/latency).
        timing: ``{"warmup", "repeats", "rounds"}`` of the latency model's panels.
        progress: progress bars and lines.

    Returns:
        plan.json's data (the pick under ``"pick"``).
    """

    from pqd.data import resolve_data_root
    from pqd.measurement.runtime import available_runtimes
    from pqd.runs import check_executor

    t_start = time.perf_counter()
    if not isinstance(recipe, Recipe):
        from pqd.recipe import load_recipe

        recipe = load_recipe(recipe)
    if not latency_ms > 0:
        raise PqdError(f"--latency-ms {latency_ms} is not a budget", "give milliseconds > 0")
    if k < 1:
        raise PqdError(f"k {k} trains no candidate", "give k of 1 or more")
    executor = check_executor(executor, workers, address)
    runtime = runtime or next((r for r in recipe.measure.runtimes if r != "auto"), "onnxruntime")
    if runtime not in available_runtimes():
        raise PqdError(
            f"runtime {runtime!r} is not installed",
            f"pip install {runtime}, or use --runtime onnxruntime",
        )
    threads = threads or recipe.measure.threads
    out_dir = Path(out).resolve()
    data_root = str(resolve_data_root(data_dir, recipe.data.root))
    from pqd.progress import phases_shown

    # phase lines: with progress, or from the command (which shows them with --no-progress)
    say = _say if progress or phases_shown() else (lambda _m: None)

    # ---- 1. the latency model
    setup = setup_latency_model(
        recipe,
        runtime,
        threads,
        levels,
        data_dir=data_dir,
        cache_dir=cache_dir,
        timing=timing,
        say=say,
    )
    base_data, index, precision, pc = setup.base_data, setup.index, setup.precision, setup.stage
    data, example, fresh, lm = setup.data, setup.example, setup.fresh, setup.lm
    validation = lm.validate(validate) if validate > 0 else None
    if validation:
        say(
            f"latency model error over {validation['n']} random candidates: median "
            f"{100 * validation['median_error']:.1f}%, worst {100 * validation['worst_error']:.1f}%"
        )

    # ---- 2. refusals, from whole networks timed side by side
    fastest = lm.uniform(lm.levels[0])
    ends = lm.measure({"dense": {}, "fastest": fastest})
    if dense_ms is not None:  # the dense time the budget was set against: this panel on it
        ends = {"dense": dense_ms, "fastest": ends["fastest"] * dense_ms / ends["dense"]}
    dense_ref = ends["dense"]  # every later panel is scaled to it (measure_against_dense)
    label = precision.upper()
    if ends["dense"] <= latency_ms:
        raise PlanError(
            f"budget {latency_ms:g} ms is already met by the dense {label} model (measured p50 "
            f"{ends['dense']:.3f} ms on {runtime}, {threads} threads): nothing to prune",
            "run the recipe without channel pruning (pqd run), or give a smaller --latency-ms",
        )
    if ends["fastest"] > latency_ms * (1 + tolerance):
        raise PlanError(
            f"budget {latency_ms:g} ms is below every candidate: the fastest measured (every "
            f"channel group at keep {lm.levels[0]:g}) runs in {ends['fastest']:.3f} ms "
            f"({label}, {runtime}, {threads} threads)",
            f"give --latency-ms {ends['fastest']:.3f} or more",
        )

    # ---- 3. the shared baseline (trained once, or the recipe's checkpoint)
    from pqd.runs import Executor, file_digest, folder_status, reset_folder
    from pqd.search import baseline_trial

    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {"trained_now": 0, "reused": 0, "failed": 0}
    plain = recipe.model_copy(update={"search": None})
    with Executor(executor, workers, address, data_root, progress) as ex:
        base = baseline_trial(plain, data_root)
        base_dir = out_dir / base.folder
        results: dict[str, dict[str, Any]] = {}
        status = folder_status(base_dir, base.key)
        if status in ("missing", "partial"):  # a stopped one continues where it stopped
            say(f"baseline into {base_dir}" + (" (continuing)" if status == "partial" else ""))
            if status == "missing":
                reset_folder(base_dir, base)
            ex.run(
                [(base, base_dir)], lambda t, f, r: results.__setitem__(t.key, r), local_first=True
            )
            if not results[base.key]["ok"]:
                raise PqdError(
                    f"plan baseline: {results[base.key]['problem']}", results[base.key]["fix"]
                )
        checkpoint = base_dir / "baseline.safetensors"

        # ---- 4. candidates and their estimates
        from pqd.checkpoint import load_checkpoint
        from pqd.recipe import PruneChannelsSpec

        digest = file_digest(checkpoint)
        trained_base = load_checkpoint(copy.deepcopy(fresh), checkpoint).cpu().eval()
        spec = PruneChannelsSpec.model_validate(pc)
        rng = np.random.default_rng(recipe.seed)
        perm = rng.permutation(len(data.train_x))
        calib_x = data.train_x[np.sort(perm[:calib_images])]
        val_x, val_y = data.val_x, data.val_y
        if not len(val_x):  # no validation split: training images the BN pass did not see
            rest = np.sort(perm[calib_images : calib_images + 500])
            val_x, val_y = data.train_x[rest], data.train_y[rest]

        def abn(r: Ratios) -> tuple[float, float]:
            return adaptive_bn_eval(trained_base, example, r, spec, calib_x, val_x, val_y)

        sens = _cached_json(
            out_dir / SENSITIVITY_FILE,
            {
                "checkpoint": digest,
                "calib_images": calib_images,
                "seed": recipe.seed,
                "levels": list(lm.levels),
                "groups": dict(lm.groups),
                "round_to": spec.round_to,
                "exclude": list(spec.exclude),
                "data": recipe.data.model_dump(mode="json"),
                "val_images": len(val_x),
            },
            lambda: sensitivity_curves(lm, lambda r: abn(r)[1], search_levels(lm.levels), say),
        )

        def estimate(r: Ratios) -> float:
            return sensitivity_loss(sens, r)

        def select() -> dict[str, Any]:
            """Steps 3-4 (candidates, estimates, the uniform reference, screening, whole-file
            timing): the rows and which are trained."""
            cands = generate(lm, estimate, n_random, recipe.seed)

            # what a user does by hand, measured first: uniform pruning at the smallest ratio
            # whose whole file meets the budget; its window of uniform files near the budget also
            # calibrates the model there (scale = median measured / predicted)
            ref_ratio, ref_ms, uniform_ms = uniform_reference(
                lm, latency_ms, ratio_steps(spec.max_ratio), tolerance, dense_ref
            )
            scale = near_budget_scale(lm, uniform_ms, ref_ratio)
            rows: list[dict[str, Any]] = []
            for r in cands:
                pred = lm.predict(r)
                size = lm.predict_size_mb(r)
                feasible = pred * scale <= latency_ms and (size_mb is None or size <= size_mb)
                rows.append(
                    {
                        "ratios": r,
                        "predicted_ms": round(pred, 5),
                        "calibrated_ms": round(pred * scale, 5),
                        "predicted_size_mb": round(size, 4),
                        "estimated_loss": round(estimate(r), 6),
                        "feasible": feasible,
                    }
                )
            feasible = sorted(
                (row for row in rows if row["feasible"]),
                key=lambda row: (row["estimated_loss"], row["predicted_ms"]),
            )
            if not feasible:  # the model's error: the fastest measured met the budget
                fastest_row = min(rows, key=lambda row: float(row["predicted_ms"]))
                fastest_row["feasible"] = True
                feasible = [fastest_row]

            def screen_and_measure(pool: list[dict[str, Any]]) -> list[dict[str, Any]]:
                """Adaptive-BN ranking (validation loss) of the ``screen`` best of ``pool`` by
                the sensitivity estimate, and the best ``max(2k, 4)`` of those measured whole
                (the latency model's error must not put an over-budget candidate in training);
                the ones within the budget, best first."""
                screened = pool[:screen]
                say(f"adaptive-BN validation of the {len(screened)} best by sensitivity")
                for row in screened:
                    if "abn_loss" not in row:  # a re-screen meets rows the first one ranked
                        acc, loss = abn(row["ratios"])
                        row["abn_accuracy"], row["abn_loss"] = round(acc, 5), round(loss, 5)
                ranked = sorted(screened, key=lambda row: (row["abn_loss"], row["predicted_ms"]))
                head = ranked[: max(2 * k, 4)]
                times = measure_against_dense(
                    lm, {str(i): row["ratios"] for i, row in enumerate(head)}, dense_ref
                )
                for i, row in enumerate(head):
                    row["premeasured_ms"] = round(times[str(i)], 5)
                return [r for r in head if r["premeasured_ms"] <= latency_ms * (1 + tolerance)]

            chosen = screen_and_measure(feasible)[:k]
            if len(chosen) < k:  # the model under-predicted these: once more, scaled
                more = recalibrated(feasible, latency_ms, above=scale)
                if more:
                    say(f"latency model under-predicted by {more[0]['scale']:.2f}x: re-screening")
                    chosen += screen_and_measure(more)[: k - len(chosen)]
            else:  # the files ran faster than predicted: spend the budget they left
                wider = widened(rows, latency_ms, scale, tolerance)
                if wider:
                    over = scale / wider[0]["scale"]
                    say(f"latency model over-predicted by {over:.2f}x: re-screening")
                    more = screen_and_measure(wider)
                    both = sorted(chosen + more, key=lambda r: (r["abn_loss"], r["predicted_ms"]))
                    chosen = both[:k]
            # and always the hand-made answer (so the pick, by validation top-1, is never a worse
            # bet than it)
            ref = lm.uniform(1.0 - ref_ratio)
            same = next((r for r in rows if r["ratios"] == ref), None)
            ref_row = same or {
                "ratios": ref,
                "predicted_ms": round(lm.predict(ref), 5),
                "calibrated_ms": round(lm.predict(ref) * scale, 5),
                "predicted_size_mb": round(lm.predict_size_mb(ref), 4),
                "estimated_loss": round(estimate(ref), 6),
                "feasible": True,
            }
            if same is None:
                rows.append(ref_row)
            ref_row.update(uniform_reference=ref_ratio, premeasured_ms=round(ref_ms, 5))
            if all(r["ratios"] != ref for r in chosen):
                chosen.append(ref_row)
            return {
                "rows": rows,
                "chosen": [next(i for i, r in enumerate(rows) if r is c) for c in chosen],
                "scale": scale,
                "ref_ratio": ref_ratio,
                "ref_ms": ref_ms,
            }

        # a resumed plan trains what it chose before (timings on a noisy machine would
        # choose again, differently, and leave trained runs out of the pick)
        selection = _cached_json(
            out_dir / SELECTION_FILE,
            {
                "checkpoint": digest,
                "latency_ms": latency_ms,
                "size_mb": size_mb,
                "k": k,
                "screen": screen,
                "selection": 2,  # 2: also widened when the whole files ran faster
                "n_random": n_random,
                "calib_images": calib_images,
                "tolerance": tolerance,
                "seed": recipe.seed,
                "architecture": lm.architecture_key(),
                "machine": lm.key,
            },
            select,
        )
        rows = selection["rows"]
        chosen = [rows[i] for i in selection["chosen"]]
        scale, ref_ratio, ref_ms = (
            selection["scale"],
            selection["ref_ratio"],
            selection["ref_ms"],
        )
        say(
            f"{len(rows)} candidates estimated, {sum(r['feasible'] for r in rows)} feasible by "
            f"the latency model (x{scale:.3f} from the uniform files); training {len(chosen)} "
            f"(uniform reference: ratio {ref_ratio:g}, measured {ref_ms:.3f} ms)"
        )

        # ---- 5. training through the normal pipeline, resumable
        from pqd.runs import Trial, trial_key

        trials = []
        for i, row in enumerate(chosen):
            job = candidate_recipe(
                base_data, index, row["ratios"], f"{recipe.name}-plan-{i}", str(checkpoint)
            )
            order = tuple(s.stage for s in job.stages)
            epochs = tuple(s.epochs for s in job.stages)
            key = trial_key(job, digest, data_root)
            trials.append(Trial("plan", order, job.seed, epochs, job, key))
            row["key"] = trials[-1].key
        todo, to_measure = [], []
        for t in trials:
            folder = out_dir / _plan_folder(t)
            st = folder_status(folder, t.key)
            if st == "done":
                counts["reused"] += 1
            elif st == "trained":
                counts["reused"] += 1
                to_measure.append(folder)
            else:
                if st == "missing":  # a stopped one continues from its last step and epoch
                    reset_folder(folder, t)
                todo.append((t, folder))

        def finished(trial: Any, folder: Path, result: dict[str, Any]) -> None:
            if result["ok"]:
                counts["trained_now"] += 1
                to_measure.append(folder)
                say(f"trained {folder.name} in {result['seconds']:.0f} s")
            else:
                counts["failed"] += 1
                say(f"{folder.name} FAILED: {result['error']}")

        ex.run(todo, finished)
    from pqd.pipeline import measure_run

    for folder in to_measure:
        measure_run(folder, data_dir=data_root, progress=progress)

    # ---- 6. one panel of every final file, then the pick
    finals = {
        t.key: out_dir / _plan_folder(t) / "final.onnx"
        for t in trials
        if (out_dir / _plan_folder(t) / "record.json").is_file()
    }
    # with the dense network (exported as the latency model does): its p50 here scales the
    # panel to the dense time the budget was set against
    from pqd.latency_model import export_as_shipped

    dense_file = out_dir / "reference" / f"dense-{precision}-{lm.architecture_key()}.onnx"
    if not dense_file.is_file():
        dense_file.parent.mkdir(parents=True, exist_ok=True)
        export_as_shipped(lm.candidate_model({}), example, dense_file, int8=precision == "int8")
    timed = files_against_dense(lm, finals, dense_file, dense_ref)
    panel, drift = timed.ms, dense_ref / timed.dense_raw_ms
    trained = []
    for row, t in zip(chosen, trials, strict=True):
        folder = out_dir / _plan_folder(t)
        entry: dict[str, Any] = {**row, "dir": str(folder.relative_to(out_dir))}
        rec_path = folder / "record.json"
        if rec_path.is_file() and t.key in panel:
            final = json.loads(rec_path.read_text(encoding="utf-8"))["final"]
            entry.update(
                status="done",
                measured_ms=round(panel[t.key], 5),
                measured_raw_ms=round(panel[t.key] / drift, 5),
                measured_spread=round(timed.spread[t.key], 4),
                accuracy=final["accuracy"],
                val_accuracy=final.get("val_accuracy"),
                size_bytes=final["size_bytes"],
            )
        else:
            entry["status"] = "failed"
        trained.append(entry)
    ok = [e for e in trained if e["status"] == "done"]
    within = [e for e in ok if e["measured_ms"] <= latency_ms * (1 + tolerance)]
    pick, pick_rule = choose_pick(within, out_dir)
    result: dict[str, Any] = {
        "version": PLAN_VERSION,
        "recipe": recipe.name,
        "model": recipe.model.name,
        "budget": {"latency_ms": latency_ms, "size_mb": size_mb, "tolerance": tolerance},
        "runtime": runtime,
        "threads": threads,
        "precision": precision,
        "latency_model": {**lm.describe(), "validation": validation, "near_budget_scale": scale},
        "dense_ms": round(ends["dense"], 5),
        "final_panel_drift": round(drift, 4),
        "final_panels": FINAL_PANELS,
        "dense_file": str(dense_file.relative_to(out_dir)),
        "fastest_ms": round(ends["fastest"], 5),
        "counts": {
            "estimated": len(rows),
            "feasible": sum(r["feasible"] for r in rows),
            "trained": len(trained),
            **counts,
        },
        "candidates": rows,
        "trained": trained,
        "pick": pick,
        "pick_rule": pick_rule,
        "executor": executor,
        "timing_s": {"total": round(time.perf_counter() - t_start, 1)},
    }
    if pick is not None:
        pick_trial = next(t for t in trials if t.key == pick["key"])
        text = dump_recipe(pick_trial.recipe)
        (out_dir / PICK_FILE).write_text(
            f"# pqd plan's pick for {latency_ms:g} ms ({runtime}, {threads} threads): "
            f"pqd run {PICK_FILE} --out DIR reproduces it\n{text}",
            encoding="utf-8",
        )
        result["pick_recipe"] = PICK_FILE
    write_plan(result, out_dir)
    if pick is None:
        closest = min(ok, key=lambda e: e["measured_ms"]) if ok else None
        raise PlanError(
            f"no trained candidate met {latency_ms:g} ms when measured"
            + (f" (fastest: {closest['measured_ms']:.3f} ms)" if closest else " (all failed)"),
            f"see {out_dir / 'report.md'}; raise --latency-ms or -k, or re-run on a quieter "
            "machine",
        )
    return result


def choose_pick(
    within: list[dict[str, Any]], out_dir: Path, alpha: float = ALPHA
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The pick among the trained candidates that met the budget when measured.

    A planned candidate is picked only when its validation top-1 beats the uniform reference
    (the answer by hand) beyond noise: a paired comparison on the same validation images,
    exact McNemar, Holm-corrected over the planned candidates within the budget. The best
    of those by validation top-1 (then speed) is the pick; when none is, the uniform
    reference is. Without a uniform reference within the budget, the best by validation
    top-1. The pick's test top-1 is compared with the uniform reference's too (paired, on
    the test images), for the report: the test split never chooses.

    Args:
        within: trained, measured entries within the budget (``val_accuracy``,
            ``measured_ms``, ``dir`` relative to ``out_dir``, ``uniform_reference`` for the
            hand-made one).
        out_dir: the plan folder.
        alpha: family-wise level.

    Returns:
        ``(pick, rule)``: the pick's entry (or None) and what decided, with the comparisons.
    """
    from pqd.record import load_predictions

    def best(rows: list[dict[str, Any]]) -> dict[str, Any]:
        return max(rows, key=lambda e: (e["val_accuracy"] or 0.0, -e["measured_ms"]))

    if not within:
        return None, {"rule": "no candidate met the budget"}
    uniform = next((e for e in within if e.get("uniform_reference") is not None), None)
    planned = [e for e in within if e is not uniform]
    if uniform is None or not planned:
        return best(within), {"rule": "best validation top-1 (no uniform reference to beat)"}
    ref_val = load_predictions(out_dir / uniform["dir"], "val")
    tested: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for e in planned:
        val = load_predictions(out_dir / e["dir"], "val")
        if val is None or ref_val is None or len(val["labels"]) != len(ref_val["labels"]):
            continue
        vs = compare_paired(val["final"], ref_val["final"], val["labels"])
        tested.append((e, vs.as_dict()))
    if not tested:
        return best(within), {"rule": "best validation top-1 (no validation predictions)"}
    adjusted = holm([c["p_value"] for _, c in tested])
    beyond = []
    comparisons = []
    for (e, c), p_adj in zip(tested, adjusted, strict=True):
        wins = p_adj < alpha and c["difference"] > 0
        comparisons.append({"dir": e["dir"], **c, "p_holm": round(p_adj, 6), "beyond_noise": wins})
        if wins:
            beyond.append(e)
    pick = best(beyond) if beyond else uniform
    rule = {
        "rule": (
            "planned candidate: validation top-1 above the uniform reference beyond noise"
            if beyond
            else "uniform reference: no planned candidate beat it beyond noise on validation"
        ),
        "alpha": alpha,
        "validation_vs_uniform": comparisons,
    }
    if pick is not uniform:
        test_pick = load_predictions(out_dir / pick["dir"])
        test_ref = load_predictions(out_dir / uniform["dir"])
        if test_pick is not None and test_ref is not None:
            t = compare_paired(test_pick["final"], test_ref["final"], test_pick["labels"])
            rule["test_vs_uniform"] = {**t.as_dict(), "verdict": t.verdict("pick", "uniform")}
    return pick, rule


def _pick_rule_lines(rule: dict[str, Any]) -> list[str]:
    """The report's account of why the pick was picked (:func:`choose_pick`)."""
    from pqd.report import paired_text, points_text

    if not rule:
        return []
    lines = [f"Why: {rule['rule']}."]
    for c in rule.get("validation_vs_uniform", []):
        lines.append(
            f"- `{c['dir']}` vs the uniform reference on {c['n']} validation images: "
            f"{points_text(100 * c['difference'])} (95% CI {100 * c['ci_low']:+.2f} to "
            f"{100 * c['ci_high']:+.2f}), {c['a_only']} vs {c['b_only']} images only one gets "
            f"right, McNemar p = {c['p_value']:.3g} (Holm {c['p_holm']:.3g}): "
            + ("beyond noise" if c["beyond_noise"] else "within noise")
        )
    t = rule.get("test_vs_uniform")
    if t:
        lines += ["", paired_text(t, "pick", "uniform reference") + "."]
    return lines


def _plan_folder(trial: Any) -> str:
    return f"trials/plan-{trial.key[:12]}"


# ---------------------------------------------------------------------------- report


def write_plan(result: dict[str, Any], out: Path) -> None:
    """``plan.json``, ``report.md``, a self-contained ``report.html`` and ``plots/*.png``."""
    from pqd.checkpoint import atomic_write_text
    from pqd.markdown import markdown_html

    plots = _plots(result, out)
    text = report_markdown(result, plots)
    atomic_write_text(out / PLAN_FILE, json.dumps(result, indent=1))
    atomic_write_text(out / "report.md", text)
    images = {rel: (out / rel).read_bytes() for rel in plots.values()}
    atomic_write_text(out / "report.html", markdown_html(text, images))


def _plots(result: dict[str, Any], out: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = out / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    made = {}
    points = []
    val = (result["latency_model"].get("validation") or {}).get("candidates", [])
    points += [("validation", c["predicted_ms"], c["measured_ms"]) for c in val]
    points += [
        ("trained", e["predicted_ms"], e["measured_ms"])
        for e in result["trained"]
        if e.get("status") == "done"
    ]
    if points:
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        for kind, marker in (("validation", "o"), ("trained", "s")):
            xs = [p[1] for p in points if p[0] == kind]
            ys = [p[2] for p in points if p[0] == kind]
            if xs:
                ax.scatter(xs, ys, marker=marker, label=kind)
        lo = min(min(p[1], p[2]) for p in points)
        hi = max(max(p[1], p[2]) for p in points)
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="exact")
        ax.axhline(result["budget"]["latency_ms"], color="r", lw=0.8, label="budget")
        ax.set_xlabel("predicted p50 (ms)")
        ax.set_ylabel("measured p50 (ms)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / "latency.png", dpi=110)
        plt.close(fig)
        made["latency"] = "plots/latency.png"
    cands = result["candidates"]
    if cands:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        ax.scatter(
            [c["calibrated_ms"] for c in cands],
            [c["estimated_loss"] for c in cands],
            s=4,
            alpha=0.4,
            label="estimated",
        )
        tr = [e for e in result["trained"] if "calibrated_ms" in e]
        ax.scatter(
            [e["calibrated_ms"] for e in tr],
            [e["estimated_loss"] for e in tr],
            marker="s",
            color="k",
            label="trained",
        )
        ax.axvline(result["budget"]["latency_ms"], color="r", lw=0.8, label="budget")
        ax.set_xlabel("predicted p50, scaled near the budget (ms)")
        ax.set_ylabel("estimated val loss (sensitivity; lower: better)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / "frontier.png", dpi=110)
        plt.close(fig)
        made["frontier"] = "plots/frontier.png"
    return made


def report_markdown(result: dict[str, Any], plots: dict[str, str]) -> str:
    """The plan's report: budget, latency model error, trained candidates, the pick."""
    b = result["budget"]
    lm = result["latency_model"]
    v = lm.get("validation")
    c = result["counts"]
    lines = [
        f"# pqd plan: {result['model']} under {b['latency_ms']:g} ms",
        "",
        f"Target: {result['precision'].upper()} on {result['runtime']}, {result['threads']} "
        f"threads, batch 1 p50. Dense {result['precision'].upper()}: "
        f"{result['dense_ms']:.3f} ms; fastest candidate: {result['fastest_ms']:.3f} ms "
        "(measured in this run; with `dense_ms` given, dense is the caller's time and the "
        "fastest is scaled to it).",
        "",
        "## Latency model",
        "",
        f"{lm['pieces']} pieces ({lm['pieces_measured_now']} measured now, the rest from "
        f"`{lm['cache_file']}`), overhead {lm['overhead_ms']:.4f} ms, scale {lm['scale']:.3f}.",
    ]
    if v:
        lines.append(
            f"Error against {v['n']} random whole candidates: median "
            f"{100 * v['median_error']:.1f}%, worst {100 * v['worst_error']:.1f}%."
        )
    if lm.get("near_budget_scale") is not None:
        lines.append(
            f"Near the budget the uniform files measured {lm['near_budget_scale']:.3f}x the "
            "prediction; feasibility used the scaled prediction. Whole-file times are scaled "
            "to the dense time the budget was set against (this panel's dense file ran "
            f"{1 / result.get('final_panel_drift', 1.0):.3f}x it)."
        )
    if "latency" in plots:
        lines += ["", f"![predicted vs measured]({plots['latency']})"]
    lines += [
        "",
        "## Candidates",
        "",
        f"{c['estimated']} estimated, {c['feasible']} feasible by the model, {c['trained']} "
        f"trained ({c['trained_now']} now, {c['reused']} reused, "
        f"{c['failed']} failed).",
    ]
    if "frontier" in plots:
        lines += ["", f"![estimate vs predicted latency]({plots['frontier']})"]
    lines += [
        "",
        f"Measured ms: the median over {result.get('final_panels', 1)} panels of the trained "
        "files timed with the dense file, scaled to the dense time; in brackets the spread "
        "over the panels ((max - min) / median).",
        "",
        "| # | kind | predicted ms | measured ms | estimated loss | adaptive-BN val top-1 |"
        " val top-1 | test top-1 | size KB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, e in enumerate(result["trained"]):
        kind = (
            f"uniform {e['uniform_reference']:g} (by hand)"
            if e.get("uniform_reference") is not None
            else "planned"
        )
        abn = f"{100 * e['abn_accuracy']:.2f}" if e.get("abn_accuracy") is not None else "-"
        if e.get("status") != "done":
            lines.append(f"| {i} | {kind} | {e['predicted_ms']:.3f} | failed | | {abn} | | | |")
            continue
        spread = f" ({100 * e['measured_spread']:.1f}%)" if "measured_spread" in e else ""
        lines.append(
            f"| {i} | {kind} | {e['predicted_ms']:.3f} | {e['measured_ms']:.3f}{spread} | "
            f"{e['estimated_loss']:.4f} | {abn} | {100 * (e['val_accuracy'] or 0):.2f} | "
            f"{100 * e['accuracy']:.2f} | {e['size_bytes'] / 1e3:.1f} |"
        )
    p = result.get("pick")
    lines += ["", "## Pick", ""]
    if p:
        lines.append(
            f"`{p['dir']}`: measured {p['measured_ms']:.3f} ms (budget {b['latency_ms']:g}), "
            f"val top-1 {100 * (p['val_accuracy'] or 0):.2f}%, test top-1 "
            f"{100 * p['accuracy']:.2f}%. Recipe: `{PICK_FILE}` (`pqd run {PICK_FILE} --out DIR`)."
        )
        lines += ["", *_pick_rule_lines(result.get("pick_rule") or {})]
    else:
        lines.append("No trained candidate met the budget when measured.")
    return "\n".join(lines) + "\n"
