"""Human-readable reports rendered from record.json (never from live objects).

``pqd report RUN_DIR`` re-renders ``report.md`` from the stored record, so a
report can always be regenerated and never disagrees with the record.
"""

from __future__ import annotations

import math
from typing import Any

from pqd.markdown import (
    KIND_ORDER,
    html_figure,
    html_page,
    html_table,
    md_inline,
    ordered_groups,
    table,
)
from pqd.progress import plural


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def speed_text(ratio: float) -> str:
    """``"1.19x faster"`` for a speedup ratio >= 1, ``"1.19x slower"`` (its inverse) below.

    Args:
        ratio: baseline latency / new latency (> 0).

    Returns:
        The phrase, two decimals.
    """
    if ratio <= 0 or not math.isfinite(ratio):
        return f"{ratio:.2f}x the speed"
    return f"{ratio:.2f}x faster" if ratio >= 1.0 else f"{1.0 / ratio:.2f}x slower"


def points_text(points: float) -> str:
    """A signed accuracy change in points with two decimals, never ``-0.00``.

    Args:
        points: the change in percentage points (positive: better).

    Returns:
        e.g. ``"+0.25 points"``, ``"0.00 points"``, ``"-1.50 points"``.
    """
    rounded = round(points, 2)
    return "0.00 points" if rounded == 0 else f"{rounded:+.2f} points"


def ci_text(ci: Any) -> str:
    """A 95% interval of fractions as ``"[76.3, 81.2]"`` (percent, one decimal); ``""`` when
    the record has none (measured before pqd wrote intervals)."""
    if not ci:
        return ""
    return f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def paired_text(p: dict[str, Any] | None, a: str = "final", b: str = "baseline") -> str:
    """One sentence on a paired comparison (:func:`pqd.stats.compare_paired` as a dict).

    Args:
        p: the comparison (fractions), or None.
        a: the name of the first model (the difference is a minus b).
        b: the name of the second model.

    Returns:
        e.g. ``"final vs baseline on the same 10000 test images: +0.20 points (95% CI -0.31 to
        +0.71), 52 images only final gets right, 32 only baseline (McNemar p = 0.037):
        final better"``; ``""`` for None.
    """
    if not p:
        return ""
    verdict = p.get("verdict", "tie")
    verdict = "a tie at the 5% level" if verdict == "tie" else verdict
    return (
        f"{a} vs {b} on the same {p['n']} test images: {points_text(100 * p['difference'])} "
        f"(95% CI {100 * p['ci_low']:+.2f} to {100 * p['ci_high']:+.2f}), "
        f"{p['a_only']} images only {a} gets right, {p['b_only']} only {b} "
        f"(McNemar p = {p['p_value']:.3g}): {verdict}"
    )


def noisy_latency(lat: dict[str, Any], factor: float = 2.0) -> bool:
    """Whether a latency summary's p90 is more than ``factor`` times its p50 (other load on
    the machine, frequency scaling: such numbers are not to be trusted)."""
    return lat.get("p50", 0) > 0 and lat.get("p90", 0) > factor * lat["p50"]


def notes_text(info: dict[str, Any]) -> str:
    """A stage's ``info`` as readable text: ``key=value`` pairs, nested dicts flattened as
    ``key: k=v, k=v`` and lists joined (empty ones say ``none``)."""
    parts = []
    for k, v in info.items():
        if isinstance(v, dict):
            inner = ", ".join(f"{ik}={_fmt_plain(iv)}" for ik, iv in v.items())
            parts.append(f"{k}: {inner or 'none'}")
        else:
            parts.append(f"{k}={_fmt_plain(v)}")
    return "; ".join(parts) or "-"


