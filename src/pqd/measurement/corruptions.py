"""A deterministic corruption suite over a test split, in the spirit of CIFAR-10-C.

Hendrycks & Dietterich (ICLR 2019, "Benchmarking neural network robustness to common
corruptions and perturbations") corrupt every CIFAR-10 test image with 15+4 corruptions at 5
severities. pqd re-implements eleven of them in numpy / scipy / PIL / matplotlib (no download,
no OpenCV, no ImageMagick) with the CIFAR-10-C parameter tables (32x32 images):

- noise: ``gaussian_noise``, ``shot_noise`` (Poisson), ``impulse_noise`` (salt and pepper)
- blur: ``defocus_blur`` (anti-aliased disk), ``motion_blur`` (one-sided Gaussian streak at a
  random angle in [-45, 45] degrees, as ImageMagick's MotionBlurImage draws it)
- weather: ``fog`` (diamond-square plasma fractal)
- digital: ``brightness`` and ``saturate`` (in HSV), ``contrast``, ``jpeg_compression`` (PIL),
  ``pixelate`` (PIL box resize down and up)

Each (corruption, severity) draws from its own generator seeded with ``(seed, corruption
index, severity)``: the same images and seed give the same bytes, and one corruption can be
regenerated alone. Sets are cached as ``.npy`` per data set (keyed by a hash of the test
images) in :func:`cache_dir`.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pqd.cache import cache_dir as pqd_cache_dir

SEVERITIES = (1, 2, 3, 4, 5)
SUITE_VERSION = 1  # bump when a corruption's output changes: old cache entries are ignored

# CIFAR-10-C parameters (Hendrycks & Dietterich), one entry per severity 1..5
_GAUSS = (0.04, 0.06, 0.08, 0.09, 0.10)  # noise standard deviation, images in [0, 1]
_SHOT = (500, 250, 100, 75, 50)  # photons per unit intensity
_IMPULSE = (0.01, 0.02, 0.03, 0.05, 0.07)  # fraction of values set to 0 or 1
_DEFOCUS = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1))  # disk radius, alias
_MOTION = ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5))  # ImageMagick radius, sigma (px)
_FOG = ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75))  # strength, wibble decay
_CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)  # factor towards the per-image channel means
_BRIGHT = (0.05, 0.1, 0.15, 0.2, 0.3)  # added to HSV value
_SATURATE = ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2))  # HSV saturation * a + b
_JPEG = (80, 65, 58, 50, 40)  # PIL quality
_PIXELATE = (0.95, 0.9, 0.85, 0.75, 0.65)  # down-scale factor


def _gaussian_noise(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    return x + rng.normal(scale=_GAUSS[s - 1], size=x.shape)


def _shot_noise(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    c = _SHOT[s - 1]
    return rng.poisson(x * c) / c


def _impulse_noise(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    """Salt and pepper per value (channels independently), half salt, half pepper."""
    out = x.copy()
    hit = rng.random(x.shape) < _IMPULSE[s - 1]
    salt = rng.random(x.shape) < 0.5
    out[hit & salt] = 1.0
    out[hit & ~salt] = 0.0
    return out


def _gauss_1d(sigma: float, radius: int) -> np.ndarray:
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-(t**2) / (2 * sigma**2))
    return k / k.sum()


def disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """The defocus kernel: a normalised disk of ``radius`` px on a 17x17 grid, smoothed by a
    3x3 Gaussian of ``alias_blur`` (anti-aliasing), as CIFAR-10-C draws it."""
    t = np.arange(-8, 9)
    xx, yy = np.meshgrid(t, t)
    k = ((xx**2 + yy**2) <= radius**2).astype(np.float64)
    k /= k.sum()
    from scipy.ndimage import convolve1d

    g = _gauss_1d(alias_blur, 1)
    k = convolve1d(convolve1d(k, g, axis=0, mode="mirror"), g, axis=1, mode="mirror")
    return k


def _defocus_blur(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    from scipy.ndimage import correlate

    k = disk_kernel(*_DEFOCUS[s - 1])
    return correlate(x, k[None, :, :, None], mode="mirror")


def motion_kernel_offsets(
    radius: int, sigma: float, angle_deg: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Taps of a one-sided motion blur: weights (Gaussian in the distance, from the pixel
    itself outwards) and integer (dy, dx) offsets along ``angle_deg``; ``2 * radius + 1``
    taps, as ImageMagick's MotionBlurImage lays them out."""
    width = 2 * int(radius) + 1
    i = np.arange(width, dtype=np.float64)
    w = np.exp(-(i**2) / (2 * sigma**2))
    w /= w.sum()
    a = np.deg2rad(angle_deg)
    dx = np.rint(i * np.cos(a)).astype(int)
    dy = np.rint(i * np.sin(a)).astype(int)
    return w, dy, dx


