"""The pick rule of a plan (step 6 of :mod:`pqd.planner`): a planned candidate only when it
beats the uniform reference beyond noise on validation, else the uniform reference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pqd.stats import ALPHA, compare_paired, holm


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
    rule: dict[str, Any] = {
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