def _fmt_plain(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return " ".join(_fmt(x) for x in v) if v else "none"
    return _fmt(v)


def kernel_summary(kernels: dict[str, int]) -> str:
    """What decides INT8 speed in a runtime's optimized graph: convs left in float, Q/DQ
    pairs (quantize/dequantize between float and int8 ops) and layout transposes."""
    float_convs = sum(n for op, n in kernels.items() if op in ("Conv", "FusedConv"))
    int8_convs = sum(n for op, n in kernels.items() if op in ("QLinearConv", "ConvInteger"))
    qdq = min(kernels.get("QuantizeLinear", 0), kernels.get("DequantizeLinear", 0))
    return (
        f"{int8_convs} INT8 convs, {float_convs} float convs, {qdq} Q/DQ pairs, "
        f"{kernels.get('Transpose', 0)} transposes"
    )


def summary_rows(record: dict[str, Any]) -> list[list[str]]:
    """Rows of the baseline-vs-final table: artifact, precision, accuracy, MB, ms, sparsity."""
    rows = []
    for key in ("baseline", "final"):
        r = record[key]
        lat = r["latency_ms"]
        big = [b for b in lat.get("batches", {}) if b != "1"]
        big_txt = f"{lat['batches'][big[0]]['p50']:.2f} (b{big[0]})" if big else "-"
        rows.append(
            [
                key,
                r["precision"],
                f"{_pct(r['accuracy'])} {ci_text(r.get('accuracy_ci'))}".strip(),
                _mb(r["size_bytes"]),
                f"{lat['p50']:.3f}",
                f"{lat['p90']:.3f}",
                big_txt,
                _pct(r["sparsity"]),
                f"{r['macs'] / 1e6:.1f}",
                f"{r['bitops'] / 1e9:.2f}",
            ]
        )
    return rows


SUMMARY_HEADER = [
    "artifact",
    "precision",
    "top-1 [95% CI]",
    "MB",
    "p50 ms (b1)",
    "p90 ms (b1)",
    "p50 ms (large b)",
    "sparsity",
    "MMACs",
    "GBitOps",
]


def parity_warnings(record: dict[str, Any]) -> list[str]:
    """One line per artifact whose measured answers are untrustworthy on this machine: its
    ``parity_problems`` (see :func:`pqd.target.assess`, cause first) joined, with the fix."""
    lines = []
    for key in ("baseline", "final"):
        art = record[key]
        if problems := art.get("parity_problems", []):
            lines.append(
                f"{key} ({art.get('artifact', key)}, built for target "
                f"{art.get('target', '?')}): {'; '.join(problems)}; fix: rebuild it for this "
                f"CPU (export.target: portable, or auto on the deployment machine)"
            )
    return lines


def target_section(record: dict[str, Any]) -> list[str]:
    """The report's "Deployment target" section: what the INT8 file was built for, what this
    CPU's kernels are, the saturation check read from the file and the parity verdict."""
    final, env = record["final"], record["environment"]
    sat = final.get("saturation") or {}
    target = final.get("target", "?")
    lines = [
        "## Deployment target",
        "",
        f"- final.onnx built for target **{target}**; measured on a CPU with "
        f"{env.get('kernels') or ', '.join(env['cpu_flags']) or 'unknown kernels'}.",
    ]
    if sat.get("checked_layers"):
        lines.append(
            f"- int8 weight pairs that can saturate the int16 sums of x86 kernels without VNNI: "
            f"{sat['pairs_at_risk']} (in {len(sat['layers'])} of {sat['checked_layers']} "
            f"layers; largest same-sign pair |w_a| + |w_b| = {sat['max_pair_magnitude']}, "
            f"safe up to 128)"
        )
    warnings = parity_warnings(record)
    if "parity_ok" in final:
        lines.append(
            "- parity: "
            + (
                "ok (every runtime's top-1 agreement with the torch model is within the threshold)"
                if not warnings
                else "**FAILED**"
            )
        )
    lines += [f"  - {w}" for w in warnings]
    return lines


def render_markdown(record: dict[str, Any]) -> str:
    """The run's report.md."""
    final, cmp_ = record["final"], record["comparison"]
    env = record["environment"]
    data = record["data"]
    runtime = final["runtime"]
    lines = [
        f"# pqd run: {record['name']}",
        "",
        f"Order: **{' -> '.join(record['order']) or '(no stages)'}** on "
        f"`{record['recipe']['model']['name']}`, {data['name']} "
        f"({data['train']} train / {data['val']} val / {data['test']} test images), "
        f"seed {record['seed']}.",
        "",
        f"Final vs baseline on {runtime} ({env['measure_threads']} threads): "
        f"**{speed_text(cmp_['speedup_batch1_p50'])} at batch 1**, "
        f"**{cmp_['size_ratio']:.2f}x smaller**, "
        f"accuracy {points_text(-cmp_['accuracy_drop_points'])}.",
        "",
        table(SUMMARY_HEADER, summary_rows(record)),
        "",
        "Accuracy is the artifact's own top-1 on the test split, run through the runtime, "
        "with its 95% Wilson interval; latency is wall-clock per call, both artifacts timed in "
        "interleaved rounds.",
        "",
        *([paired_text(cmp_["paired"]) + ".", ""] if cmp_.get("paired") else []),
        *_speed_notes(record),
        "## Stages",
        "",
    ]
    stage_rows = [
        [
            str(s["index"] + 1),
            s["name"],
            str(s["config"].get("epochs", "-")),
            f"{s['seconds']:.1f}",
            _pct(s["val_accuracy"]),
            notes_text(s["info"]),
        ]
        for s in record["stages"]
    ]
    header = ["#", "stage", "epochs", "seconds", "val top-1", "notes"]
    no_stages = "(no stages: the final model is the baseline)"
    lines.append(table(header, stage_rows) if stage_rows else no_stages)
    if final.get("early_exit"):
        lines += ["", *early_exit_section(final["early_exit"])]
    lines += ["", "## Runtimes", ""]
    rt_rows = []
    for key in ("baseline", "final"):
        for rt, res in record[key]["runtimes"].items():
            lat = res["latency_ms"]
            rt_rows.append(
                [
                    key,
                    f"{rt} {res['version']}",
                    _pct(res["accuracy"]),
                    f"{lat['p50']:.3f}",
                    f"{lat['p90']:.3f}",
                    f"{100 * res['parity']['top1_agreement']:.2f}%",
                ]
            )
    lines.append(
        table(
            [
                "artifact",
                "runtime",
                "top-1",
                "p50 ms (b1)",
                "p90 ms (b1)",
                "top-1 agreement with torch",
            ],
            rt_rows,
        )
    )
    lines += deploy_lines(final)
    lines += [
        "",
        "Top-1 agreement: the share of test images where the ONNX file in this "
        "runtime predicts the same class as its own torch model; 99% or more is normal "
        "(INT8 rounding flips a few borderline images); less points at an export "
        "problem or at a file built for another CPU (see Deployment target).",
    ]
    lines += ["", *target_section(record)]
    if final.get("audit"):
        from pqd.report_audit import audit_section

        lines += ["", *audit_section(record)]
    libs = env["libraries"]
    lines += [
        "",
        "## Environment",
        "",
        f"- CPU: {env['cpu']} ({env['logical_cpus']} logical CPUs; "
        f"{', '.join(env['cpu_flags']) or 'no VNNI/AVX-512 flags'})",
        f"- measured with {env['measure_threads']} threads; "
        + ", ".join(f"{k} {v}" for k, v in libs.items()),
        f"- time: baseline {record['timing_s']['baseline']:.0f} s, stages "
        f"{record['timing_s']['stages']:.0f} s, export {record['timing_s']['export']:.0f} s, "
        f"measurement {record['timing_s']['measure']:.0f} s, total "
        f"{record['timing_s']['total']:.0f} s",
        "",
    ]
    if data.get("subset_note"):
        lines += [f"Note: {data['subset_note']}", ""]
    return "\n".join(lines)


def early_exit_rows(ee: dict[str, Any]) -> list[list[str]]:
    """One row per exit and the final head: position, threshold, test top-1 of that head,
    fraction of test inputs leaving there, MACs of leaving there."""
    macs = ee["part_macs"]
    rows, run = [], 0
    n = len(ee["thresholds"])
    for k in range(n + 1):
        run += macs["segments"][k] + (macs["heads"][k] if k < n else 0)
        t = ee["thresholds"][k] if k < n else None
        rows.append(
            [
                f"exit {k}" if k < n else "final",
                str(ee["positions"][k]) if k < n else "-",
                ("never" if t is None else f"{t:.3f}") if k < n else "-",
                _pct(ee["per_exit_accuracy"][k]),
                _pct(ee["exit_fractions"][k]),
                f"{run / 1e6:.1f}",
            ]
        )
    return rows


def early_exit_section(ee: dict[str, Any]) -> list[str]:
    """The report's "Early exit" section (from ``final.early_exit`` of a record)."""
    lat, ref, seg = ee["latency_ms"], ee["no_exit_latency_ms"], ee["segments_no_heads_latency_ms"]
    target = ", ".join(f"{k} {v}" for k, v in ee["target"].items())
    lines = [
        "## Early exit",
        "",
        f"Exits after blocks {ee['positions']} ({ee['confidence']} confidence); thresholds "
        f"calibrated on the validation split for {target} "
        f"({'met' if ee['target_met'] else 'NOT met'} on val). On the test split, against "
        f"the same weights with exits disabled: **mean batch-1 latency "
        f"{speed_text(ee['speedup_mean'])}**, accuracy {points_text(-ee['accuracy_drop_points'])} "
        f"({_pct(ee['accuracy_with_exits'])} vs {_pct(ee['accuracy_no_exits'])}), expected "
        f"MACs {100 * ee['expected_macs_fraction']:.1f}% of the network.",
        "",
        table(
            [
                "head",
                "after block",
                "threshold",
                "test top-1 of head",
                "leave here",
                "MMACs to here",
            ],
            early_exit_rows(ee),
        ),
        "",
        table(
            ["batch-1 latency over the test split (ms)", "mean", "p50", "p90"],
            [
                [
                    "with exits: exits.onnx (one graph, If nodes)",
                    f"{lat['mean']:.3f}",
                    f"{lat['p50']:.3f}",
                    f"{lat['p90']:.3f}",
                ],
                *(
                    [
                        [
                            "with exits: part files called in turn",
                            f"{f['mean']:.3f}",
                            f"{f['p50']:.3f}",
                            f"{f['p90']:.3f}",
                        ]
                    ]
                    if (f := ee.get("files_latency_ms"))
                    else []
                ),
                [
                    "exits disabled: final.onnx (reference)",
                    f"{ref['mean']:.3f}",
                    f"{ref['p50']:.3f}",
                    f"{ref['p90']:.3f}",
                ],
                [
                    "exits disabled: segments back to back",
                    f"{seg['mean']:.3f}",
                    f"{seg['p50']:.3f}",
                    f"{seg['p90']:.3f}",
                ],
            ],
        ),
        "",
        f"Each image is one call, {lat['samples']} calls per row ({lat['rounds']} passes over "
        f"{lat['samples'] // lat['rounds']} test images, rows taking turns); "
        f"{ee['runtime']}; files and thresholds in `{ee['manifest']}`.",
    ]
    return lines


def deploy_lines(final: dict[str, Any]) -> list[str]:
    """ "Deploy with X" for the final artifact (the runtime fastest at most measured batch
    sizes), each batch's winner with its settings, and what onnxruntime runs in float."""
    fastest = final.get("fastest") or {}
    if not fastest:
        return []
    votes = [f["runtime"] for f in fastest.values()]
    pick = max(dict.fromkeys(votes), key=votes.count)
    lines = ["", f"Deploy with {pick}: the fastest runtime for the final artifact at batch "]
    lines[-1] += ", ".join(
        f"{b} ({f['runtime']} {f['p50_ms']:.3f} ms"
        + "".join(f" vs {rt} {v:.3f}" for rt, v in f["others_p50_ms"].items())
        + ")"
        for b, f in fastest.items()
    )
    lines[-1] += f". Settings: {notes_text(fastest[next(iter(fastest))]['settings'])}."
    ort = final.get("runtimes", {}).get("onnxruntime", {})
    if "float_ops" in ort and "int8" in str(final.get("precision", "")):
        ops = "; ".join(f"{r['op']} x{r['count']} ({r['why']})" for r in ort["float_ops"])
        lines.append(
            f"onnxruntime runs in float: {ops or 'nothing (every op is integer)'}; "
            f"{ort['transposes']} layout transposes."
        )
    return lines


def _speed_notes(record: dict[str, Any]) -> list[str]:
    """Lines under the summary: a noisy-machine warning, and why INT8 is not faster."""
    lines = []
    noisy = [k for k in ("baseline", "final") if noisy_latency(record[k]["latency_ms"])]
    if noisy:
        lines += [
            f"Warning: the batch-1 p90 of {' and '.join(noisy)} is more than 2x its p50: "
            "other load on this machine disturbed the timing; measure again on an idle "
            "machine before trusting the speedup.",
            "",
        ]
    final = record["final"]
    speedup = record["comparison"]["speedup_batch1_p50"]
    kernels = final.get("runtimes", {}).get(final["runtime"], {}).get("kernels")
    if "int8" in str(final.get("precision", "")) and speedup < 1.0 and kernels:
        lines += [
            f"INT8 is not faster here. The optimized {final['runtime']} graph has "
            f"{kernel_summary(kernels)} (each float conv, Q/DQ pair and transpose is "
            "time spent outside the fused INT8 kernels).",
            "",
        ]
    return lines


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# ============================================================================ search reports
#
# Rendered from search.json only (``pqd report SEARCH_DIR`` re-renders them): report.md,
# a self-contained report.html (plots embedded as base64 PNG) and plots/*.png beside them.

KIND_STYLE = {  # kind -> (colour, marker, legend label)
    "baseline": ("#222222", "*", "baseline (FP32)"),
    "permutation": ("#1f77b4", "o", "full order (all stages)"),
    "pairwise": ("#ff7f0e", "^", "pairwise run (two stages)"),
    "reference": ("#2ca02c", "s", "single technique"),
}
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
            f"within {100 * search['criterion']['tie_latency']:g}%): the pairwise "
            "results prefer no order."
        )
    if pw["unique"]:
        return f"Pairwise order: **{' -> '.join(pw['order'])}**."
    wins = ", ".join(f"{a} before {b}" for a, b in pw["edges"])
    tied = ", ".join(f"{a} / {b}" for a, b in pw["ties"])
    return (
        f"Pairwise wins give a partial order ({wins}; tied: {tied}); one order "
        f"consistent with it: **{' -> '.join(pw['order'])}** (not unique)."
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
        f"panel. Pareto: not dominated in (top-1 up, MB down, p50 down), latencies within "
        f"{100 * search['criterion']['tie_latency']:g}% and sizes within 1% counted as "
        "equal." + (f" {parity}" if parity else "")
    )


