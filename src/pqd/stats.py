"""How sure a measured accuracy, or a difference of two, is: the statistics behind every
accuracy and comparison pqd reports.

- one accuracy on ``n`` test images: the Wilson score interval (Wilson 1927), which holds near
  0 and 1 where the normal (Wald) interval does not;
- two models on the same images: the difference with a paired-bootstrap interval (images
  resampled, both models' answers kept together) and the exact McNemar test on the
  discordant images (the ones only one model gets right);
- the same trial over seeds: mean, sd and a Student-t interval, and whether the seed spread
  or the test-set noise is the larger source of uncertainty;
- one accuracy against guessing: the one-sided exact binomial test (a stage that leaves a
  model at chance stops the run);
- many comparisons at once (every pair of orders): Holm's step-down correction, and how many
  test images or seeds would resolve a difference of the observed size.

Plain numpy/scipy: no torch, so that every layer can use it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats as _st

CONFIDENCE = 0.95
"""The confidence level of every interval pqd reports."""

ALPHA = 0.05
"""The significance level of every test pqd reports (family-wise, after Holm)."""


def _z(confidence: float) -> float:
    return float(_st.norm.ppf(0.5 + confidence / 2))


def wilson_interval(correct: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a proportion (no continuity correction).

    Args:
        correct: images classified correctly.
        n: images in all (0 gives ``(0.0, 1.0)``: nothing is known).
        confidence: two-sided level, e.g. 0.95.

    Returns:
        ``(low, high)`` as fractions in [0, 1].
    """
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= correct <= n:
        raise ValueError(f"correct={correct} must lie in [0, n={n}]")
    z = _z(confidence)
    p = correct / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def accuracy_summary(correct: np.ndarray | Sequence[bool]) -> dict[str, float | int]:
    """Top-1 accuracy of per-image correctness with its 95% Wilson interval.

    Args:
        correct: one boolean per test image.

    Returns:
        ``{"accuracy", "ci_low", "ci_high", "n"}`` (fractions; ``n`` images).
    """
    c = np.asarray(correct, dtype=bool)
    lo, hi = wilson_interval(int(c.sum()), len(c))
    return {
        "accuracy": float(c.mean()) if len(c) else 0.0,
        "ci_low": round(lo, 6),
        "ci_high": round(hi, 6),
        "n": len(c),
    }


def mcnemar_exact(b: int, c: int) -> float:
    """Exact (binomial) two-sided McNemar test.

    Args:
        b: images the first model gets right and the second wrong.
        c: images the second model gets right and the first wrong.

    Returns:
        The p-value: ``min(1, 2 * P(X <= min(b, c)))`` for ``X ~ Binomial(b + c, 1/2)``;
        1.0 when no image is discordant.
    """
    n = b + c
    if n == 0:
        return 1.0
    return float(min(1.0, 2 * _st.binom.cdf(min(b, c), n, 0.5)))


def above_chance_p(correct: int, n: int, chance: float) -> float:
    """One-sided exact binomial test that an accuracy lies above ``chance``.

    Args:
        correct: images classified correctly.
        n: images in all.
        chance: the accuracy of guessing, a fraction (e.g. 1/classes, or the most common
            class's share where classes are unbalanced).

    Returns:
        ``P(X >= correct)`` for ``X ~ Binomial(n, chance)``; 1.0 when ``n`` is 0.
    """
    if n <= 0:
        return 1.0
    if not 0 <= correct <= n:
        raise ValueError(f"correct={correct} must lie in [0, n={n}]")
    return float(_st.binom.sf(correct - 1, n, chance))


