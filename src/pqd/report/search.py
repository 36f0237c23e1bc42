"""The report of a search (``report.md``, ``report.html``), rendered from ``search.json``."""

from __future__ import annotations

from typing import Any

from pqd.markdown import (
    html_figure,
    html_page,
    html_table,
    md_inline,
    ordered_groups,
    table,
)
from pqd.progress import plural
from pqd.report.plots import search_plots
from pqd.report.text import ci_text, points_text, speed_text

SEARCH_HEADER = [
    "rank",
    "kind",
    "order",
    "epochs",
    "top-1",
    "95% CI",
    "± sd",
    "MB",
    "p50 ms",
    "p90 ms",
    "speedup",
    "precision",
    "sparsity",
    "Pareto",
]


def search_rows(search: dict[str, Any]) -> list[list[str]]:
    """One row per kind and order (seeds aggregated): the search's summary table."""
    rows = []
    for g in ordered_groups(search):
        if not g["n"]:
            rows.append(
                [
                    str(g.get("rank", "-")),
                    g["kind"],
                    g["label"],
                    "/".join(map(str, g["epochs"])),
                    "failed",
                    "",
                    "",
                    "",
                    "",
                    "",
                    "",
                    "",
                    "",
                    "",
                ]
            )
            continue
        sd = f"{100 * g['accuracy_std']:.2f}" if g["n"] > 1 else "-"
        label = g["label"] if g.get("parity_ok", True) else f"{g['label']} (PARITY FAILED)"
        rows.append(
            [
                str(g.get("rank", "-")),
                g["kind"],
                label,
                "/".join(map(str, g["epochs"])) or "-",
                f"{100 * g['accuracy_mean']:.2f}%",
                ci_text(g.get("accuracy_ci")) or "-",
                sd,
                f"{g['size_bytes'] / 1e6:.2f}",
                f"{g['latency_p50_ms']:.3f}",
                f"{g['latency_p90_ms']:.3f}",
                f"{g['speedup_vs_baseline']:.2f}x",
                g["precision"],
                f"{100 * g['sparsity']:.0f}%",
                "yes" if g.get("pareto") else "",
            ]
        )
    return rows


PAIR_HEADER = [
    "pair (A, B)",
    "A -> B top-1",
    "B -> A top-1",
    "A -> B minus B -> A",
    "95% CI",
    "p (Holm)",
    "A -> B p50 ms",
    "B -> A p50 ms",
    "goes first",
    "decided by",
]


def pairwise_rows(search: dict[str, Any]) -> list[list[str]]:
    """One row per stage pair: both orders' accuracy and latency, and the decision."""
    rows = []
    for r in (search.get("pairwise") or {}).get("table", []):

        def acc(x: float | None) -> str:
            return "failed" if x is None else f"{100 * x:.2f}%"

        def ms(x: float | None) -> str:
            return "-" if x is None else f"{x:.3f}"

        margin = "-" if r["margin_points"] is None else f"{r['margin_points']:+.2f} pts"
        pr = r.get("paired")
        ci = "-" if not pr else f"{100 * pr['ci_low']:+.2f} to {100 * pr['ci_high']:+.2f}"
        rows.append(
            [
                f"{r['a']}, {r['b']}",
                acc(r["ab_accuracy"]),
                acc(r["ba_accuracy"]),
                margin,
                ci,
                "-" if not pr else f"{pr['p_holm']:.3g}",
                ms(r["ab_p50_ms"]),
                ms(r["ba_p50_ms"]),
                r["first"] or "tie",
                r["decided_by"],
            ]
        )
    return rows


ORDER_PAIR_HEADER = ["A", "B", "A minus B", "95% CI", "seed sd", "p (Holm)", "verdict"]


