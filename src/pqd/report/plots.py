"""The search's plots: the accuracy/latency scatter with its frontier, bars per order, the
graph of pairwise wins."""

from __future__ import annotations

import math
from typing import Any

from pqd.markdown import (
    KIND_ORDER,
    ordered_groups,
)

KIND_STYLE = {  # kind -> (colour, marker, legend label)
    "baseline": ("#222222", "*", "baseline (FP32)"),
    "permutation": ("#1f77b4", "o", "full order (all stages)"),
    "pairwise": ("#ff7f0e", "^", "pairwise run (two stages)"),
    "reference": ("#2ca02c", "s", "single technique"),
}


def _measured(search: dict[str, Any]) -> list[dict[str, Any]]:
    return [g for g in ordered_groups(search) if g["n"]]


def place_labels(
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
    place_labels(ax, xs, ys, [g["short"] for g in groups])
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
        colour = "#d62728" if (a, b) in cycle else "#1f77b4"
        note = _margin_note(margins.get((a, b)) or margins.get((b, a)))
        _link(ax, pos[a], pos[b], note, colour, arrow=radius * 140)
    for a, b in pw["ties"]:
        _link(ax, pos[a], pos[b], "tie", "#888888")
    for s, (x, y) in pos.items():
        ax.add_patch(plt.Circle((x, y), radius, color="#f2f2f2", ec="#333333", lw=1.5, zorder=3))
        ax.text(x, y, s, ha="center", va="center", fontsize=11, zorder=4)
    ax.set_xlim(-1.45, 1.45)
    ax.set_ylim(-1.55, 1.45)
    ax.set_aspect("equal")
    ax.axis("off")
    head = _order_head(pw)
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


def _margin_note(row: dict[str, Any]) -> str:
    """An arrow's label: the winning order's top-1 margin, or what decided the pair."""
    if row["decided_by"] == "accuracy" and row["margin_points"] is not None:
        return f"+{abs(row['margin_points']):.2f} pts"
    return str(row["decided_by"])


def _link(
    ax: Any,
    start: tuple[float, float],
    end: tuple[float, float],
    note: str,
    colour: str,
    arrow: float | None = None,
) -> None:
    """A labelled link between two stages: an arrow (``arrow``: its shrink at both ends,
    in points) or, without one, a dashed line (a tie)."""
    from matplotlib.patches import FancyArrowPatch

    (x0, y0), (x1, y1) = start, end
    if arrow is None:
        ax.plot([x0, x1], [y0, y1], "--", color=colour, lw=1.5, zorder=1)
    else:
        ax.add_patch(
            FancyArrowPatch(
                (x0, y0),
                (x1, y1),
                arrowstyle="-|>",
                mutation_scale=22,
                lw=2.2,
                color=colour,
                shrinkA=arrow,
                shrinkB=arrow,
                zorder=2,
            )
        )
    box: dict[str, Any] = {"boxstyle": "round", "fc": "white", "ec": colour}
    if arrow is not None:
        box["alpha"] = 0.9
    ax.text((x0 + x1) / 2, (y0 + y1) / 2, note, ha="center", va="center", fontsize=9, bbox=box)


def _order_head(pw: dict[str, Any]) -> str:
    """The win graph's title: the derived order, a cycle, or every pair tied."""
    if pw["cycle"]:
        return "cycle (red): no order derived"
    if not pw["edges"]:
        return "every pair tied: no order preferred"
    return "order: " + " -> ".join(pw["order"]) + ("" if pw["unique"] else " (not unique)")


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