def _pairwise_note(search: dict[str, Any]) -> str:
    return (
        f"Criterion: {search['criterion']['text']}. Each pairwise run gets "
        f"{'/'.join(map(str, search['allocation']['pairwise_epochs']))} epochs (the first "
        "two positions of a full order). 95% CI: paired bootstrap of A -> B minus B -> A "
        "over the test images of every seed; p (Holm): exact McNemar on the images only one "
        "order gets right, adjusted over the pairs."
        + "".join(f" {line}" for line in _unresolved_text(search))
    )


def _unresolved_text(search: dict[str, Any]) -> list[str]:
    """For each tied pair with a measured difference: how many test images (per seed) or
    seeds would resolve it at the observed effect (80% power)."""
    out = []
    for r in (search.get("pairwise") or {}).get("table", []):
        pr = r.get("paired")
        if r["first"] is not None or not pr or not pr["difference"]:
            continue
        need = []
        if pr.get("images_to_resolve"):
            need.append(f"{pr['images_to_resolve']} test images per seed")
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
    if search.get("pairwise"):
        lines += [
            "## Pairwise order wins",
            "",
            _pairwise_note(search),
            "",
            table(PAIR_HEADER, pairwise_rows(search)),
            "",
        ]
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
    return (
        f"{t['total']:.0f} s in all (training {t['train']:.0f} s, measuring "
        f"{t['measure']:.0f} s, latency panel {t['panel']:.0f} s; {search['runs']['reused']} "
        f"runs reused, {search['runs']['trained_now']} trained now)"
    )