def order_pair_rows(search: dict[str, Any]) -> list[list[str]]:
    """One row per pair of full orders (``search.json``'s ``order_pairs``): the difference
    in points with its paired interval, the spread of the per-seed differences, the
    Holm-adjusted McNemar p and the verdict."""
    labels = {g["id"]: g["label"] for g in search["groups"]}
    rows = []
    for r in search.get("order_pairs") or []:
        a, b = labels.get(r["a"], r["a"]), labels.get(r["b"], r["b"])
        verdict = {"a": f"{a} better", "b": f"{b} better"}.get(r["verdict"], "tie")
        rows.append(
            [
                a,
                b,
                points_text(100 * r["difference"]),
                f"{100 * r['ci_low']:+.2f} to {100 * r['ci_high']:+.2f}",
                f"{100 * r['seed_sd']:.2f}" if r["seeds"] > 1 else "-",
                f"{r['p_holm']:.3g}",
                verdict,
            ]
        )
    return rows


def order_pairs_note(search: dict[str, Any]) -> str:
    """What the table of every pair of full orders holds."""
    c = search["criterion"]
    return (
        "Every pair of full orders on the same test images of each seed: A minus B in "
        "points with the paired-bootstrap 95% CI over all (seed, image) pairs, the sd of the "
        "per-seed differences (points), the exact McNemar p pooled over the seeds, "
        f"Holm-adjusted over the {len(search.get('order_pairs') or [])} pairs; a verdict "
        f"needs p (Holm) below {c.get('alpha', 0.05):g}"
        + (
            f" and a difference of at least {c['min_effect_points']:g} points"
            if c.get("min_effect_points")
            else ""
        )
        + " (and, where the seeds disagree more than the images explain, a per-seed "
        "interval that excludes 0)."
    )


def derived_order_text(search: dict[str, Any]) -> str:
    """One line: the pairwise topological order, or the cycle or ties that prevent one."""
    pw = search.get("pairwise")
    if not pw:
        return "Pairwise search not run (search.mode: permutations)."
    if pw["cycle"]:
        cyc = ", ".join(f"{a} before {b}" for a, b in pw["cycle"])
        return (
            f"Pairwise wins form a cycle ({cyc}): they contradict each other, so no "
            "order is derived."
        )
    if not pw["edges"]:
        return (
            "Every pair tied under the criterion (no accuracy difference significant at "
            f"{search['criterion'].get('alpha', 0.05):g} after Holm's correction, latencies "
            f"within {100 * latency_tolerance(search):.3g}%): the pairwise "
            "results prefer no order."
        )
    by_latency = [
        f"{r['first']} before {r['b'] if r['first'] == r['a'] else r['a']}"
        for r in pw.get("table", [])
        if r.get("first") and r.get("decided_by") == "latency"
    ]
    note = f" ({', '.join(by_latency)}: by latency, the accuracies tie)" if by_latency else ""
    if pw["unique"]:
        return f"Pairwise order: **{' -> '.join(pw['order'])}**{note}."
    wins = ", ".join(f"{a} before {b}" for a, b in pw["edges"])
    tied = ", ".join(f"{a} / {b}" for a, b in pw["ties"])
    return (
        f"Pairwise wins give a partial order ({wins}; tied: {tied}); one order "
        f"consistent with it: **{' -> '.join(pw['order'])}** (not unique){note}."
    )


def _runs_text(search: dict[str, Any]) -> str:
    runs = search["runs"]
    pm, ps = runs["pairwise_method"], runs["permutation_search"]
    pairwise = f"{plural(pm['runs'], 'two-stage run')} ({plural(pm['epochs'], 'epoch')})"
    full = f"{plural(ps['runs'], 'run')} ({plural(ps['epochs'], 'epoch')})"
    if not search.get("pairwise"):  # permutations only: say what pairwise would have cost
        return (
            f"Full permutation search: {full}; the pairwise method (not run) would need {pairwise}."
        )
    return f"Pairwise method: {pairwise}; full permutation search: {full}."


def _best_text(search: dict[str, Any]) -> list[str]:
    best = next((g for g in search["groups"] if g["id"] == search.get("best")), None)
    if best is None:
        return []
    lines = [
        f"Best order by the criterion: **{best['label']}** "
        f"({100 * best['accuracy_mean']:.2f}% top-1, {best['size_bytes'] / 1e6:.2f} MB, "
        f"{best['latency_p50_ms']:.3f} ms p50)."
    ]
    for v in search.get("best_vs_references", []):
        ref = v["reference"].split(":", 1)[1]
        verdict = "dominates it" if v["best_dominates"] else "does not dominate it"
        lines.append(
            f"- vs {ref} only: {points_text(v['accuracy_points'])}, "
            f"{v['size_ratio']:.2f}x smaller, {speed_text(v['speedup'])}: "
            f"the best order {verdict}"
        )
    return lines


