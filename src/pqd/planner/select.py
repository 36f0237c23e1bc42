"""Which candidates a plan trains (step 3 of :mod:`pqd.planner`): every candidate estimated,
the uniform reference measured, the best by the cheap estimate screened by adaptive-BN
validation loss and timed whole, the predictions rescaled when whole files ran off them,
and the uniform reference always trained beside the chosen."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pqd.latency_model import LatencyModel, Ratios
from pqd.planner.candidates import generate
from pqd.planner.latency import (
    measure_against_dense,
    near_budget_scale,
    ratio_steps,
    recalibrated,
    uniform_reference,
    widened,
)

Row = dict[str, Any]


@dataclass
class Screening:
    """What choosing the candidates needs.

    Attributes:
        lm: the built latency model.
        latency_ms: the budget (ms, batch-1 p50).
        size_mb: optional budget on the predicted weights' size (MB).
        tolerance: fraction over the budget a measured file may run.
        k: candidates to train besides the uniform reference.
        screen: candidates re-ranked by adaptive-BN validation loss.
        n_random: random candidates estimated besides the uniform and greedy ones.
        seed: the random candidates' seed.
        dense_ms: the dense p50 (ms) every panel is scaled to.
        max_ratio: the largest uniform pruning ratio tried for the reference.
        estimate: ratios -> cheap estimated loss (the sensitivity sum).
        abn: ratios -> (adaptive-BN validation top-1, loss).
        say: one-line progress callback.
    """

    lm: LatencyModel
    latency_ms: float
    size_mb: float | None
    tolerance: float
    k: int
    screen: int
    n_random: int
    seed: int
    dense_ms: float
    max_ratio: float
    estimate: Callable[[Ratios], float]
    abn: Callable[[Ratios], tuple[float, float]]
    say: Callable[[str], None]


def select(s: Screening) -> dict[str, Any]:
    """Estimate every candidate, measure the uniform reference, and choose what to train.

    Args:
        s: the :class:`Screening` inputs.

    Returns:
        ``{"rows", "chosen", "scale", "ref_ratio", "ref_ms"}``: every candidate row, the
        indices of the chosen in ``rows``, the near-budget scale of the predictions, the
        uniform reference's ratio and its measured p50 (ms).
    """
    cands = generate(s.lm, s.estimate, s.n_random, s.seed)
    # what a user does by hand, measured first: uniform pruning at the smallest ratio whose
    # whole file meets the budget; its window of uniform files near the budget also
    # calibrates the model there (scale = median measured / predicted)
    ref_ratio, ref_ms, uniform_ms = uniform_reference(
        s.lm, s.latency_ms, ratio_steps(s.max_ratio), s.tolerance, s.dense_ms
    )
    scale = near_budget_scale(s.lm, uniform_ms, ref_ratio)
    rows = [estimated_row(s, r, scale) for r in cands]
    chosen = choose(s, rows, scale)
    # and always the hand-made answer (so the pick, by validation top-1, is never a worse bet
    # than it)
    ref = s.lm.uniform(1.0 - ref_ratio)
    ref_row = next((r for r in rows if r["ratios"] == ref), None)
    if ref_row is None:
        ref_row = estimated_row(s, ref, scale)
        ref_row["feasible"] = True
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


def estimated_row(s: Screening, ratios: Ratios, scale: float) -> Row:
    """One candidate's row: predicted and calibrated p50 (ms), predicted size (MB), the
    estimated loss, and whether the calibrated prediction meets the budgets."""
    pred = s.lm.predict(ratios)
    size = s.lm.predict_size_mb(ratios)
    feasible = pred * scale <= s.latency_ms and (s.size_mb is None or size <= s.size_mb)
    return {
        "ratios": ratios,
        "predicted_ms": round(pred, 5),
        "calibrated_ms": round(pred * scale, 5),
        "predicted_size_mb": round(size, 4),
        "estimated_loss": round(s.estimate(ratios), 6),
        "feasible": feasible,
    }


def choose(s: Screening, rows: list[Row], scale: float) -> list[Row]:
    """The ``k`` best feasible rows after screening, rescreened once when the whole files ran
    slower (too few within the budget) or faster (budget left) than predicted."""
    feasible = sorted(
        (row for row in rows if row["feasible"]),
        key=lambda row: (row["estimated_loss"], row["predicted_ms"]),
    )
    if not feasible:  # the model's error: the fastest measured met the budget
        fastest_row = min(rows, key=lambda row: float(row["predicted_ms"]))
        fastest_row["feasible"] = True
        feasible = [fastest_row]
    chosen = screen_and_measure(s, feasible)[: s.k]
    if len(chosen) < s.k:  # the model under-predicted these: once more, scaled
        more = recalibrated(feasible, s.latency_ms, above=scale)
        if more:
            s.say(f"latency model under-predicted by {more[0]['scale']:.2f}x: re-screening")
            chosen += screen_and_measure(s, more)[: s.k - len(chosen)]
    else:  # the files ran faster than predicted: spend the budget they left
        wider = widened(rows, s.latency_ms, scale, s.tolerance)
        if wider:
            s.say(f"latency model over-predicted by {scale / wider[0]['scale']:.2f}x: re-screening")
            more = screen_and_measure(s, wider)
            both = sorted(chosen + more, key=lambda r: (r["abn_loss"], r["predicted_ms"]))
            chosen = both[: s.k]
    return chosen


def screen_and_measure(s: Screening, pool: list[Row]) -> list[Row]:
    """Adaptive-BN ranking (validation loss) of the ``screen`` best of ``pool`` by the
    sensitivity estimate, and the best ``max(2k, 4)`` of those measured whole (the latency
    model's error must not put an over-budget candidate in training).

    Args:
        s: the :class:`Screening` inputs.
        pool: candidate rows, best first by the estimate.

    Returns:
        The measured rows within the budget (and tolerance), best first.
    """
    screened = pool[: s.screen]
    s.say(f"adaptive-BN validation of the {len(screened)} best by sensitivity")
    for row in screened:
        if "abn_loss" not in row:  # a re-screen meets rows the first one ranked
            acc, loss = s.abn(row["ratios"])
            row["abn_accuracy"], row["abn_loss"] = round(acc, 5), round(loss, 5)
    ranked = sorted(screened, key=lambda row: (row["abn_loss"], row["predicted_ms"]))
    head = ranked[: max(2 * s.k, 4)]
    times = measure_against_dense(
        s.lm, {str(i): row["ratios"] for i, row in enumerate(head)}, s.dense_ms
    )
    for i, row in enumerate(head):
        row["premeasured_ms"] = round(times[str(i)], 5)
    return [r for r in head if r["premeasured_ms"] <= s.latency_ms * (1 + s.tolerance)]
