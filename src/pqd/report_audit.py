"""The audit part of a run's report.md (:mod:`pqd.measurement.audit`): tables and PNG plots
rendered from record.json (``baseline.audit`` / ``final.audit``), written next to report.md:

- ``audit_per_class.png``: per-class test top-1, baseline vs final;
- ``audit_corruptions.png``: top-1 vs corruption severity (when the corruption suite ran);
- ``audit_reliability.png``: reliability diagrams (accuracy vs confidence per bin).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pqd.markdown import ordered_groups, table

PER_CLASS_PNG = "audit_per_class.png"
CORRUPTIONS_PNG = "audit_corruptions.png"
RELIABILITY_PNG = "audit_reliability.png"
MAX_CLASS_ROWS = 20  # with more classes the table lists the largest drops only
ART_COLOURS = {"baseline": "#4c72b0", "final": "#dd8452"}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _num(x: float | None, fmt: str = ".4f") -> str:
    return "-" if x is None else format(x, fmt)


def _audits(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        k: record[k]["audit"]
        for k in ("baseline", "final")
        if isinstance(record.get(k), dict) and record[k].get("audit")
    }


def audit_rows(record: dict[str, Any]) -> list[list[str]]:
    """Rows of the audit summary table: metric, baseline, final."""
    au = _audits(record)
    b, f = au.get("baseline", {}), au.get("final", {})
    rows: list[list[str]] = []

    def row(label: str, get: Any) -> None:
        vals = []
        for a in (b, f):
            try:
                vals.append(get(a) if a else "-")
            except (KeyError, TypeError, IndexError):
                vals.append("-")
        rows.append([label, *vals])

    row("test top-1", lambda a: _pct(a["accuracy"]))
    row(
        "worst class top-1",
        lambda a: f"{_pct(a['worst_class']['accuracy'])} ({a['worst_class']['class']})",
    )
    row("ECE (15 bins)", lambda a: _num(a["calibration"]["ece"]))
    row("NLL (nats/image)", lambda a: _num(a["calibration"]["nll"]))
    row("Brier score", lambda a: _num(a["calibration"]["brier"]))
    for q in ("p50", "p99", "max"):
        row(f"{q} ms (batch 1)", lambda a, q=q: _num(a["latency_ms_b1"][q], ".3f"))
    row("weight bytes", lambda a: f"{a['weight_bytes']:,}")
    row("mean corruption top-1", lambda a: _pct(a["corruptions"]["mean_accuracy"]))
    row("peak memory MB (fresh process)", lambda a: f"{a['memory']['peak_rss_bytes'] / 1e6:.1f}")
    row("of which the loaded file, MB", lambda a: f"{a['memory']['artifact_bytes'] / 1e6:.1f}")
    row(
        "CPU-ms per inference, b1 (proxy)",
        lambda a: f"{1e3 * a['energy']['cpu_s_per_inference']:.3f}",
    )
    row(
        "joules per inference (RAPL)",
        lambda a: (
            _num(a["energy"]["joules_per_inference"], ".5f")
            if a["energy"]["joules_per_inference"] is not None
            else "not readable"
        ),
    )
    return [r for r in rows if r[1] != "-" or r[2] != "-"]


def change_text(drop_points: float) -> str:
    """A per-class accuracy *drop* (points, positive = worse) as the signed change it is:
    a drop of 4.35 points prints ``-4.35``, a gain of 1.2 ``+1.20``, none ``0.00``."""
    change = -drop_points
    return "0.00" if round(change, 2) == 0 else f"{change:+.2f}"


def class_rows(record: dict[str, Any]) -> list[list[str]]:
    """Per class: baseline top-1, final top-1, change (points, negative for a drop), images
    whose top-1 changed; the largest drops first when there are more than
    :data:`MAX_CLASS_ROWS` classes."""
    au = _audits(record)
    b, f = au["baseline"]["per_class_accuracy"], au["final"]["per_class_accuracy"]
    vs = au["final"].get("vs_baseline", {})
    drops = vs.get("per_class_drop_points", {})
    changed = vs.get("disagreement", {}).get("by_class", {})
    names = [c for c in b if c in f]
    if len(names) > MAX_CLASS_ROWS:
        names = sorted(names, key=lambda c: -drops.get(c, 0.0))[:MAX_CLASS_ROWS]
    return [
        [c, _pct(b[c]), _pct(f[c]), change_text(drops.get(c, 0.0)), str(changed.get(c, 0))]
        for c in names
    ]


def corruption_rows(record: dict[str, Any]) -> list[list[str]]:
    """Per corruption: mean top-1 over the severities of baseline and final, CE, relative CE."""
    au = _audits(record)
    b, f = au["baseline"]["corruptions"], au["final"]["corruptions"]
    ce = au["final"].get("vs_baseline", {}).get("corruption", {})
    rows = []
    for name, fin in f["accuracy"].items():
        base = b["accuracy"].get(name)
        rows.append(
            [
                name,
                _pct(sum(base) / len(base)) if base else "-",
                _pct(sum(fin) / len(fin)),
                _num(ce.get("ce", {}).get(name), ".3f"),
                _num(ce.get("relative_ce", {}).get(name), ".3f"),
            ]
        )
    return rows


def audit_section(record: dict[str, Any]) -> list[str]:
    """Markdown lines of the report's audit section (empty without an audit)."""

    au = _audits(record)
    if "final" not in au:
        return []
    f = au["final"]
    vs = f.get("vs_baseline", {})
    lines = [
        "## Audit: beyond top-1",
        "",
        f"Measured on the deployed files with {f.get('runtime', '?')} over the "
        f"{f.get('images', '?')} test images (`pqd audit RUN` recomputes it; "
        "`measure.audit: true` adds corruptions, memory and energy).",
        "",
    ]
    worst = vs.get("largest_class_drop")
    dis = vs.get("disagreement")
    if worst and dis:
        lines += [
            f"Largest per-class change: **{change_text(worst['points'])} points "
            f"({worst['class']})**;"
            f" top-1 changed on **{dis['count']} of {dis['images']} images "
            f"({100 * dis['fraction']:.2f}%)**, {dis['right_before']} of them right "
            f"before, {dis['fixed']} right only after.",
            "",
        ]
    lines += [table(["", "baseline", "final"], audit_rows(record)), ""]
    lines += energy_lines(f.get("energy"))
    plots = []
    if "baseline" in au:
        lines += [
            "### Per class",
            "",
            table(
                ["class", "baseline", "final", "change (points)", "top-1 changed"],
                class_rows(record),
            ),
            "",
        ]
        plots.append(PER_CLASS_PNG)
    if "corruptions" in f and "corruptions" in au.get("baseline", {}):
        lines += corruption_lines(record, au["baseline"], f, vs)
        plots.append(CORRUPTIONS_PNG)
    lines += exit_lines(f.get("exit_calibration") or [])
    plots.append(RELIABILITY_PNG)
    lines += [f"![{p}]({p})" for p in plots] + [""]
    return lines


