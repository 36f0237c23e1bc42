"""The corruption suite: deterministic bytes, and each corruption does what its name says."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pqd.measurement.corruptions import (
    CORRUPTIONS,
    corrupt,
    corrupted_set,
    disk_kernel,
    jpeg_roundtrip,
    motion_kernel_offsets,
    plasma_fractal,
)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Smooth, textured uint8 NCHW images (gradients + a few edges), 6 of 32x32."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:32, 0:32]
    out = []
    for k in range(6):
        base = 60 + 3 * xx + 2 * yy + 40 * ((xx // (4 + k)) % 2)
        img = np.stack([base, base[::-1] * 0.8, 200 - base * 0.5]) + rng.integers(
            0, 20, (3, 32, 32)
        )
        out.append(np.clip(img, 0, 255))
    return np.asarray(out, dtype=np.uint8)


def high_freq_energy(x: np.ndarray) -> float:
    """Energy of the horizontal and vertical pixel differences (a high-pass)."""
    f = x.astype(np.float64)
    return float((np.diff(f, axis=-1) ** 2).mean() + (np.diff(f, axis=-2) ** 2).mean())


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_same_seed_same_bytes_and_shape(images: np.ndarray, name: str) -> None:
    a = corrupt(images, name, 3, seed=7)
    b = corrupt(images, name, 3, seed=7)
    assert a.dtype == np.uint8 and a.shape == images.shape
    assert a.tobytes() == b.tobytes()
    assert not np.array_equal(a, images)  # it changed something


@pytest.mark.parametrize(
    "name", ["gaussian_noise", "shot_noise", "impulse_noise", "motion_blur", "fog"]
)
def test_random_corruptions_follow_the_seed(images: np.ndarray, name: str) -> None:
    assert corrupt(images, name, 2, seed=0).tobytes() != corrupt(images, name, 2, seed=1).tobytes()


def test_brightness_raises_the_mean(images: np.ndarray) -> None:
    means = [corrupt(images, "brightness", s).astype(np.float64).mean() for s in (1, 3, 5)]
    assert images.mean() < means[0] < means[1] < means[2]


@pytest.mark.parametrize("name", ["defocus_blur", "motion_blur"])
def test_blur_lowers_high_frequency_energy(images: np.ndarray, name: str) -> None:
    e = [high_freq_energy(corrupt(images, name, s)) for s in (1, 5)]
    assert e[1] < e[0] < high_freq_energy(images)


def test_noise_adds_high_frequency_energy(images: np.ndarray) -> None:
    assert high_freq_energy(corrupt(images, "gaussian_noise", 5)) > 1.5 * high_freq_energy(images)


def test_contrast_shrinks_the_spread_around_each_mean(images: np.ndarray) -> None:
    x = corrupt(images, "contrast", 5).astype(np.float64)
    assert x.std(axis=(2, 3)).mean() < 0.25 * images.astype(np.float64).std(axis=(2, 3)).mean()


def test_saturate_mild_severity_greys_out(images: np.ndarray) -> None:
    spread = lambda x: x.astype(np.float64).std(axis=1).mean()  # noqa: E731 (channel spread)
    assert spread(corrupt(images, "saturate", 2)) < 0.3 * spread(images)
    assert spread(corrupt(images, "saturate", 5)) > spread(images)


@pytest.mark.parametrize("severity,quality", [(1, 80), (5, 40)])
def test_jpeg_is_pil_roundtrip_at_the_table_quality(
    images: np.ndarray, severity: int, quality: int
) -> None:
    got = corrupt(images, "jpeg_compression", severity)
    for k in range(len(images)):
        buf = io.BytesIO()
        Image.fromarray(images[k].transpose(1, 2, 0)).save(buf, format="JPEG", quality=quality)
        want = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
        assert np.array_equal(got[k].transpose(1, 2, 0), want)
    assert np.array_equal(
        jpeg_roundtrip(images[0].transpose(1, 2, 0), quality), got[0].transpose(1, 2, 0)
    )


def test_pixelate_makes_blocks(images: np.ndarray) -> None:
    # 32 * 0.65 = 20 px, box-resized up again: far fewer distinct columns than the original
    x = corrupt(images, "pixelate", 5)
    assert high_freq_energy(x) < high_freq_energy(images)


def test_impulse_noise_sets_values_to_the_extremes(images: np.ndarray) -> None:
    x = corrupt(images, "impulse_noise", 5)
    changed = x != images
    frac = changed.mean()
    assert 0.04 < frac < 0.08  # 7% of values hit (a few already were 0 or 255)
    assert set(np.unique(x[changed])) <= {0, 255}


def test_kernels_are_normalised() -> None:
    for r, a in ((0.3, 0.4), (1.5, 0.1)):
        k = disk_kernel(r, a)
        assert k.shape == (17, 17) and k.sum() == pytest.approx(1.0) and k[8, 8] == k.max()
    w, dy, dx = motion_kernel_offsets(6, 1.0, 0.0)
    assert len(w) == 13 and w.sum() == pytest.approx(1.0) and np.all(np.diff(w) <= 0)
    assert np.array_equal(dy, np.zeros(13)) and np.array_equal(dx, np.arange(13))
    m = plasma_fractal(32, 2.0, np.random.default_rng(0))
    assert m.shape == (32, 32) and m.min() == 0.0 and m.max() == 1.0


def test_cache_returns_the_same_bytes_and_heals(images: np.ndarray, tmp_path: Path) -> None:
    a = corrupted_set(images, "fog", 2, seed=3, cache=tmp_path)
    files = list(tmp_path.rglob("fog-2.npy"))
    assert len(files) == 1
    assert corrupted_set(images, "fog", 2, seed=3, cache=tmp_path).tobytes() == a.tobytes()
    files[0].write_bytes(b"not a numpy file")
    assert corrupted_set(images, "fog", 2, seed=3, cache=tmp_path).tobytes() == a.tobytes()
    # another data set (or seed) gets another cache entry
    corrupted_set(images[:3], "fog", 2, seed=3, cache=tmp_path)
    assert len(list(tmp_path.rglob("fog-2.npy"))) == 2


def test_unknown_corruption_or_severity(images: np.ndarray) -> None:
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(images, "snowstorm", 1)
    with pytest.raises(ValueError, match="severity"):
        corrupt(images, "fog", 6)