def paired_bootstrap(
    correct_a: np.ndarray,
    correct_b: np.ndarray,
    *,
    resamples: int = 10_000,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Percentile bootstrap interval of ``acc(a) - acc(b)`` on the same images.

    Images are resampled with replacement and both models' answers on an image stay
    together, so the interval reflects how often the two disagree, not only how often
    each is right. The resampled difference depends only on how many of each discordant
    kind are drawn, so the resamples are drawn as multinomial counts (exactly the same
    distribution as resampling the images, at the cost of three numbers per resample).

    Args:
        correct_a: per-image correctness of model a (bool).
        correct_b: per-image correctness of model b, same images in the same order.
        resamples: bootstrap resamples.
        confidence: two-sided level.
        seed: random seed (the interval is reproducible).

    Returns:
        ``(difference, low, high)`` as fractions (a minus b).
    """
    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(
            f"paired correctness must be two 1-D arrays of one length: {a.shape}, {b.shape}"
        )
    n = len(a)
    if n == 0:
        return 0.0, -1.0, 1.0
    only_a = int((a & ~b).sum())
    only_b = int((~a & b).sum())
    rng = np.random.default_rng(seed)
    probs = [only_a / n, only_b / n, (n - only_a - only_b) / n]
    draws = rng.multinomial(n, probs, size=resamples)
    diffs = (draws[:, 0] - draws[:, 1]) / n
    tail = (1 - confidence) / 2
    lo, hi = np.quantile(diffs, [tail, 1 - tail])
    return (only_a - only_b) / n, float(lo), float(hi)


def paired_verdict(
    a_only: int, b_only: int, p_value: float, a: str = "a", b: str = "b", alpha: float = ALPHA
) -> str:
    """A paired comparison's verdict: ``"tie"`` unless ``p_value`` (raw or adjusted, e.g.
    Holm) is below ``alpha`` and the discordant counts differ, else ``"<a> better"`` or
    ``"<b> better"`` by which model alone gets more images right."""
    if p_value >= alpha or a_only == b_only:
        return "tie"
    return f"{a} better" if a_only > b_only else f"{b} better"


@dataclass(frozen=True)
class PairedComparison:
    """Model a against model b on the same ``n`` test images (fractions unless named).

    ``difference`` is ``accuracy_a - accuracy_b`` with its paired-bootstrap interval;
    ``a_only`` / ``b_only`` count the images only a / only b gets right; ``p_value`` is the
    exact McNemar test on them; ``disagreement`` the share of images whose predicted
    classes differ (even where both are wrong).
    """

    n: int
    accuracy_a: float
    accuracy_b: float
    difference: float
    ci_low: float
    ci_high: float
    a_only: int
    b_only: int
    p_value: float
    disagreement: float

    @property
    def significant(self) -> bool:
        """The McNemar p-value is below :data:`ALPHA` (uncorrected)."""
        return self.p_value < ALPHA

    def verdict(self, a: str = "a", b: str = "b", alpha: float = ALPHA) -> str:
        """``"a better"``, ``"b better"`` or ``"tie"`` at level ``alpha`` (McNemar)."""
        return paired_verdict(self.a_only, self.b_only, self.p_value, a, b, alpha)

    def as_dict(self) -> dict[str, float | int]:
        """JSON-ready fields: fractions rounded to 6 decimals, the p-value to 6 significant
        digits (a p of 1e-20 stays 1e-20, not 0)."""
        return {
            k: (float(f"{v:.6g}") if k == "p_value" else round(v, 6)) if isinstance(v, float) else v
            for k, v in asdict(self).items()
        }


def compare_paired(
    pred_a: np.ndarray, pred_b: np.ndarray, labels: np.ndarray, *, seed: int = 0
) -> PairedComparison:
    """Compare two models' predicted classes on the same labelled images.

    Args:
        pred_a: predicted class per image of model a (ints).
        pred_b: predicted class per image of model b, same images in the same order.
        labels: true class per image.
        seed: bootstrap seed.

    Returns:
        The :class:`PairedComparison` of a against b.
    """
    pa, pb, y = (np.asarray(v) for v in (pred_a, pred_b, labels))
    if not (pa.shape == pb.shape == y.shape):
        raise ValueError(
            f"predictions and labels differ in shape: {pa.shape}, {pb.shape}, {y.shape}"
        )
    ca, cb = pa == y, pb == y
    diff, lo, hi = paired_bootstrap(ca, cb, seed=seed)
    a_only, b_only = int((ca & ~cb).sum()), int((~ca & cb).sum())
    return PairedComparison(
        n=len(y),
        accuracy_a=float(ca.mean()) if len(y) else 0.0,
        accuracy_b=float(cb.mean()) if len(y) else 0.0,
        difference=diff,
        ci_low=lo,
        ci_high=hi,
        a_only=a_only,
        b_only=b_only,
        p_value=mcnemar_exact(a_only, b_only),
        disagreement=float((pa != pb).mean()) if len(y) else 0.0,
    )


def t_interval(
    values: Sequence[float], confidence: float = CONFIDENCE
) -> tuple[float, float, float, float]:
    """Mean, sample sd and the Student-t interval of the mean.

    Args:
        values: one value per seed (any unit; the interval is in the same unit).
        confidence: two-sided level.

    Returns:
        ``(mean, sd, low, high)``; with one value the sd is 0 and the interval that value's
        (nothing is known about the spread: callers say so).
    """
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        raise ValueError("t_interval needs at least one value")
    mean = float(v.mean())
    if len(v) == 1:
        return mean, 0.0, mean, mean
    sd = float(v.std(ddof=1))
    half = float(_st.t.ppf(0.5 + confidence / 2, len(v) - 1)) * sd / math.sqrt(len(v))
    return mean, sd, mean - half, mean + half


def seed_summary(accuracies: Sequence[float], n_images: int) -> dict[str, float | int | str]:
    """Across seeds: mean, sd, t-interval and which noise dominates.

    The test-set noise of one run is the binomial sd ``sqrt(p (1 - p) / n)`` of its accuracy;
    when the seed-to-seed sd is larger, more seeds narrow the answer more than more test
    images do, and the other way round.

    Args:
        accuracies: top-1 per seed (fractions).
        n_images: test images each accuracy was measured on.

    Returns:
        ``{"mean", "sd", "ci_low", "ci_high", "seeds", "test_sd", "dominant"}`` (fractions;
        ``dominant`` is ``"seed spread"``, ``"test-set noise"`` or ``"one seed"``).
    """
    mean, sd, lo, hi = t_interval(accuracies)
    test_sd = math.sqrt(max(mean * (1 - mean), 0.0) / n_images) if n_images else float("nan")
    if len(accuracies) < 2:
        dominant = "one seed"
    else:
        dominant = "seed spread" if sd > test_sd else "test-set noise"
    return {
        "mean": round(mean, 6),
        "sd": round(sd, 6),
        "ci_low": round(lo, 6),
        "ci_high": round(hi, 6),
        "seeds": len(accuracies),
        "test_sd": round(test_sd, 6),
        "dominant": dominant,
    }


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error control over the family).

    Args:
        p_values: one raw p-value per hypothesis.

    Returns:
        Adjusted p-values in the input order (monotone in the raw ones, at most 1); reject a
        hypothesis at level alpha when its adjusted p-value is below alpha.
    """
    p = np.asarray(p_values, dtype=float)
    m = len(p)
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return [float(v) for v in adjusted]