def energy_lines(energy: dict[str, Any] | None) -> list[str]:
    """What the audit's energy figures are (RAPL zones or why not, CPU-ms, peak memory)."""
    if not energy:
        return []
    rapl = energy["rapl"]
    where = (
        f"RAPL {', '.join(rapl['zones'])}"
        if rapl["readable"]
        else f"RAPL not readable: {rapl['reason']}"
    )
    return [
        f"Energy: {where}."
        " CPU-ms per inference is process CPU time (all threads) over a timed "
        "batch-1 window divided by the calls: a measured proxy, not joules. Peak "
        "memory: a fresh process that imports only the runtime, loads the file and "
        "runs every measured batch size.",
        "",
    ]


def corruption_lines(
    record: dict[str, Any], baseline: dict[str, Any], f: dict[str, Any], vs: dict[str, Any]
) -> list[str]:
    """The audit's corruption section: mean top-1, mean (relative) CE, per corruption."""
    c = vs.get("corruption", {})
    return [
        "### Corruptions",
        "",
        f"{len(f['corruptions']['accuracy'])} corruptions x 5 severities "
        f"(CIFAR-10-C parameters, seed {f['corruptions']['seed']}); mean top-1 "
        f"baseline {_pct(baseline['corruptions']['mean_accuracy'])}, final "
        f"{_pct(f['corruptions']['mean_accuracy'])}; mean CE (final errors / "
        f"baseline errors) {_num(c.get('mean_ce'), '.3f')}, mean relative CE "
        f"{_num(c.get('mean_relative_ce'), '.3f')}.",
        "",
        table(["corruption", "baseline", "final", "CE", "relative CE"], corruption_rows(record)),
        "",
    ]


def exit_lines(calibration: list[dict[str, Any]]) -> list[str]:
    """The audit's exit-head calibration table (empty without exits)."""
    if not calibration:
        return []
    rows = [
        [
            f"exit {e['exit']}",
            _pct(e["accuracy"]),
            _num(e["confidence_ece"]),
            _num(e["nll"]),
            _num(e["brier"]),
        ]
        for e in calibration
    ]
    return [
        "### Exit heads",
        "",
        "Calibration of each exit's confidence (what its threshold is compared "
        "with) against that head's top-1 on the test split.",
        "",
        table(["head", "top-1", "confidence ECE", "NLL", "Brier"], rows),
        "",
    ]


def _fig(w: float, h: float) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(w, h), dpi=110)


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path, format="png", bbox_inches="tight")
    plt.close(fig)