# ---------------------------------------------------------------------------- plots


def _measured(search: dict[str, Any]) -> list[dict[str, Any]]:
    return [g for g in ordered_groups(search) if g["n"]]


def _place_labels(
    ax: Any, xs: list[float], ys: list[float], labels: list[str], fontsize: float = 7.5
) -> None:
    """Label points, trying a few offsets per label so labels do not overlap (greedy)."""
    fig = ax.figure
    fig.canvas.draw()
    to_px = ax.transData.transform
    placed: list[tuple[float, float, float, float]] = []
    points = [tuple(to_px((x, y))) for x, y in zip(xs, ys, strict=True)]
    w_char, h = fontsize * 0.62 * fig.dpi / 72, fontsize * 1.3 * fig.dpi / 72
    offsets = [
        (6, 4),
        (6, -12),
        (-6, 4),
        (-6, -12),
        (6, 14),
        (-6, 14),
        (6, -22),
        (-6, -22),
        (14, -4),
        (-14, -4),
        (6, 24),
        (6, -32),
    ]
    # then further out, one line height a step (points sharing a size stack their labels)
    offsets += [(sx, sy * (24 + k * h)) for k in range(1, 40) for sy in (1, -1) for sx in (6, -6)]
    for (px, py), label in sorted(zip(points, labels, strict=True), key=lambda t: -t[0][1]):
        w = w_char * len(label)
        best = None
        for dx, dy in offsets:
            x0 = px + dx if dx > 0 else px + dx - w
            box = (x0, py + dy, x0 + w, py + dy + h)
            clash = any(
                not (box[2] < b[0] or box[0] > b[2] or box[3] < b[1] or box[1] > b[3])
                for b in placed
            )
            hits_point = any(
                box[0] - 2 < qx < box[2] + 2 and box[1] - 2 < qy < box[3] + 2 for qx, qy in points
            )
            if not clash and not hits_point:
                best = (dx, dy, box)
                break
        if best is None:  # no spot clear of points: take the first clear of other labels
            for dx, dy in offsets:
                x0 = px + dx if dx > 0 else px + dx - w
                box = (x0, py + dy, x0 + w, py + dy + h)
                if not any(
                    not (box[2] < b[0] or box[0] > b[2] or box[3] < b[1] or box[1] > b[3])
                    for b in placed
                ):
                    best = (dx, dy, box)
                    break
        if best is None:
            dx, dy = offsets[0]
            x0 = px + dx
            best = (dx, dy, (x0, py + dy, x0 + w, py + dy + h))
        dx, dy, box = best
        placed.append(box)
        ax.annotate(
            label,
            (ax.transData.inverted().transform((px, py))),
            xytext=(dx, dy + h / 3),
            textcoords="offset pixels",
            fontsize=fontsize,
            ha="left" if dx > 0 else "right",
            va="center",
            color="#333333",
        )


