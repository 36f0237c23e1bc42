"""Small pieces of report text: sizes, speed-ups, points, intervals, paired comparisons,
kernel summaries."""

from __future__ import annotations

import math
from typing import Any


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


def seconds_text(timing: dict[str, Any]) -> str:
    """A run's wall time: over all its processes, and this process's share when it was
    stopped and continued.

    Args:
        timing: a record's ``timing_s`` (seconds; records before ``all_processes`` existed
            count their last process only).

    Returns:
        e.g. ``"412 s"`` or ``"7,310 s over several processes (2,674 s since the last start)"``.
    """
    total = float(timing["total"])
    every = float(timing.get("all_processes", total))
    if every - total < 0.5:
        return f"{total:,.0f} s"
    return f"{every:,.0f} s over several processes ({total:,.0f} s since the last start)"


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


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