def _search_intro(search: dict[str, Any]) -> list[str]:
    """Paragraphs above the tables: what ran, the derived order, run counts, the best order."""
    alloc, runs, data = search["allocation"], search["runs"], search["data"]
    recipe = search["recipe"]
    seeds = recipe["search"]["seeds"]
    return [
        f"Stages {', '.join(search['stages'])} on `{recipe['model']['name']}`, {data['name']} "
        f"({data['train']} train / {data['val']} val / {data['test']} test images); "
        f"{runs['unique_runs']} runs ({runs['permutation']} full orders, {runs['pairwise']} "
        f"pairwise, {runs['reference']} single-technique, 1 baseline) for seed(s) "
        f"{', '.join(map(str, seeds))}. Budget per position: "
        f"{', '.join(f'{b:g}%' for b in alloc['budget'])} of "
        f"{plural(alloc['total_epochs'], 'epoch')} = "
        f"{'/'.join(map(str, alloc['permutation_epochs']))} "
        f"{'epoch' if alloc['permutation_epochs'] == [1] else 'epochs'}.",
        derived_order_text(search),
        _runs_text(search),
        *_best_text(search),
    ]


def parity_failed_text(search: dict[str, Any]) -> str:
    """What "(PARITY FAILED)" in the results table means, with each such order's measured
    agreement and threshold (empty when every order passed)."""
    bad = [g for g in ordered_groups(search) if g.get("n") and not g.get("parity_ok", True)]
    if not bad:
        return ""
    details = "; ".join(
        f"{g['label']}: {'; '.join(g.get('parity_problems') or ['see its record.json'])}"
        for g in bad
    )
    return (
        "PARITY FAILED: the deployed ONNX file does not answer as its torch model does: the "
        "share of test images whose top-1 class differs between the file and the torch "
        "model is above 1 - export.parity_min_agreement (default 0.99, so 1%) beyond the "
        "noise of the images compared (its 95% interval lies wholly above), or the file "
        "can saturate this CPU's INT8 sums; its top-1 is then not the trained model's. "
        f"{details}."
    )


def _results_note(search: dict[str, Any]) -> str:
    panel = search["latency_panel"]
    parity = parity_failed_text(search)
    return (
        f"top-1: the deployed artifact's own accuracy on the test split (mean over seeds, "
        f"± sample sd over seeds; 95% CI: Wilson on the test images of all seeds pooled, "
        f"test-set noise only). Latency: batch-1 wall clock on {panel['runtime']} with "
        f"{panel['threads']} threads, every artifact timed side by side in one interleaved "
        f"panel on {panel['host']} ({panel['cpu']}); speedup vs the FP32 baseline in that "
        f"panel.{_noise_floor(search)} Pareto: not dominated in (top-1 up, MB down, p50 "
        f"down), latencies within {100 * latency_tolerance(search):.3g}% and sizes within 1% "
        "counted as equal." + (f" {parity}" if parity else "")
    )


def latency_tolerance(search: dict[str, Any]) -> float:
    """The relative latency difference below which two artifacts count as equally fast
    (fraction): the recipe's ``tie_latency``, or the panel's spread between files of one
    graph where that is wider (searches written before that spread was kept: the former)."""
    c = search["criterion"]
    return float(c.get("latency_tolerance", c["tie_latency"]))


def _noise_floor(search: dict[str, Any]) -> str:
    """The panel's spread between results of one graph, in words ("" when none was kept)."""
    same = search["latency_panel"].get("identical_graphs")
    if not same:
        return ""
    labels = {g["id"]: g["label"] for g in search["groups"]}
    a, b = (labels.get(n, n) for n in same["names"])
    graphs = "one graph" if same["graphs"] == 1 else f"{same['graphs']} graphs"
    return (
        f" Results whose files share one graph (the same kernels on the same shapes; "
        f"{same['count']} results in {graphs}) differed by up to {100 * same['spread']:.1f}% "
        f"in this panel ({a} against {b}): the panel's noise floor."
    )