def _front_2d(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The staircase of points not dominated in (x down, y up), sorted by x."""
    front = [p for p in points if not any(q[0] <= p[0] and q[1] >= p[1] and q != p for q in points)]
    return sorted(set(front))


def _scatter(search: dict[str, Any], x_key: str, x_label: str, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _measured(search)
    fig, ax = plt.subplots(figsize=(10.5, 5.6), dpi=110)
    scale = 1e-6 if x_key == "size_bytes" else 1.0
    xs = [g[x_key] * scale for g in groups]
    ys = [100 * g["accuracy_mean"] for g in groups]
    for kind in KIND_ORDER:
        pts = [(x, y, g) for x, y, g in zip(xs, ys, groups, strict=True) if g["kind"] == kind]
        if not pts:
            continue
        colour, marker, label = KIND_STYLE[kind]
        ax.errorbar(
            [p[0] for p in pts],
            [p[1] for p in pts],
            yerr=[100 * p[2]["accuracy_std"] for p in pts],
            fmt=marker,
            color=colour,
            ms=13 if kind == "baseline" else 8,
            capsize=3,
            alpha=0.9,
            label=label,
            zorder=3,
        )
    pareto = [(x, y) for x, y, g in zip(xs, ys, groups, strict=True) if g.get("pareto")]
    if pareto:
        ax.scatter(
            [p[0] for p in pareto],
            [p[1] for p in pareto],
            s=260,
            facecolors="none",
            edgecolors="#d62728",
            linewidths=1.6,
            zorder=4,
            label="Pareto-optimal (top-1, size, latency)",
        )
    front = _front_2d(list(zip(xs, ys, strict=True)))
    if len(front) > 1:
        fx, fy = [front[0][0]], [front[0][1]]
        for x, y in front[1:]:
            fx += [x, x]
            fy += [fy[-1], y]
        ax.plot(
            fx,
            fy,
            "--",
            color="#d62728",
            alpha=0.6,
            lw=1.2,
            zorder=2,
            label=f"frontier in this plane ({x_label.split(' ')[0].lower()} vs top-1)",
        )
    _place_labels(ax, xs, ys, [g["short"] for g in groups])
    ax.set_xlabel(x_label)
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    lo, hi = min(xs), max(xs)
    pad = (hi - lo) * 0.12 or hi * 0.1
    ax.set_xlim(max(0.0, lo - pad), hi + pad)
    ylo, yhi = min(ys), max(ys)
    ypad = (yhi - ylo) * 0.15 or 1.0
    ax.set_ylim(ylo - ypad, yhi + ypad)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), framealpha=0.9)
    fig.text(
        0.01,
        0.01,
        "labels: P prune, Q quantize (INT8 QAT), D distill ... in the order "
        "applied; error bars: sd over seeds",
        fontsize=7,
        color="#555555",
    )
    return _png(fig)


def _bars(search: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(reversed(_measured(search)))  # first row on top
    tag = {"baseline": "", "permutation": "", "reference": " (only)", "pairwise": " (pair)"}
    labels = [
        ("baseline" if g["kind"] == "baseline" else g["short"])
        + tag[g["kind"]]
        + (" *" if g.get("pareto") else "")
        for g in groups
    ]
    colours = [KIND_STYLE[g["kind"]][0] for g in groups]
    fig, axes = plt.subplots(1, 3, figsize=(12, 0.42 * len(groups) + 1.6), dpi=110, sharey=True)
    specs = [
        ("accuracy_mean", 100.0, "test top-1 (%)", "{:.1f}"),
        ("latency_p50_ms", 1.0, "batch-1 p50 latency (ms)", "{:.3f}"),
        ("size_bytes", 1e-6, "size on disk (MB)", "{:.2f}"),
    ]
    for ax, (key, k, title, fmt) in zip(axes, specs, strict=True):
        vals = [g[key] * k for g in groups]
        ax.barh(range(len(groups)), vals, color=colours, alpha=0.85)
        if key == "accuracy_mean":
            lo = max(0.0, min(vals) - 5)
            ax.set_xlim(lo, max(vals) + 2.5)
            ax.set_title(f"{title}\n(axis starts at {lo:.0f}%)", fontsize=9)
        else:
            ax.set_xlim(0, max(vals) * 1.25)
            ax.set_title(title, fontsize=9)
        for i, v in enumerate(vals):
            ax.text(v, i, " " + fmt.format(v), va="center", fontsize=7)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(groups)))
    axes[0].set_yticklabels(labels, fontsize=8)
    handles = [
        plt.Rectangle((0, 0), 1, 1, color=KIND_STYLE[k][0])
        for k in KIND_ORDER
        if any(g["kind"] == k for g in groups)
    ]
    fig.legend(
        handles,
        [KIND_STYLE[k][2] for k in KIND_ORDER if any(g["kind"] == k for g in groups)],
        loc="lower center",
        ncol=4,
        fontsize=8,
        frameon=False,
    )
    fig.suptitle(
        "Every order: accuracy, latency, size (full orders ranked best first; * Pareto-optimal)",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    return _png(fig)


def _win_graph(search: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch

    pw = search["pairwise"]
    names = search["stages"]
    n = len(names)
    pos = {
        s: (
            math.cos(math.pi / 2 - 2 * math.pi * i / n),
            math.sin(math.pi / 2 - 2 * math.pi * i / n),
        )
        for i, s in enumerate(names)
    }
    fig, ax = plt.subplots(figsize=(6.4, 6.4), dpi=110)
    cycle = {tuple(e) for e in (pw.get("cycle") or [])}
    margins = {(r["a"], r["b"]): r for r in pw["table"]}
    radius = 0.2
    for a, b in pw["edges"]:
        (x0, y0), (x1, y1) = pos[a], pos[b]
        colour = "#d62728" if (a, b) in cycle else "#1f77b4"
        ax.add_patch(
            FancyArrowPatch(
                (x0, y0),
                (x1, y1),
                arrowstyle="-|>",
                mutation_scale=22,
                lw=2.2,
                color=colour,
                shrinkA=radius * 140,
                shrinkB=radius * 140,
                zorder=2,
            )
        )
        r = margins.get((a, b)) or margins.get((b, a))
        mx, my = (x0 + x1) / 2, (y0 + y1) / 2
        if r["decided_by"] == "accuracy" and r["margin_points"] is not None:
            note = f"+{abs(r['margin_points']):.2f} pts"
        else:
            note = r["decided_by"]
        ax.text(
            mx,
            my,
            note,
            ha="center",
            va="center",
            fontsize=9,
            bbox={"boxstyle": "round", "fc": "white", "ec": colour, "alpha": 0.9},
        )
    for a, b in pw["ties"]:
        (x0, y0), (x1, y1) = pos[a], pos[b]
        ax.plot([x0, x1], [y0, y1], "--", color="#888888", lw=1.5, zorder=1)
        ax.text(
            (x0 + x1) / 2,
            (y0 + y1) / 2,
            "tie",
            ha="center",
            va="center",
            fontsize=9,
            bbox={"boxstyle": "round", "fc": "white", "ec": "#888888"},
        )
    for s, (x, y) in pos.items():
        ax.add_patch(plt.Circle((x, y), radius, color="#f2f2f2", ec="#333333", lw=1.5, zorder=3))
        ax.text(x, y, s, ha="center", va="center", fontsize=11, zorder=4)
    ax.set_xlim(-1.45, 1.45)
    ax.set_ylim(-1.55, 1.45)
    ax.set_aspect("equal")
    ax.axis("off")
    if pw["cycle"]:
        head = "cycle (red): no order derived"
    elif not pw["edges"]:
        head = "every pair tied: no order preferred"
    else:
        head = "order: " + " -> ".join(pw["order"]) + ("" if pw["unique"] else " (not unique)")
    ax.set_title(f"Pairwise wins; {head}", fontsize=11)
    ax.text(
        0,
        -1.45,
        "arrow A -> B: running A before B won (A->B beat B->A);\nlabel: top-1 "
        "margin of the winning order, or what decided it",
        ha="center",
        fontsize=8.5,
        color="#444444",
    )
    return _png(fig)


def _png(fig: Any) -> bytes:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def search_plots(search: dict[str, Any]) -> dict[str, bytes]:
    """PNG bytes by file name: the two scatters, the per-order bars, the pairwise graph."""
    if not _measured(search):
        return {}
    plots = {
        "accuracy_latency.png": _scatter(
            search,
            "latency_p50_ms",
            "batch-1 p50 latency (ms)",
            "Accuracy vs latency of every deployed artifact",
        ),
        "accuracy_size.png": _scatter(
            search, "size_bytes", "size on disk (MB)", "Accuracy vs size of every deployed artifact"
        ),
        "orders.png": _bars(search),
    }
    if search.get("pairwise"):
        plots["pairwise_graph.png"] = _win_graph(search)
    return plots


# ---------------------------------------------------------------------------- HTML


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
