"""The in-memory data set every stage reads, and the split and statistics helpers shared by
the readers (:mod:`pqd.data` for CIFAR/SVHN/npz/tensors, :mod:`pqd.folder` for image
folders). Its own module so that both readers import it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pqd.errors import DataError

__all__ = ["OFFICIAL_TEST_SIZES", "Dataset", "stratified_split"]


@dataclass
class Dataset:
    """A loaded data set: uint8 images ``[N, 3, H, W]`` and int64 labels ``[N]`` per split.

    ``val`` is carved (stratified) from the official training data; ``test`` is the official
    test split, used only for reported numbers. ``mean``/``std`` are per-channel statistics of
    training images in [0, 1].
    """

    name: str
    num_classes: int
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    root: Path
    info: dict[str, Any] = field(default_factory=dict)
    """What the reader adds to :meth:`summary` (an image folder: splits, cache, skipped files)."""

    @property
    def image_size(self) -> int:
        """Side of the (square) images, in pixels (the width when they are not square)."""
        return int(self.train_x.shape[-1])

    def summary(self) -> dict[str, Any]:
        """Name, split sizes (images), number of classes, class names, image size (pixels)
        and root folder, plus the reader's :attr:`info`, JSON-ready.

        ``subset_note`` warns when the test split is smaller than the official one,
        because accuracies on a subset are not comparable with published numbers.
        """
        out: dict[str, Any] = {
            "name": self.name,
            "train": int(self.train_x.shape[0]),
            "val": int(self.val_x.shape[0]),
            "test": int(self.test_x.shape[0]),
            "num_classes": int(self.num_classes),
            "classes": list(self.classes),
            "image_size": [int(self.train_x.shape[-2]), int(self.train_x.shape[-1])],
            "root": str(self.root),
            **self.info,
        }
        official = OFFICIAL_TEST_SIZES.get(self.name)
        if official is not None and out["test"] < official:
            out["subset_note"] = (
                f"the test split holds {out['test']} of the official {official} {self.name} "
                "test images: accuracies are NOT comparable with published full-test-set numbers"
            )
        return out


OFFICIAL_TEST_SIZES = {"cifar10": 10_000, "cifar100": 10_000, "svhn": 26_032}


def stratified_split(
    labels: torch.Tensor, val_size: int | float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(train, val)`` (ascending int64) of a class-stratified validation split.

    ``val_size``: a count (int, 1 <= n < N), a fraction (0 < f < 1, rounded, at least 1) or 0
    (no split). Per-class quotas follow the largest-remainder rule, so each class gets its
    share within one image; the images are drawn with a ``torch.Generator`` seeded by ``seed``.
    """
    n = int(labels.shape[0])
    n_val = _val_count(val_size, n)
    all_idx = torch.arange(n, dtype=torch.int64)
    if n_val == 0:
        return all_idx, torch.empty(0, dtype=torch.int64)
    labels = labels.to(torch.int64).cpu()
    counts = torch.bincount(labels).to(torch.float64)
    quota = counts * (n_val / n)
    alloc = quota.floor().to(torch.int64)
    rest = n_val - int(alloc.sum())
    if rest > 0:  # largest remainders first; ties go to the larger class, then the lower id
        frac = (quota - alloc.to(torch.float64)).tolist()
        by_remainder = sorted(range(len(frac)), key=lambda k: (-frac[k], -counts[k].item(), k))
        for k in by_remainder[:rest]:
            alloc[k] += 1
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=g)
    lab = labels[perm]
    # rank of each drawn image within its class, in draw order
    order = torch.sort(lab, stable=True).indices
    sorted_lab = lab[order]
    starts = torch.searchsorted(sorted_lab, sorted_lab, right=False)
    rank = torch.empty(n, dtype=torch.int64)
    rank[order] = torch.arange(n) - starts
    take = rank < alloc[lab]
    val_idx = torch.sort(perm[take]).values
    train_idx = torch.sort(perm[~take]).values
    return train_idx, val_idx


def _val_count(val_size: int | float, n: int) -> int:
    """Number of validation images for ``val_size`` out of ``n`` (DataError if impossible)."""
    fix = "use val_size 0 (none), a count 1..N-1 or a fraction 0 < f < 1"
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float)):
        raise DataError(f"val_size must be a number, got {val_size!r}", fix)
    if val_size == 0:
        return 0
    if isinstance(val_size, float) and not val_size.is_integer():
        if not 0.0 < val_size < 1.0:
            raise DataError(f"val_size {val_size} is not a fraction in (0, 1)", fix)
        count = max(1, round(val_size * n))
    else:
        count = int(val_size)
        if isinstance(val_size, float):  # 1.0, 2.0...: a fraction of 1 or more is impossible
            raise DataError(f"val_size {val_size} is not a fraction in (0, 1)", fix)
    if count < 0:
        raise DataError(f"val_size {val_size} is negative", fix)
    if count >= n:
        raise DataError(
            f"val_size {val_size} leaves no training images ({n} in the official training split)",
            fix,
        )
    return count


def check_limit(what: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DataError(
            f"{what} must be a positive integer, got {value!r}",
            f"set {what} to N >= 1 or leave it unset",
        )
    return value


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images ``[N, C, H, W]`` in [0, 1] (chunked, float64).

    The std is floored at 1/255 so a constant channel cannot make the model divide by zero.
    """
    c = int(x.shape[1])
    if x.shape[0] == 0:
        return (0.5,) * c, (0.25,) * c
    s = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    for i in range(0, int(x.shape[0]), 4096):
        chunk = x[i : i + 4096].to(torch.float64) / 255.0
        s += chunk.sum(dim=(0, 2, 3))
        s2 += (chunk * chunk).sum(dim=(0, 2, 3))
    count = x.shape[0] * x.shape[2] * x.shape[3]
    mean = s / count
    std = (s2 / count - mean * mean).clamp_min(0.0).sqrt().clamp_min(1.0 / 255.0)
    return tuple(round(v, 6) for v in mean.tolist()), tuple(round(v, 6) for v in std.tolist())
