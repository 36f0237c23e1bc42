"""Latency in a plan: whole files timed against the dense network, the uniform reference,
the latency model calibrated near the budget and its rescaling when files ran off it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from pqd.errors import PqdError
from pqd.latency_model.model import LEVELS, LatencyModel, Ratios
from pqd.planner.template import template
from pqd.recipe import Recipe

if TYPE_CHECKING:
    from pqd.dataset import Dataset

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
    samples: dict[str, list[float]]  # name -> its scaled p50 in each panel (ms)
    dense_raw: list[float]  # the dense file's raw p50 in each panel (ms)


def _panel_of(scaled: dict[str, list[float]], dense_raw: list[float]) -> FilePanel:
    ms = {n: float(np.median(v)) for n, v in scaled.items()}
    spread = {n: (max(v) - min(v)) / ms[n] if ms[n] > 0 else 0.0 for n, v in scaled.items()}
    return FilePanel(ms, float(np.median(dense_raw)), spread, scaled, dense_raw)


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
    return _panel_of(scaled, dense_raw)


def settle_borderline(
    lm: LatencyModel,
    timed: FilePanel,
    paths: dict[str, Path],
    dense_file: Path,
    dense_ms: float,
    limit_ms: float,
    panels: int = FINAL_PANELS,
) -> tuple[FilePanel, list[str]]:
    """Time once more the files whose panels fell on both sides of ``limit_ms``, and decide
    on the median of all their panels. On a shared 2-core VM the panels of one file spread
    by 6-24%, wider than the budget's 5% tolerance, so a file whose panels straddle the
    line is in or out by chance; twice the panels halve the variance of its median. Files
    whose panels all fall on one side keep their panels.

    Args:
        lm: the latency model (its runtime, threads and timing).
        timed: the first panels (:func:`files_against_dense`).
        paths: name -> ONNX file, as timed.
        dense_file: the dense network's file.
        dense_ms: the dense p50 (ms) the budget was set against.
        limit_ms: the budget with its tolerance (ms).
        panels: how many panels more for each borderline file.

    Returns:
        The panel with the borderline files' samples merged, and their names.
    """
    border = sorted(
        n for n, v in timed.samples.items() if n in paths and min(v) <= limit_ms < max(v)
    )
    if not border:
        return timed, []
    again = files_against_dense(lm, {n: paths[n] for n in border}, dense_file, dense_ms, panels)
    scaled = {n: v + again.samples[n] if n in border else v for n, v in timed.samples.items()}
    return _panel_of(scaled, timed.dense_raw + again.dense_raw), border


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
    data: Dataset
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
        cache_dir: latency cache folder (default ``$PQD_CACHE_DIR/latency``, ~/.cache/pqd/latency).
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
    return admitted(best_first, latency_ms, measured)


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
    return admitted(feasible, latency_ms, scale)


def admitted(pool: list[dict[str, Any]], latency_ms: float, scale: float) -> list[dict[str, Any]]:
    """The rows of ``pool`` not yet timed whole whose prediction times ``scale`` meets the
    budget (ms), in ``pool``'s order, each tagged with that ``scale``."""
    out = [r for r in pool if "premeasured_ms" not in r and r["predicted_ms"] * scale <= latency_ms]
    for r in out:
        r["scale"] = round(scale, 4)
    return out