def _pairwise_note(search: dict[str, Any]) -> str:
    return (
        f"Criterion: {search['criterion']['text']}. Each pairwise run gets "
        f"{'/'.join(map(str, search['allocation']['pairwise_epochs']))} epochs (the first "
        "two positions of a full order). 95% CI: paired bootstrap of A -> B minus B -> A "
        "over the test images of every seed; p (Holm): exact McNemar on the images only one "
        "order gets right, adjusted over the pairs."
        + "".join(f" {line}" for line in unresolved_text(search))
    )


def seed_disagreement_text(paired: dict[str, Any], alpha: float) -> str | None:
    """Why a pair that the pooled test finds significant is still a tie: its seeds disagree
    more than their test images explain (Cochran's Q below ``alpha``) and the per-seed
    t-interval holds 0 (:func:`pqd.stats.decide`).

    Args:
        paired: the pair's paired comparison (``difference``, ``p_holm``, ``per_seed``,
            ``seed_ci``, ``heterogeneity_p``: fractions and p-values).
        alpha: the search's significance level.

    Returns:
        e.g. ``"significant over the pooled images (p (Holm) 0.0065), but the seeds disagree
        ..."``; None where the pooled test alone decides.
    """
    het, ci = paired.get("heterogeneity_p"), paired.get("seed_ci")
    p = paired.get("p_holm")
    if het is None or ci is None or p is None or het >= alpha or p >= alpha:
        return None
    if not ci[0] <= 0 <= ci[1]:
        return None
    seeds = ", ".join(f"{100 * d + 0.0:+.2f}" for d in paired.get("per_seed", []))
    return (
        f"significant over the pooled images (p (Holm) {p:.2g}), but the seeds disagree more "
        f"than their images explain (per seed {seeds} points; Cochran's Q p {het:.2g}) and "
        f"the per-seed 95% CI, {100 * ci[0] + 0.0:+.2f} to {100 * ci[1] + 0.0:+.2f} points, "
        "holds 0"
    )


def search_alpha(search: dict[str, Any]) -> float:
    """The search's significance level (``search.alpha`` of its recipe; 0.05 by default)."""
    return float(((search.get("recipe") or {}).get("search") or {}).get("alpha", 0.05))


def unresolved_text(search: dict[str, Any]) -> list[str]:
    """For each pair whose accuracies tie (no order, or one decided by latency) with a
    measured difference: how many test images (per seed) or seeds would resolve it at the
    observed effect (80% power); where the seeds disagree beyond the images
    (:func:`seed_disagreement_text`), only more seeds would."""
    out = []
    alpha = search_alpha(search)
    for r in (search.get("pairwise") or {}).get("table", []):
        pr = r.get("paired")
        if r.get("decided_by") == "accuracy" or not pr or not pr["difference"]:
            continue
        seeds_differ = seed_disagreement_text(pr, alpha)
        if seeds_differ:
            more = pr.get("seeds_to_resolve")
            out.append(
                f"{r['a']} / {r['b']} ({points_text(100 * pr['difference'])}) ties although "
                f"{seeds_differ}"
                + (f": about {more} seeds would resolve it at that effect." if more else ".")
            )
            continue
        need = []
        if pr.get("images_to_resolve"):
            need.append(f"{pr['images_to_resolve']:,} test images per seed")
        if pr.get("seeds_to_resolve"):
            need.append(f"{pr['seeds_to_resolve']} seeds")
        if need:
            out.append(
                f"{r['a']} / {r['b']} ({points_text(100 * pr['difference'])}) would need about "
                f"{' or '.join(need)} to resolve at that effect."
            )
    return out


def _footer(search: dict[str, Any]) -> list[str]:
    lines = [
        f"Per-trial records: `trials/*/record.json` (`baseline/record.json` for the "
        f"baseline); everything here is rendered from `search.json`. Time: "
        f"{_timing_text(search)}."
    ]
    if search["data"].get("subset_note"):
        lines.append(f"Note: {search['data']['subset_note']}")
    return lines


def _failed_lines(search: dict[str, Any]) -> list[str]:
    return [
        f"{t['kind']} {t['label']} seed {t['seed']}: {t.get('error')}"
        for t in search["trials"]
        if t["status"] != "done"
    ]


