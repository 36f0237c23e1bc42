"""What a plan wrote: ``plan.json``, its report and plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pqd.latency_model import validation_text
from pqd.planner.latency import FINAL_PANELS
from pqd.planner.template import PICK_FILE, PLAN_FILE


def pick_rule_lines(rule: dict[str, Any]) -> list[str]:
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


def write_plan(result: dict[str, Any], out: Path) -> None:
    """``plan.json``, ``report.md``, a self-contained ``report.html`` and ``plots/*.png``."""
    from pqd.checkpoint import atomic_write_text
    from pqd.markdown import markdown_html

    plots = plan_plots(result, out)
    text = report_markdown(result, plots)
    atomic_write_text(out / PLAN_FILE, json.dumps(result, indent=1))
    atomic_write_text(out / "report.md", text)
    images = {rel: (out / rel).read_bytes() for rel in plots.values()}
    atomic_write_text(out / "report.html", markdown_html(text, images))


def plan_plots(result: dict[str, Any], out: Path) -> dict[str, str]:
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
        made["latency"] = _save(
            fig, ax, folder / "latency.png", "predicted p50 (ms)", "measured p50 (ms)"
        )
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
        made["frontier"] = _save(
            fig,
            ax,
            folder / "frontier.png",
            "predicted p50, scaled near the budget (ms)",
            "estimated val loss (sensitivity; lower: better)",
        )
    return made


def _save(fig: Any, ax: Any, path: Path, xlabel: str, ylabel: str) -> str:
    """Label the axes, add the legend, write ``path`` (110 dpi) and close the figure; returns
    the path relative to the plan folder, as the report links it."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plots/{path.name}"


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
        lines.append(f"Error against {v['n']} random whole candidates: {validation_text(v)}.")
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
        "over the panels ((max - min) / median), and their number for a file whose panels "
        "fell on both sides of the budget (timed once more, decided on all of them).",
        "",
        "| # | kind | predicted ms | measured ms | estimated loss | adaptive-BN val top-1 |"
        " val top-1 | test top-1 | size KB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [trained_row(i, e) for i, e in enumerate(result["trained"])]
    p = result.get("pick")
    lines += ["", "## Pick", ""]
    if p:
        lines.append(
            f"`{p['dir']}`: measured {p['measured_ms']:.3f} ms (budget {b['latency_ms']:g}), "
            f"val top-1 {100 * (p['val_accuracy'] or 0):.2f}%, test top-1 "
            f"{100 * p['accuracy']:.2f}%. Recipe: `{PICK_FILE}` (`pqd run {PICK_FILE} --out DIR`)."
        )
        lines += ["", *pick_rule_lines(result.get("pick_rule") or {})]
    else:
        lines.append("No trained candidate met the budget when measured.")
    return "\n".join(lines) + "\n"


def trained_row(i: int, e: dict[str, Any]) -> str:
    """One trained candidate's row of the report's table (``failed`` when it has none)."""
    kind = (
        f"uniform {e['uniform_reference']:g} (by hand)"
        if e.get("uniform_reference") is not None
        else "planned"
    )
    abn = f"{100 * e['abn_accuracy']:.2f}" if e.get("abn_accuracy") is not None else "-"
    if e.get("status") != "done":
        return f"| {i} | {kind} | {e['predicted_ms']:.3f} | failed | | {abn} | | | |"
    spread = f" ({100 * e['measured_spread']:.1f}%)" if "measured_spread" in e else ""
    if e.get("measured_panels", 0) > FINAL_PANELS:  # timed again: on the budget's edge
        spread = spread[:-1] + f", {e['measured_panels']} panels)" if spread else ""
    return (
        f"| {i} | {kind} | {e['predicted_ms']:.3f} | {e['measured_ms']:.3f}{spread} | "
        f"{e['estimated_loss']:.4f} | {abn} | {100 * (e['val_accuracy'] or 0):.2f} | "
        f"{100 * e['accuracy']:.2f} | {e['size_bytes'] / 1e3:.1f} |"
    )
