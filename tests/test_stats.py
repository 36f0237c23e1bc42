"""pqd.stats against worked examples: published Wilson and t intervals, McNemar on 2x2
tables computed by hand, Holm on a textbook family, the bootstrap on constructed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pqd import stats


@pytest.mark.parametrize(
    ("correct", "n", "low", "high"),
    [  # Newcombe (1998), Statistics in Medicine 17:857, Table II, method 3 (score, no CC)
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_matches_newcombe(correct: int, n: int, low: float, high: float) -> None:
    lo, hi = stats.wilson_interval(correct, n)
    assert lo == pytest.approx(low, abs=6e-5)
    assert hi == pytest.approx(high, abs=6e-5)


def test_wilson_at_the_subset_and_full_test_sizes() -> None:
    """The figures the issue quotes: about +-2.5 points near 78% on 1,017 images,
    about +-0.6 near 90% on 10,000."""
    lo, hi = stats.wilson_interval(793, 1017)
    assert 0.024 < (hi - lo) / 2 < 0.027
    lo, hi = stats.wilson_interval(9000, 10000)
    assert 0.0055 < (hi - lo) / 2 < 0.0062


def test_mcnemar_exact_by_hand() -> None:
    # b=1, c=9: 2 * P(X <= 1), X ~ Bin(10, 1/2) = 2 * (1 + 10) / 1024
    assert stats.mcnemar_exact(1, 9) == pytest.approx(22 / 1024, rel=1e-12)
    assert stats.mcnemar_exact(9, 1) == stats.mcnemar_exact(1, 9)
    # b=0, c=5: 2 / 32
    assert stats.mcnemar_exact(0, 5) == pytest.approx(1 / 16)
    assert stats.mcnemar_exact(3, 3) == 1.0
    assert stats.mcnemar_exact(0, 0) == 1.0


def test_above_chance_by_hand() -> None:
    # 7 of 10 at chance 1/2: P(X >= 7) = (120 + 45 + 10 + 1) / 1024
    assert stats.above_chance_p(7, 10, 0.5) == pytest.approx(176 / 1024, rel=1e-12)
    # 3 of 3 at chance 1/10: 1e-3; 0 right is never above chance
    assert stats.above_chance_p(3, 3, 0.1) == pytest.approx(1e-3, rel=1e-12)
    assert stats.above_chance_p(0, 50, 0.1) == 1.0
    # a one-class answer on 5,000 balanced images (500 right) is chance; 84% is far above
    assert stats.above_chance_p(500, 5000, 0.1) > 0.4
    assert stats.above_chance_p(4200, 5000, 0.1) < 1e-100
    assert stats.above_chance_p(0, 0, 0.1) == 1.0
    with pytest.raises(ValueError):
        stats.above_chance_p(11, 10, 0.1)


def test_t_interval_student_sleep_data() -> None:
    """Cushny & Peebles' differences (Student 1908): R's t.test gives 0.7001142..2.4598858."""
    diffs = [1.2, 2.4, 1.3, 1.3, 0.0, 1.0, 1.8, 0.8, 4.6, 1.4]
    mean, sd, lo, hi = stats.t_interval(diffs)
    assert mean == pytest.approx(1.58)
    assert sd == pytest.approx(1.229995, abs=1e-6)
    assert lo == pytest.approx(0.7001142, abs=1e-6)
    assert hi == pytest.approx(2.4598858, abs=1e-6)
    assert stats.t_interval([0.9]) == (0.9, 0.0, 0.9, 0.9)


def test_holm_textbook_family() -> None:
    # raw 0.01, 0.04, 0.03, 0.005 -> sorted 0.005*4, 0.01*3, 0.03*2, 0.04*1 (monotone)
    adj = stats.holm([0.01, 0.04, 0.03, 0.005])
    assert adj == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_paired_bootstrap_against_the_exact_difference() -> None:
    """Constructed: 1000 images, a alone right on 60, b alone on 20, both on 700. The point
    difference is exact (+4 points); the interval matches the normal one of a paired
    difference (se from the discordant shares) within 10% and covers the difference."""
    n, only_a, only_b, both = 1000, 60, 20, 700
    a = np.zeros(n, bool)
    b = np.zeros(n, bool)
    a[:both] = b[:both] = True
    a[both : both + only_a] = True
    b[both + only_a : both + only_a + only_b] = True
    diff, lo, hi = stats.paired_bootstrap(a, b, resamples=20_000)
    assert diff == pytest.approx(0.04)
    p1, p2 = only_a / n, only_b / n
    se = math.sqrt((p1 + p2 - (p1 - p2) ** 2) / n)
    assert (hi - lo) / 2 == pytest.approx(1.96 * se, rel=0.1)
    assert lo < diff < hi
    assert lo > 0  # 40 discordant images net: clearly positive
    # identical answers: no uncertainty about the difference
    assert stats.paired_bootstrap(a, a) == (0.0, 0.0, 0.0)
    # reproducible
    assert stats.paired_bootstrap(a, b, seed=3) == stats.paired_bootstrap(a, b, seed=3)


def test_paired_bootstrap_matches_resampling_images() -> None:
    """The multinomial shortcut draws the same distribution as resampling image indices."""
    rng = np.random.default_rng(1)
    a = rng.random(400) < 0.8
    b = np.where(rng.random(400) < 0.1, ~a, a)
    _, lo, hi = stats.paired_bootstrap(a, b, resamples=20_000)
    idx = rng.integers(0, 400, size=(20_000, 400))
    diffs = a[idx].mean(1) - b[idx].mean(1)
    ref_lo, ref_hi = np.quantile(diffs, [0.025, 0.975])
    assert lo == pytest.approx(ref_lo, abs=0.004)
    assert hi == pytest.approx(ref_hi, abs=0.004)


def test_compare_paired_counts_and_verdict() -> None:
    y = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9] * 10)
    pa = y.copy()
    pb = y.copy()
    pb[:12] = (pb[:12] + 1) % 10  # b wrong on 12 images a gets right
    pa[50:51] = (pa[50:51] + 1) % 10  # a wrong on one b gets right
    c = stats.compare_paired(pa, pb, y)
    assert (c.a_only, c.b_only, c.n) == (12, 1, 100)
    assert c.difference == pytest.approx(0.11)
    assert c.p_value == pytest.approx(stats.mcnemar_exact(12, 1))
    assert c.verdict("final", "baseline") == "final better"
    assert c.disagreement == pytest.approx(0.13)
    assert stats.compare_paired(pa, pa, y).verdict() == "tie"
    with pytest.raises(ValueError):
        stats.compare_paired(pa[:5], pb, y)
    # as JSON: a tiny p keeps its digits (rounding it to 6 decimals printed "p = 0")
    far = stats.compare_paired(
        np.tile(y, 10), (np.tile(y, 10) + (np.arange(1000) < 80)) % 10, np.tile(y, 10)
    )
    assert far.as_dict()["p_value"] > 0
    assert far.as_dict()["p_value"] == pytest.approx(stats.mcnemar_exact(80, 0), rel=1e-5)
    assert far.as_dict()["difference"] == 0.08


def test_seed_summary_says_which_noise_dominates() -> None:
    wide = stats.seed_summary([0.80, 0.90, 0.85], n_images=10_000)
    assert wide["dominant"] == "seed spread"
    narrow = stats.seed_summary([0.850, 0.851, 0.849], n_images=1017)
    assert narrow["dominant"] == "test-set noise"
    assert narrow["ci_low"] < 0.85 < narrow["ci_high"]
    assert stats.seed_summary([0.85], 1017)["dominant"] == "one seed"


def test_sample_sizes_grow_as_the_effect_shrinks() -> None:
    # Connor (1987) for 5% discordant, 1-point difference: about 3.9k images
    n = stats.images_to_resolve(0.01, 0.05)
    assert n is not None and 3500 < n < 4200
    assert stats.images_to_resolve(0.005, 0.05) > n
    assert stats.images_to_resolve(0.0, 0.05) is None
    # normal approx (1.96 + 0.84)^2 * (sd/d)^2 = 7.85 for sd = d; t grows it to 10
    s = stats.seeds_to_resolve(0.5, 0.5)
    assert s is not None and 9 <= s <= 11
    assert stats.seeds_to_resolve(0.5, 0.0) is None