def write_audit_plots(record: dict[str, Any], out: str | Path) -> list[str]:
    """Write the audit PNGs next to report.md; returns their file names."""
    import numpy as np

    out = Path(out)
    au = _audits(record)
    written: list[str] = []
    if "baseline" in au and "final" in au:
        b, f = au["baseline"]["per_class_accuracy"], au["final"]["per_class_accuracy"]
        names = [c for c in b if c in f]
        fig, ax = _fig(max(6.0, 0.55 * len(names) + 2), 4.2)
        xs = np.arange(len(names))
        for off, (key, pc) in zip((-0.2, 0.2), (("baseline", b), ("final", f)), strict=True):
            ax.bar(xs + off, [100 * pc[c] for c in names], 0.4, label=key, color=ART_COLOURS[key])
        ax.set_xticks(xs, names, rotation=45 if len(names) > 6 else 0, ha="right")
        ax.set_ylabel("test top-1 (%)")
        ax.set_title("Per-class accuracy of the deployed files")
        ax.legend()
        _save(fig, out / PER_CLASS_PNG)
        written.append(PER_CLASS_PNG)
    if all("corruptions" in a for a in au.values()) and len(au) == 2:
        fig, ax = _fig(7.0, 4.4)
        for key, a in au.items():
            acc = a["corruptions"]["accuracy"]
            sev = [0, *a["corruptions"]["severities"]]
            for curve in acc.values():
                ax.plot(
                    sev,
                    [100 * a["accuracy"], *[100 * v for v in curve]],
                    color=ART_COLOURS[key],
                    alpha=0.18,
                    lw=1,
                )
            mean = np.mean(np.array(list(acc.values())), axis=0)
            ax.plot(
                sev,
                [100 * a["accuracy"], *(100 * mean)],
                color=ART_COLOURS[key],
                lw=2.5,
                marker="o",
                label=f"{key} (mean of {len(acc)} corruptions)",
            )
        ax.set_xlabel("severity (0 = clean)")
        ax.set_ylabel("test top-1 (%)")
        ax.set_title("Accuracy vs corruption severity (thin: each corruption)")
        ax.legend()
        _save(fig, out / CORRUPTIONS_PNG)
        written.append(CORRUPTIONS_PNG)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(au), figsize=(4.6 * len(au), 4.4), dpi=110, squeeze=False)
    for ax, (key, a) in zip(axes[0], au.items(), strict=True):
        cal = a["calibration"]
        n = cal["bins"]
        centres = (np.arange(n) + 0.5) / n
        acc = [0.0 if v is None else v for v in cal["bin_accuracy"]]
        ax.bar(
            centres,
            acc,
            width=1 / n,
            edgecolor="black",
            color=ART_COLOURS.get(key),
            alpha=0.8,
            label="accuracy in bin",
        )
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top-1 softmax)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{key}: ECE {cal['ece']:.4f}")
        ax.legend(loc="upper left", fontsize=8)
    _save(fig, out / RELIABILITY_PNG)
    written.append(RELIABILITY_PNG)
    return written


def search_audit_lines(search: dict[str, Any]) -> list[str]:
    """The search report's audit section: per order, top-1 next to the largest per-class
    drop, disagreement with the baseline, ECE and mean corruption top-1 (whether some orders
    cost more robustness than others at equal top-1), and the flagged frontier points."""

    groups = [g for g in ordered_groups(search) if g.get("n") and g.get("audit")]
    if not groups:
        return []
    rows = []
    for g in groups:
        a = g["audit"]
        drop = a["worst_class_drop_points"]
        rows.append(
            [
                g["kind"],
                g["label"],
                _pct(g["accuracy_mean"]),
                "-" if drop is None else f"{change_text(drop)} ({a['worst_class']})",
                _pct(a["disagreement"]),
                _num(a["ece"]),
                _pct(a["corruption_accuracy"]),
                "FLAGGED" if g.get("class_drop_flag") else "",
            ]
        )
    lines = [
        "## Audit per order",
        "",
        "Worst per-class change (top-1 points, negative: a drop) and disagreement are "
        "against the shared baseline; worst case over seeds for the change, means for the "
        "rest.",
        "",
        table(
            [
                "kind",
                "order",
                "top-1",
                "worst class change (points)",
                "disagreement",
                "ECE",
                "corruption top-1",
                "flag",
            ],
            rows,
        ),
        "",
    ]
    flag = search.get("class_drop_flag")
    if flag:
        names = [g["label"] for g in groups if g["id"] in flag["flagged"]]
        lines += [
            (
                f"Flagged: Pareto-front point(s) {', '.join(names)} lose more than "
                f"{flag['threshold_points']:g} points on one class."
                if names
                else f"No Pareto-front point loses more than "
                f"{flag['threshold_points']:g} points on one class."
            ),
            "",
        ]
    return lines
