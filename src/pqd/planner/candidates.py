"""Candidates: per-group keep levels (uniform, a greedy path, random)."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np

from pqd.latency_model.model import LatencyModel, Ratios
from pqd.planner.latency import ratio_steps


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
