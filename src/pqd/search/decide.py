"""Decisions of a search: pairwise order wins by paired tests (McNemar pooled over seeds,
Holm over the pairs), the derived order or its cycle, the Pareto front, ties with the best."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from pqd.stats import compare_over_seeds, decide, holm

# ---------------------------------------------------------------------------- decisions


def decide_pair(
    ab_done: bool,
    ba_done: bool,
    comparison: dict[str, Any] | None,
    p_adjusted: float | None,
    lat_ab: float | None,
    lat_ba: float | None,
    spec: Any,
) -> tuple[str | None, str]:
    """Which order of a pair wins: ``"ab"``, ``"ba"`` or ``None`` (tie), and what decided.

    Accuracy decides when the paired comparison of A->B against B->A on the same test
    images (:func:`pqd.stats.compare_over_seeds`) is significant at ``spec.alpha`` after
    Holm's correction over the pairs (``p_adjusted``), holds across seeds where the seeds
    spread more than the images explain, and is at least ``spec.min_effect_points``
    (:func:`pqd.stats.decide`). Otherwise a batch-1 p50 latency (ms) lower by more than the
    fraction ``spec.tie_latency`` wins; otherwise the pair ties.

    Args:
        ab_done: the A->B runs finished (on at least one seed).
        ba_done: the B->A runs finished.
        comparison: A->B against B->A, or None without per-image predictions.
        p_adjusted: the comparison's Holm-adjusted McNemar p-value.
        lat_ab: A->B's batch-1 p50 (ms), or None.
        lat_ba: B->A's batch-1 p50 (ms), or None.
        spec: the recipe's ``search`` section.

    Returns:
        ``(winner, decided_by)``.
    """
    if not ab_done or not ba_done:
        if not ab_done and not ba_done:
            return None, "both runs failed"
        return ("ba" if not ab_done else "ab"), "the other run failed"
    if comparison is not None and p_adjusted is not None:
        verdict = decide(comparison, p_adjusted, spec.alpha, spec.min_effect_points / 100.0)
        if verdict != "tie":
            return ("ab" if verdict == "a" else "ba"), "accuracy"
    if lat_ab is not None and lat_ba is not None and max(lat_ab, lat_ba) > 0:
        rel = (lat_ba - lat_ab) / max(lat_ab, lat_ba)
        if abs(rel) > spec.tie_latency:
            return ("ab" if rel > 0 else "ba"), "latency"
    return None, "tie" if comparison is not None else "tie (no per-image predictions)"


def paired_groups(
    a: list[dict[str, Any]], b: list[dict[str, Any]], correct: dict[str, np.ndarray]
) -> dict[str, Any] | None:
    """Group a against group b on the same test images, seed by seed.

    Args:
        a: group a's trial entries (one per seed; ``key``, ``seed``, ``status``).
        b: group b's trial entries.
        correct: per-image correctness (bool) by trial key.

    Returns:
        :func:`pqd.stats.compare_over_seeds` over the seeds both finished with predictions,
        or None when there is no such seed.
    """
    by_seed = {e["seed"]: e for e in b if e.get("status") == "done" and e["key"] in correct}
    pairs = [
        (correct[e["key"]], correct[by_seed[e["seed"]]["key"]])
        for e in a
        if e.get("status") == "done" and e["key"] in correct and e["seed"] in by_seed
    ]
    return compare_over_seeds(pairs) if pairs else None


def holm_adjusted(comparisons: Sequence[dict[str, Any] | None]) -> list[float | None]:
    """Holm-adjusted McNemar p-values of a family of comparisons, in their order; None where
    a comparison is missing (it is not part of the family)."""
    adjusted = iter(holm([float(c["p_value"]) for c in comparisons if c is not None]))
    return [None if c is None else next(adjusted) for c in comparisons]


def topological_order(nodes: Sequence[str], edges: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """Sort ``nodes`` so that every edge ``(a, b)`` ("a before b") points forward.

    Returns ``{"order": [...] or None, "unique": bool, "cycle": [[a, b], ...] or None}``.
    With a cycle no order is given and ``cycle`` lists the edges of one cycle; ``unique`` is
    False when some nodes could swap places (ties leave pairs without an edge). Ties between
    free nodes are broken by their position in ``nodes``.
    """
    succ: dict[str, list[str]] = {v: [] for v in nodes}
    indeg = dict.fromkeys(nodes, 0)
    for a, b in edges:
        succ[a].append(b)
        indeg[b] += 1
    order, unique = [], True
    free = [v for v in nodes if indeg[v] == 0]
    while free:
        unique = unique and len(free) == 1
        v = free.pop(0)
        order.append(v)
        for w in succ[v]:
            indeg[w] -= 1
            if indeg[w] == 0:
                free.append(w)
        free.sort(key=list(nodes).index)
    if len(order) == len(nodes):
        return {"order": order, "unique": unique, "cycle": None}
    left = {v for v in nodes if v not in order}
    pred = {v: [a for a, b in edges if b == v and a in left] for v in left}
    # every node left has a predecessor left: walk back until a node repeats
    walk, v = [], next(v for v in nodes if v in left)
    while v not in walk:
        walk.append(v)
        v = pred[v][0]
    cycle = list(reversed(walk[walk.index(v) :]))
    return {
        "order": None,
        "unique": False,
        "cycle": [[cycle[i], cycle[(i + 1) % len(cycle)]] for i in range(len(cycle))],
    }


def pareto_front(
    points: Sequence[tuple[float, float, float]],
    latency_tolerance: float = 0.0,
    size_tolerance: float = 0.0,
) -> list[int]:
    """Indices of the Pareto-optimal points among ``(accuracy, size, latency)`` tuples.

    Higher accuracy, smaller size and lower latency are better. A point is dominated when
    another is at least as good in all three and better in one; latencies (sizes) within
    the fraction ``latency_tolerance`` (``size_tolerance``) of each other count as equal,
    so timing noise and a few bytes of file metadata decide nothing.
    """

    def dominates(j: tuple[float, float, float], i: tuple[float, float, float]) -> bool:
        ts, tl = size_tolerance, latency_tolerance
        no_worse = j[0] >= i[0] and j[1] <= i[1] * (1 + ts) and j[2] <= i[2] * (1 + tl)
        better = j[0] > i[0] or j[1] < i[1] * (1 - ts) or j[2] < i[2] * (1 - tl)
        return no_worse and better

    return [
        i
        for i, p in enumerate(points)
        if not any(dominates(q, p) for j, q in enumerate(points) if j != i)
    ]


def rank_against_best(perms: list[dict[str, Any]], pairs: list[dict[str, Any]]) -> None:
    """Rank the full orders (sorted best first) and mark those the best does not beat, by
    the comparisons of every pair of orders (:func:`order_pairs`, Holm over all the pairs),
    so that the ranking and the table of pairs say the same."""
    if not perms:
        return
    best = perms[0]
    versus = {r["b"]: r for r in pairs if r["a"] == best["id"]}
    best.update(rank=1, tied_with_best=True)
    for rank, g in enumerate(perms[1:], 2):
        g["rank"] = rank
        r = versus.get(g["id"])
        if r is None:  # (no per-image predictions)
            g["tied_with_best"] = True
            continue
        g["vs_best"] = {k: v for k, v in r.items() if k not in ("a", "b", "verdict")}
        g["tied_with_best"] = r["verdict"] != "a"


def order_pairs(
    perms: list[dict[str, Any]],
    entries: dict[str, list[dict[str, Any]]],
    correct: dict[str, np.ndarray],
    spec: Any,
) -> list[dict[str, Any]]:
    """Every pair of full orders compared on the same test images, seed by seed
    (:func:`pqd.stats.compare_over_seeds`), Holm over all the pairs: one row per pair with
    ``a`` and ``b`` (group ids, ``a`` the better ranked), the comparison of a against b,
    ``p_holm`` and ``verdict`` (``"a"``, ``"b"`` or ``"tie"``, :func:`pqd.stats.decide`).

    Args:
        perms: the full orders' groups, ranked best first.
        entries: trial entries by group id.
        correct: per-image correctness by trial key.
        spec: the recipe's ``search`` section (``alpha``, ``min_effect_points``).
    """
    pairs = list(itertools.combinations(perms, 2))
    comparisons = [paired_groups(entries[a["id"]], entries[b["id"]], correct) for a, b in pairs]
    adjusted = holm_adjusted(comparisons)
    rows = []
    for (a, b), c, p_adj in zip(pairs, comparisons, adjusted, strict=True):
        if c is None or p_adj is None:
            continue
        verdict = decide(c, p_adj, spec.alpha, spec.min_effect_points / 100.0)
        rows.append(
            {"a": a["id"], "b": b["id"], **c, "p_holm": round(p_adj, 6), "verdict": verdict}
        )
    return rows


def pairwise_table(
    names: list[str],
    groups: dict[str, dict[str, Any]],
    entries: dict[str, list[dict[str, Any]]],
    correct: dict[str, np.ndarray],
    spec: Any,
) -> dict[str, Any]:
    """The pairwise table, the win graph's edges, and the topological order or the cycle."""
    pairs = list(itertools.combinations(names, 2))
    comparisons = [
        paired_groups(
            entries.get(f"pairwise:{a}>{b}", []), entries.get(f"pairwise:{b}>{a}", []), correct
        )
        for a, b in pairs
    ]
    adjusted = holm_adjusted(comparisons)
    rows, edges, ties = [], [], []
    for (a, b), comp, p_adj in zip(pairs, comparisons, adjusted, strict=True):
        ab, ba = groups.get(f"pairwise:{a}>{b}", {}), groups.get(f"pairwise:{b}>{a}", {})
        winner, why = decide_pair(
            bool(ab.get("n")),
            bool(ba.get("n")),
            comp,
            p_adj,
            ab.get("latency_p50_ms"),
            ba.get("latency_p50_ms"),
            spec,
        )
        first = {"ab": a, "ba": b, None: None}[winner]
        if first is not None:
            edges.append([first, b if first == a else a])
        else:
            ties.append([a, b])
        rows.append(
            {
                "a": a,
                "b": b,
                "ab_accuracy": ab.get("accuracy_mean"),
                "ba_accuracy": ba.get("accuracy_mean"),
                "ab_accuracy_std": ab.get("accuracy_std"),
                "ba_accuracy_std": ba.get("accuracy_std"),
                "ab_p50_ms": ab.get("latency_p50_ms"),
                "ba_p50_ms": ba.get("latency_p50_ms"),
                "first": first,
                "decided_by": why,
                "margin_points": (
                    round(100 * (ab["accuracy_mean"] - ba["accuracy_mean"]), 2)
                    if ab.get("n") and ba.get("n")
                    else None
                ),
                "paired": None if comp is None else {**comp, "p_holm": round(p_adj or 1.0, 6)},
            }
        )
    topo = topological_order(names, [(a, b) for a, b in edges])
    return {
        "table": rows,
        "edges": edges,
        "ties": ties,
        **topo,
        "edge_meaning": "an edge [a, b] means running a before b won (a->b beat b->a)",
    }
