"""Activation range rules on known distributions: min-max, percentile, entropy (KL)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pqd.quant.calibration import TensorStats, entropy_threshold, percentile_range

N = 1_000_000


def stats_of(x: torch.Tensor, magnitude: bool) -> TensorStats:
    s = TensorStats()
    s.observe_range(x[: len(x) // 2])
    s.observe_range(x[len(x) // 2 :])  # two batches: the range is their union
    s.start_histogram(magnitude)
    s.observe_histogram(x[: len(x) // 2])
    s.observe_histogram(x[len(x) // 2 :])
    return s


@pytest.fixture(scope="module")
def normal() -> torch.Tensor:
    return torch.randn(N, generator=torch.Generator().manual_seed(0))


def test_minmax_is_the_observed_span_with_zero_inside() -> None:
    s = stats_of(torch.tensor([0.5, 2.0, 3.0, 1.0]), False)
    assert s.range("minmax", symmetric=False, levels=256) == (0.0, 3.0)  # 0 always inside
    s = stats_of(torch.tensor([-1.0, 2.0, 0.5, 1.0]), False)
    assert s.range("minmax", symmetric=True, levels=128) == (-2.0, 2.0)


def test_percentile_of_uniform_is_the_quantile() -> None:
    u = torch.rand(N, generator=torch.Generator().manual_seed(1)) * 4.0  # U[0, 4]
    lo, hi = stats_of(u, False).range("percentile", symmetric=False, levels=256, percentile=99.0)
    assert lo == 0.0  # the lower quantile (0.04) is raised to include 0
    assert hi == pytest.approx(3.96, abs=0.01)


def test_percentile_of_normal_matches_the_gaussian_quantile(normal: torch.Tensor) -> None:
    # |x| percentile 99.99 of N(0, 1): P(|x| < z) = 0.9999 -> z = 3.8906
    lo, hi = stats_of(normal, True).range(
        "percentile", symmetric=True, levels=128, percentile=99.99
    )
    assert hi == -lo and hi == pytest.approx(3.8906, abs=0.06)
    # two-sided, asymmetric: 0.01% on each side -> z = 3.719
    lo, hi = stats_of(normal, False).range(
        "percentile", symmetric=False, levels=256, percentile=99.99
    )
    assert lo == pytest.approx(-3.719, abs=0.06) and hi == pytest.approx(3.719, abs=0.06)


def test_percentile_range_helper_on_a_hand_made_histogram() -> None:
    hist = np.array([0, 50, 30, 20], dtype=float)  # |x| over [0, 4], bins of width 1
    assert percentile_range(hist, 0.0, 4.0, 80.0, magnitude=True) == (-3.0, 3.0)
    assert percentile_range(hist, 0.0, 4.0, 50.0, magnitude=True) == (-2.0, 2.0)


def test_entropy_keeps_the_whole_range_of_a_uniform() -> None:
    u = torch.rand(N, generator=torch.Generator().manual_seed(2))
    s = stats_of(u, True)
    _, hi = s.range("entropy", symmetric=False, levels=256)
    assert hi == pytest.approx(1.0, abs=2 / 2048)  # clipping a flat density only hurts


def test_entropy_clips_rare_outliers_but_keeps_the_bulk(normal: torch.Tensor) -> None:
    x = torch.cat([normal, torch.full((100,), 20.0), torch.full((100,), -20.0)])  # 0.02%
    s = stats_of(x, True)
    assert s.range("minmax", symmetric=True, levels=128)[1] == 20.0
    t = s.range("entropy", symmetric=True, levels=128)[1]
    assert 3.5 < t < 6.0  # max of the Gaussian bulk (~4.9), far below the outliers


def test_entropy_clips_a_heavy_tail_and_more_with_fewer_levels() -> None:
    lap = torch.distributions.Laplace(0.0, 1.0).sample((N,)).abs()
    amax = float(lap.max())
    s = stats_of(lap, True)
    t128 = s.range("entropy", symmetric=True, levels=128)[1]
    t16 = s.range("entropy", symmetric=True, levels=16)[1]
    assert 0.4 * amax < t128 < 0.95 * amax
    assert t16 < t128


def test_entropy_threshold_is_an_upper_bin_edge_and_needs_levels_bins() -> None:
    hist = np.ones(256)
    assert entropy_threshold(hist, 2.56, levels=128) == pytest.approx(2.56)
    assert entropy_threshold(np.ones(64), 1.0, levels=128) == 1.0  # too few bins: no clip
    decaying = 2.0 ** -np.arange(300.0)  # mass halves every bin: clip as early as allowed
    t = entropy_threshold(decaying * 1e12, 3.0, levels=128)
    assert 128 * 3.0 / 300 <= t <= 136 * 3.0 / 300  # within a few bins of the smallest


def test_entropy_ignores_the_zero_spike_of_relu_outputs(normal: torch.Tensor) -> None:
    """Half exact zeros (a ReLU output) must not drag the threshold to the smallest
    candidate: it stays where it is for the non-zero half alone."""
    bulk = normal.abs()
    relu = torch.cat([bulk, torch.zeros_like(bulk)])
    amax = float(bulk.max())
    t_bulk = stats_of(bulk, True).range("entropy", symmetric=False, levels=256)[1]
    t_relu = stats_of(relu, True).range("entropy", symmetric=False, levels=256)[1]
    smallest = 256 * amax / 2048  # `levels` bins of 2048
    assert t_relu > 1.5 * smallest
    assert t_relu == pytest.approx(t_bulk, rel=0.1)