def _motion_blur(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    radius, sigma = _MOTION[s - 1]
    n, h, wd, _ = x.shape
    out = np.empty_like(x)
    rows, cols = np.arange(h), np.arange(wd)
    for j in range(n):
        w, dy, dx = motion_kernel_offsets(radius, sigma, rng.uniform(-45, 45))
        acc = np.zeros_like(x[j])
        for wi, oy, ox in zip(w, dy, dx, strict=True):  # edge pixels repeat (clamped)
            r = np.clip(rows + oy, 0, h - 1)
            c = np.clip(cols + ox, 0, wd - 1)
            acc += wi * x[j][r][:, c]
        out[j] = acc
    return out


def plasma_fractal(size: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """A ``size`` x ``size`` diamond-square height map in [0, 1] (``size`` a power of two),
    wrapping at the borders; the random amplitude shrinks by ``decay`` at every level."""
    assert size & (size - 1) == 0, "size must be a power of two"
    m = np.zeros((size, size))
    step, amp = size, 100.0
    while step >= 2:
        half = step // 2
        corners = m[0:size:step, 0:size:step]
        # square step: centre = mean of the 4 corners + noise
        total = corners + np.roll(corners, -1, axis=0)
        total = total + np.roll(total, -1, axis=1)
        m[half:size:step, half:size:step] = total / 4 + amp * rng.uniform(-amp, amp, total.shape)
        # diamond step: edge midpoints = mean of 2 corners + 2 centres + noise
        centres = m[half:size:step, half:size:step]
        top = centres + np.roll(centres, 1, axis=0) + corners + np.roll(corners, -1, axis=1)
        m[0:size:step, half:size:step] = top / 4 + amp * rng.uniform(-amp, amp, top.shape)
        left = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=0)
        m[half:size:step, 0:size:step] = left / 4 + amp * rng.uniform(-amp, amp, left.shape)
        step = half
        amp /= decay
    m -= m.min()
    return m / m.max()


def _fog(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    strength, decay = _FOG[s - 1]
    n, h, w, _ = x.shape
    size = 1 << (max(h, w, 2) - 1).bit_length()  # the next power of two
    out = np.empty_like(x)
    for j in range(n):
        top = x[j].max()
        fogged = x[j] + strength * plasma_fractal(size, decay, rng)[:h, :w, None]
        out[j] = fogged * top / (top + strength)
    return out


def _contrast(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    means = x.mean(axis=(1, 2), keepdims=True)
    return (x - means) * _CONTRAST[s - 1] + means


def _hsv(x: np.ndarray, channel: int, scale: float, shift: float) -> np.ndarray:
    from matplotlib.colors import hsv_to_rgb, rgb_to_hsv

    hsv = rgb_to_hsv(np.clip(x, 0, 1))
    hsv[..., channel] = np.clip(hsv[..., channel] * scale + shift, 0, 1)
    return hsv_to_rgb(hsv)


def _brightness(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    return _hsv(x, 2, 1.0, _BRIGHT[s - 1])


def _saturate(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    return _hsv(x, 1, *_SATURATE[s - 1])


def jpeg_roundtrip(img: np.ndarray, quality: int) -> np.ndarray:
    """One uint8 HxWx3 image encoded as JPEG at ``quality`` by PIL and decoded again."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"))


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0, 1) * 255).astype(np.uint8)  # truncates, as CIFAR-10-C's np.uint8


def _jpeg(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    u8 = _to_uint8(x)
    return np.stack([jpeg_roundtrip(im, _JPEG[s - 1]) for im in u8]).astype(np.float64) / 255


def _pixelate(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    u8 = _to_uint8(x)
    h, w = u8.shape[1:3]
    c = _PIXELATE[s - 1]
    small = (int(w * c), int(h * c))
    out = [
        np.asarray(
            Image.fromarray(im)
            .resize(small, Image.Resampling.BOX)
            .resize((w, h), Image.Resampling.BOX)
        )
        for im in u8
    ]
    return np.stack(out).astype(np.float64) / 255


Corruption = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]

CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "defocus_blur": _defocus_blur,
    "motion_blur": _motion_blur,
    "fog": _fog,
    "brightness": _brightness,
    "contrast": _contrast,
    "saturate": _saturate,
    "jpeg_compression": _jpeg,
    "pixelate": _pixelate,
}
"""Name -> function(images NHWC float64 in [0, 1], severity 1..5, generator) -> images."""


def corrupt(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """Corrupt uint8 NCHW images (pqd's layout) with one corruption at one severity.

    Args:
        images: uint8 ``[N, 3, H, W]``.
        name: a key of :data:`CORRUPTIONS`.
        severity: 1 (mildest) to 5.
        seed: the suite's seed; the generator is seeded with ``(seed, index of name,
            severity)``.

    Returns:
        uint8 ``[N, 3, H, W]``, the same shape.
    """
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be 1..5, not {severity}")
    index = list(CORRUPTIONS).index(name)
    rng = np.random.default_rng([int(seed), index, int(severity)])
    x = np.asarray(images).transpose(0, 2, 3, 1).astype(np.float64) / 255.0
    y = CORRUPTIONS[name](x, severity, rng)
    return np.ascontiguousarray(_to_uint8(y).transpose(0, 3, 1, 2))


def cache_dir() -> Path:
    """Where corrupted sets are cached: :func:`pqd.cache.cache_dir` ``("corruptions")``."""
    return pqd_cache_dir("corruptions")


def images_key(images: np.ndarray, seed: int) -> str:
    """A short hash of the images, the seed and the suite version (the cache key)."""
    h = hashlib.sha256(np.ascontiguousarray(images).tobytes())
    h.update(f"{tuple(images.shape)}|{seed}|v{SUITE_VERSION}".encode())
    return h.hexdigest()[:20]


def corrupted_set(
    images: np.ndarray, name: str, severity: int, seed: int = 0, cache: Path | None = None
) -> np.ndarray:
    """:func:`corrupt`, read from / written to the cache (``cache``: a folder; ``None``:
    :func:`cache_dir`). A damaged cache file is regenerated."""
    folder = (cache or cache_dir()) / images_key(images, seed)
    path = folder / f"{name}-{severity}.npy"
    if path.is_file():
        try:
            out = np.load(path, allow_pickle=False)
            if out.shape == images.shape and out.dtype == np.uint8:
                return out
        except (OSError, ValueError):
            pass
    out = corrupt(images, name, severity, seed)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".npy.tmp")
        with os.fdopen(fd, "wb") as f:
            np.save(f, out, allow_pickle=False)
        os.replace(tmp, path)
    except OSError:  # a read-only cache only costs the regeneration next time
        pass
    return out