def images_to_resolve(
    difference: float, discordant: float, alpha: float = ALPHA, power: float = 0.8
) -> int | None:
    """Test images a paired (McNemar) comparison needs to find ``difference`` significant
    with probability ``power`` (Connor 1987).

    Args:
        difference: accuracy difference to detect (fraction, sign ignored).
        discordant: share of images on which the two models' correctness differs.
        alpha: two-sided level.
        power: wanted probability of detecting the difference.

    Returns:
        Images needed (rounded up), or None when the difference is 0 or impossible given the
        discordant share (``|difference| > discordant``).
    """
    d = abs(difference)
    if d == 0 or discordant <= 0 or d > discordant:
        return None
    za, zb = _z(1 - alpha), float(_st.norm.ppf(power))
    n = (za * math.sqrt(discordant) + zb * math.sqrt(discordant - d * d)) ** 2 / (d * d)
    return math.ceil(n)


def seeds_to_resolve(
    difference: float, sd: float, alpha: float = ALPHA, power: float = 0.8
) -> int | None:
    """Seeds a paired t-test on per-seed differences needs to find ``difference``
    significant with probability ``power`` (normal approximation, then grown until the
    t quantiles agree).

    Args:
        difference: mean per-seed difference to detect (any unit, sign ignored).
        sd: sd of the per-seed difference (same unit).
        alpha: two-sided level.
        power: wanted probability.

    Returns:
        Seeds needed (at least 2), or None when the difference is 0 or the sd unknown.
    """
    d = abs(difference)
    if d == 0 or not sd or not math.isfinite(sd):
        return None
    zb = float(_st.norm.ppf(power))
    n = max(2, math.ceil(((_z(1 - alpha) + zb) * sd / d) ** 2))
    for _ in range(1000):
        df = n - 1
        need = ((float(_st.t.ppf(1 - alpha / 2, df)) + float(_st.t.ppf(power, df))) * sd / d) ** 2
        if n >= need:
            return n
        n += 1
    return n


