"""The latency model's arithmetic: lookup tables made monotone, bilinear interpolation
between their grid points, and the whole-network overhead fit.

Kept apart from the measuring so that a prediction is plain numpy on measured numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def monotone(table: np.ndarray) -> np.ndarray:
    """``table`` with a running maximum along both axes (non-decreasing in both widths)."""
    t = np.maximum.accumulate(np.asarray(table, dtype=np.float64), axis=0)
    return np.maximum.accumulate(t, axis=1)


def bilinear(xs: Sequence[int], ys: Sequence[int], table: np.ndarray, x: float, y: float) -> float:
    """Bilinear interpolation of ``table[i, j]`` (at ``xs[i]``, ``ys[j]``, both ascending) at
    (x, y), clamped to the grid's edges. Monotone tables give monotone results."""
    xs_a = np.asarray(xs, dtype=np.float64)
    ys_a = np.asarray(ys, dtype=np.float64)
    x = float(np.clip(x, xs_a[0], xs_a[-1]))
    y = float(np.clip(y, ys_a[0], ys_a[-1]))
    i = int(np.clip(np.searchsorted(xs_a, x, side="right") - 1, 0, max(0, len(xs_a) - 2)))
    j = int(np.clip(np.searchsorted(ys_a, y, side="right") - 1, 0, max(0, len(ys_a) - 2)))
    i1, j1 = min(i + 1, len(xs_a) - 1), min(j + 1, len(ys_a) - 1)
    tx = 0.0 if i1 == i else (x - xs_a[i]) / (xs_a[i1] - xs_a[i])
    ty = 0.0 if j1 == j else (y - ys_a[j]) / (ys_a[j1] - ys_a[j])
    top = table[i, j] * (1 - ty) + table[i, j1] * ty
    bottom = table[i1, j] * (1 - ty) + table[i1, j1] * ty
    return float(top * (1 - tx) + bottom * tx)


def fit_overhead(sums: Sequence[float], measured: Sequence[float]) -> tuple[float, float]:
    """``(overhead_ms, scale)`` with ``measured ~ overhead + scale * sums`` (least squares,
    ``scale >= 0``; one point: scale 1)."""
    s = np.asarray(sums, dtype=np.float64)
    m = np.asarray(measured, dtype=np.float64)
    if len(s) >= 2 and np.ptp(s) > 0:
        scale, overhead = np.polyfit(s, m, 1)
        if scale > 0:
            return float(overhead), float(scale)
    return float(np.mean(m - s)), 1.0