def render_search_markdown(search: dict[str, Any], plots: list[str] | None = None) -> str:
    """report.md of a search (``plots``: PNG file names under ``plots/`` to link)."""
    intro = _search_intro(search)
    lines = [f"# pqd search: {search['name']}", ""]
    for para in intro:
        lines += [para, ""] if not para.startswith("- ") else [para]
    lines += [
        "",
        "## All results",
        "",
        table(SEARCH_HEADER, search_rows(search)),
        "",
        _results_note(search),
        "",
    ]
    from pqd.report_audit import search_audit_lines

    lines += search_audit_lines(search)
    sections = (
        (
            "order_pairs",
            "Every pair of full orders",
            order_pairs_note,
            ORDER_PAIR_HEADER,
            order_pair_rows,
        ),
        ("pairwise", "Pairwise order wins", _pairwise_note, PAIR_HEADER, pairwise_rows),
    )
    for key, title, note, header, rows in sections:
        if search.get(key):
            lines += [f"## {title}", "", note(search), "", table(header, rows(search)), ""]
    failed = _failed_lines(search)
    if failed:
        lines += ["## Failed trials", "", *[f"- {f}" for f in failed], ""]
    if plots:
        lines += ["## Plots", "", *[f"![{p}](plots/{p})" for p in plots], ""]
    for para in _footer(search):
        lines += [para, ""]
    return "\n".join(lines)


def _timing_text(search: dict[str, Any]) -> str:
    t = search.get("timing_s") or {}
    if not t:
        return "-"
    text = (
        f"{t['total']:.0f} s in the last invocation (training {t['train']:.0f} s, measuring "
        f"{t['measure']:.0f} s, latency panel {t['panel']:.0f} s; {search['runs']['reused']} "
        f"runs reused, {search['runs']['trained_now']} trained now)"
    )
    steps = t.get("steps")
    if steps:
        text += (
            f"; the trials' and the baseline's steps took {steps['once']:,.0f} s over every "
            f"invocation, a shared stage counted once ({steps['every']:,.0f} s had every "
            "trial trained its own)"
        )
    return text


def render_search_html(search: dict[str, Any], plots: dict[str, bytes]) -> str:
    """A self-contained report.html: the tables and the plots as embedded base64 PNGs."""
    import html

    def para(text: str) -> str:
        return (
            f"<li>{md_inline(text[2:])}</li>"
            if text.startswith("- ")
            else (f"<p>{md_inline(text)}</p>")
        )

    parts = [
        f"<h1>pqd search: {html.escape(search['name'])}</h1>",
        *[para(t) for t in _search_intro(search)],
        "<h2>All results</h2>",
        html_table(SEARCH_HEADER, search_rows(search)),
        para(_results_note(search)),
    ]
    if search.get("order_pairs"):
        parts += [
            "<h2>Every pair of full orders</h2>",
            para(order_pairs_note(search)),
            html_table(ORDER_PAIR_HEADER, order_pair_rows(search)),
        ]
    if search.get("pairwise"):
        parts += [
            "<h2>Pairwise order wins</h2>",
            para(_pairwise_note(search)),
            html_table(PAIR_HEADER, pairwise_rows(search)),
        ]
    failed = _failed_lines(search)
    if failed:
        parts += ["<h2>Failed trials</h2>", *[para(f"- {f}") for f in failed]]
    parts.append("<h2>Plots</h2>")
    parts += [html_figure(name, data) for name, data in plots.items()]
    parts += [para(t) for t in _footer(search)]
    return html_page(f"pqd search: {search['name']}", parts)


def write_search_report(search: dict[str, Any], out: Any) -> dict[str, bytes]:
    """Write plots/*.png, report.md and report.html of a search into folder ``out``."""
    from pathlib import Path

    from pqd.checkpoint import atomic_write_bytes, atomic_write_text

    out = Path(out)
    plots = search_plots(search)
    for name, data in plots.items():
        atomic_write_bytes(out / "plots" / name, data)
    atomic_write_text(out / "report.md", render_search_markdown(search, list(plots)))
    atomic_write_text(out / "report.html", render_search_html(search, plots))
    return plots