def compare_over_seeds(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]], *, seed: int = 0
) -> dict[str, Any]:
    """Model a against model b, trained once per seed and tested on the same images.

    Each pair holds the per-image correctness of a and of b for one seed. The image-level
    evidence is pooled over the seeds: the difference with a paired-bootstrap interval over
    all (seed, image) pairs and the exact McNemar test on all discordant ones. The seed-level
    evidence is the per-seed difference: mean, sd and t-interval, and whether the seed
    spread or the test-set noise of one seed's difference dominates (when the seeds spread
    more than the images explain, the pooled test alone would be overconfident).

    Args:
        pairs: ``[(correct_a, correct_b), ...]``, one per seed, boolean arrays of one length.
        seed: bootstrap seed.

    Returns:
        JSON-ready dict (fractions): ``n`` (images per seed), ``seeds``, ``difference``,
        ``ci_low``/``ci_high`` (pooled bootstrap), ``a_only``/``b_only``/``p_value`` (pooled
        McNemar), ``per_seed`` differences, ``seed_sd``, ``seed_ci`` (t, None with one seed),
        ``test_sd`` (binomial sd of one seed's paired difference), ``dominant``,
        ``images_to_resolve`` (per seed, at the observed effect and discordance, 80% power)
        and ``seeds_to_resolve`` (at the observed effect and seed sd).
    """
    if not pairs:
        raise ValueError("compare_over_seeds needs at least one seed")
    a = np.concatenate([np.asarray(p[0], bool) for p in pairs])
    b = np.concatenate([np.asarray(p[1], bool) for p in pairs])
    n = len(pairs[0][0])
    diff, lo, hi = paired_bootstrap(a, b, seed=seed)
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    per_seed = [float(np.mean(p[0]) - np.mean(p[1])) for p in pairs]
    discordant = (a_only + b_only) / len(a) if len(a) else 0.0
    test_sd = math.sqrt(max(discordant - diff * diff, 0.0) / n) if n else float("nan")
    seed_ci: list[float] | None = None
    seed_sd = 0.0
    heterogeneity_p: float | None = None
    if len(pairs) >= 2:
        _, seed_sd, s_lo, s_hi = t_interval(per_seed)
        seed_ci = [round(s_lo, 6), round(s_hi, 6)]
        dominant = "seed spread" if seed_sd > test_sd else "test-set noise"
        heterogeneity_p = _heterogeneity(pairs, per_seed)
    else:
        dominant = "one seed"
    return {
        "n": n,
        "seeds": len(pairs),
        "difference": round(diff, 6),
        "ci_low": round(lo, 6),
        "ci_high": round(hi, 6),
        "a_only": a_only,
        "b_only": b_only,
        "p_value": mcnemar_exact(a_only, b_only),
        "per_seed": [round(d, 6) for d in per_seed],
        "seed_sd": round(seed_sd, 6),
        "seed_ci": seed_ci,
        "test_sd": round(test_sd, 6),
        "dominant": dominant,
        "heterogeneity_p": None if heterogeneity_p is None else round(heterogeneity_p, 6),
        "images_to_resolve": images_to_resolve(diff, discordant),
        "seeds_to_resolve": seeds_to_resolve(diff, seed_sd) if len(pairs) >= 2 else None,
    }


def _heterogeneity(pairs: Sequence[tuple[np.ndarray, np.ndarray]], per_seed: list[float]) -> float:
    """Cochran's Q test: do the per-seed differences spread more than each seed's own
    test-image noise explains? Returns its p-value (chi-square, seeds - 1 df)."""
    weights = []
    for (a, b), d in zip(pairs, per_seed, strict=True):
        a, b = np.asarray(a, bool), np.asarray(b, bool)
        disc = float((a != b).mean())
        var = max(disc - d * d, 0.0) / len(a)
        weights.append(1.0 / var if var > 0 else math.inf)
    if any(math.isinf(w) for w in weights):  # a seed with no discordant image: no noise
        return 0.0 if len(set(per_seed)) > 1 else 1.0
    w = np.asarray(weights)
    diffs = np.asarray(per_seed)
    pooled = float((w * diffs).sum() / w.sum())
    q = float((w * (diffs - pooled) ** 2).sum())
    return float(_st.chi2.sf(q, len(per_seed) - 1))


def decide(
    comparison: dict[str, Any], p_adjusted: float, alpha: float = ALPHA, min_effect: float = 0.0
) -> str:
    """``"a"``, ``"b"`` or ``"tie"`` for a :func:`compare_over_seeds` result.

    a (or b) wins only when the pooled McNemar test, adjusted for the family it belongs to
    (``p_adjusted``, e.g. :func:`holm`), is below ``alpha``; when the seeds spread more than
    their test images explain (Cochran's Q, p below ``alpha``), pooling the images would be
    overconfident and the per-seed t-interval must exclude 0 too; and the difference must be
    at least ``min_effect`` (fraction: the smallest effect worth reporting).

    Args:
        comparison: the comparison of a against b.
        p_adjusted: its family-adjusted McNemar p-value.
        alpha: family-wise significance level.
        min_effect: smallest absolute difference (fraction) that counts.

    Returns:
        ``"a"``, ``"b"`` or ``"tie"``.
    """
    diff = float(comparison["difference"])
    if p_adjusted >= alpha or diff == 0 or abs(diff) < min_effect:
        return "tie"
    ci = comparison.get("seed_ci")
    het = comparison.get("heterogeneity_p")
    if het is not None and float(het) < alpha and ci is not None:
        lo, hi = ci
        if lo <= 0 <= hi:
            return "tie"
    return "a" if diff > 0 else "b"
