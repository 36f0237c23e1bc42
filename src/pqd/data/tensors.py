"""Data in memory for the Python API: tensors, normalised floats, torch ``Dataset``s and
``DataLoader``s per split (:func:`from_tensors`, :func:`as_dataset`); resizing."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pqd.dataset import (
    Dataset,
    stratified_split,
)
from pqd.errors import DataError


def resize_images(x: torch.Tensor, size: int, chunk: int = 1024) -> torch.Tensor:
    """uint8 images ``[N, C, H, W]`` resized so the short side is ``size`` (bilinear,
    antialiased), then center-cropped to ``size`` x ``size`` pixels; uint8 again."""
    if isinstance(size, bool) or not isinstance(size, int) or not 8 <= size <= 4096:
        raise DataError(f"image_size {size!r} is not a side in pixels", "use 8..4096")
    n, c, h, w = x.shape
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    top, left = (nh - size) // 2, (nw - size) // 2
    out = torch.empty(n, c, size, size, dtype=torch.uint8)
    for s in range(0, n, chunk):
        part = torch.nn.functional.interpolate(
            x[s : s + chunk].float(), size=(nh, nw), mode="bilinear", antialias=True
        )
        out[s : s + chunk] = part[:, :, top : top + size, left : left + size].round().clamp(0, 255)
    return out


Split = Any
"""One split for :func:`from_tensors`: ``(images, labels)`` tensors or arrays, a torch
``Dataset`` of ``(image, label)`` pairs, or a ``DataLoader`` of ``(images, labels)`` batches."""


def _as_images(
    x: Any,
    split: str,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    normalized: bool = False,
) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` from uint8 images, float images in [0, 1], or (``normalized``)
    float images normalised by ``mean``/``std`` (the normalisation is undone)."""
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).detach().cpu()
    if x.ndim != 4:
        raise DataError(
            f"{split} images have shape {tuple(x.shape)}, not [N, C, H, W]",
            "pass images as a 4-D tensor, channels first",
        )
    if x.dtype == torch.uint8:
        return x.contiguous()
    if not x.is_floating_point():
        raise DataError(
            f"{split} images are {x.dtype}, neither uint8 nor float",
            "pass uint8 images (0..255) or float images in [0, 1]",
        )
    x = x.float()
    if normalized and mean is not None and std is not None:
        c = int(x.shape[1])
        _check_channels(mean, std, c)
        x = x * torch.tensor(std).view(1, c, 1, 1) + torch.tensor(mean).view(1, c, 1, 1)
    x = torch.where((x > -1e-3) & (x < 1 + 1e-3), x.clamp(0.0, 1.0), x)  # float error
    lo, hi = float(x.min()) if x.numel() else 0.0, float(x.max()) if x.numel() else 0.0
    if lo < 0.0 or hi > 1.0:
        raise DataError(
            f"{split} float images range over [{lo:.3g}, {hi:.3g}]"
            + (" after undoing mean/std" if normalized else ", not [0, 1]"),
            "pass float images in [0, 1], or normalised ones with the mean/std they were "
            "normalised with",
        )
    return (x * 255.0).round().to(torch.uint8).contiguous()


def _check_channels(mean: tuple[float, ...], std: tuple[float, ...], c: int) -> None:
    """One mean and one std per channel of ``c``, or a DataError."""
    if len(mean) != c or len(std) != c:
        raise DataError(
            f"mean/std have {len(mean)}/{len(std)} values for {c} channels",
            "give one mean and one std per channel",
        )


def _check_shapes(train_x: torch.Tensor, others: dict[str, torch.Tensor]) -> None:
    """Every split of ``others`` that has images has them shaped like ``train_x``'s, or a
    DataError names the first that does not."""
    for n, other in others.items():
        if other.shape[0] and tuple(other.shape[1:]) != tuple(train_x.shape[1:]):
            raise DataError(
                f"{n} images are {tuple(other.shape[1:])}, train images {tuple(train_x.shape[1:])}",
                "give every split the same image shape",
            )


def _class_count(labels: torch.Tensor, num_classes: int | None) -> int:
    """``num_classes`` (default: the largest label + 1), checked against every label."""
    n_classes = num_classes or int(labels.max()) + 1
    if int(labels.min()) < 0 or int(labels.max()) >= n_classes:
        raise DataError(
            f"labels range over {int(labels.min())}..{int(labels.max())} for {n_classes} classes",
            "use class ids 0..num_classes-1",
        )
    return n_classes


def _pairs(split: Split, name: str) -> tuple[Any, Any]:
    """``(images, labels)`` of one split as given: a pair, a ``DataLoader`` of
    ``(images, labels)`` batches (iterated once) or a torch ``Dataset`` of pairs."""
    if isinstance(split, (tuple, list)) and len(split) == 2:
        return split[0], split[1]
    if isinstance(split, torch.utils.data.DataLoader):
        xs, ys = [], []
        for batch in split:
            if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
                raise DataError(
                    f"the {name} DataLoader yields {type(batch).__name__}, not (images, labels)",
                    "give a DataLoader whose batches are (images, labels)",
                )
            xs.append(torch.as_tensor(batch[0]).detach().cpu())
            ys.append(torch.as_tensor(batch[1]).detach().cpu().reshape(-1))
        if not xs:
            raise DataError(f"the {name} DataLoader is empty", f"give {name} images")
        x, y = torch.cat(xs), torch.cat(ys)
        if isinstance(split.sampler, torch.utils.data.RandomSampler):
            order = _content_order(x, y)  # a shuffled loader: the same data, the same run
            x, y = x[order], y[order]
        return x, y
    if isinstance(split, torch.utils.data.Dataset):
        pairs = [split[i] for i in range(len(split))]  # type: ignore[arg-type]
        if not pairs:
            raise DataError(f"the {name} Dataset is empty", f"give {name} images")
        x = torch.stack([torch.as_tensor(p[0]) for p in pairs])
        return x, torch.as_tensor([int(p[1]) for p in pairs])
    raise DataError(
        f"{name} is a {type(split).__name__}",
        f"pass {name}=(images, labels), a torch Dataset of (image, label) or a DataLoader",
    )


def _content_order(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A fixed order of images that depends only on their content (and label)."""

    keys = [
        hashlib.sha1(x[i].contiguous().numpy().tobytes() + bytes([int(y[i]) % 256])).digest()
        for i in range(len(x))
    ]
    return torch.as_tensor(sorted(range(len(keys)), key=keys.__getitem__), dtype=torch.long)


def _is_normalized(x: Any, mean: Any, std: Any, normalized: bool | None) -> bool:
    """Whether float images ``x`` are normalised: as told, else (with mean/std given) when
    any value lies outside [0, 1]."""
    if normalized is not None:
        return normalized
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if mean is None or std is None or not t.is_floating_point() or not t.numel():
        return False
    return bool(float(t.min()) < -1e-3 or float(t.max()) > 1.0 + 1e-3)


def _as_split(
    split: Split,
    name: str,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    normalized: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(uint8 images, int64 labels)`` of one split (see :func:`_pairs`)."""
    x, y = _pairs(split, name)
    images = _as_images(x, name, mean, std, normalized)
    labels = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y)
    labels = labels.detach().cpu().to(torch.int64).reshape(-1)
    if labels.shape[0] != images.shape[0]:
        raise DataError(
            f"{name} has {images.shape[0]} images but {labels.shape[0]} labels",
            "give one label per image",
        )
    return images, labels


def from_tensors(
    train: Split,
    val: Split | None = None,
    test: Split | None = None,
    *,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    normalized: bool | None = None,
    num_classes: int | None = None,
    classes: list[str] | None = None,
    val_size: int | float = 0.1,
    seed: int = 0,
    name: str = "tensors",
) -> Dataset:
    """A :class:`Dataset` from data in memory (for :func:`pqd.compress`/:func:`pqd.apply_stages`).

    Each split is ``(images, labels)``, a torch ``Dataset`` of ``(image, label)`` pairs or a
    ``DataLoader`` of ``(images, labels)`` batches (read once: random transforms are drawn
    once; a shuffling loader's images are put in an order fixed by their content, so the
    same data gives the same split and run). Images are ``[N, C, H, W]`` uint8 (0..255),
    float in [0, 1], or float normalised with ``mean``/``std`` (as ``ToTensor()`` +
    ``Normalize(mean, std)`` give them). They are stored as uint8, i.e. rounded to 1/255
    steps, as an image file would hold them; labels are class ids.

    Args:
        train: the training split.
        val: the validation split (model selection, calibration); default: ``val_size`` of
            ``train`` carved out (class-stratified, seeded by ``seed``).
        test: the test split the record's accuracies are measured on (``pqd.compress``
            needs it; ``pqd.apply_stages`` does not); default none.
        mean, std: per-channel normalisation of images in [0, 1] that the model expects;
            default identity (the model gets [0, 1] images). :func:`pqd.compress` puts it
            inside the model (and the exported file).
        normalized: whether float images come normalised by ``mean``/``std`` (undone here);
            default: when mean/std are given and the train images leave [0, 1].
        num_classes: default ``max label + 1`` over the splits.
        classes: class names (default ``"0"``, ``"1"``, ...).
        val_size: count or fraction of ``train`` carved out when ``val`` is None (0: none).
        seed: seed of that split.
        name: the data set's name in the record.

    Returns:
        The :class:`Dataset`.
    """
    mean = tuple(float(m) for m in mean) if mean is not None else None
    std = tuple(float(s) for s in std) if std is not None else None
    raw_x, raw_y = _pairs(train, "train")
    norm = _is_normalized(raw_x, mean, std, normalized)
    tx, ty = _as_split((raw_x, raw_y), "train", mean, std, norm)
    if val is not None:
        vx, vy = _as_split(val, "val", mean, std, norm)
    else:
        keep, held = stratified_split(ty, val_size, seed)
        tx, ty, vx, vy = tx[keep], ty[keep], tx[held], ty[held]
    if test is not None:
        sx, sy = _as_split(test, "test", mean, std, norm)
    else:
        sx, sy = tx[:0], ty[:0]
    c = int(tx.shape[1])
    _check_shapes(tx, {"val": vx, "test": sx})
    mean = mean if mean is not None else (0.0,) * c
    std = std if std is not None else (1.0,) * c
    _check_channels(mean, std, c)
    n_classes = _class_count(torch.cat([ty, vy, sy]), num_classes)
    return Dataset(
        name=name,
        num_classes=n_classes,
        classes=classes or [str(i) for i in range(n_classes)],
        mean=mean,
        std=std,
        train_x=tx,
        train_y=ty,
        val_x=vx,
        val_y=vy,  # type: ignore[arg-type]
        test_x=sx,
        test_y=sy,
        root=Path("(in memory)"),
    )


def as_dataset(data: Any) -> Dataset:
    """The :class:`Dataset` of whatever the Python API was given.

    Args:
        data: a :class:`Dataset`; a dict of splits (``train``, ``val``, ``test``, each as
            :func:`from_tensors` takes them) and its keyword arguments (``mean``, ``std``,
            ``classes``, ...); or one torch ``Dataset``/``DataLoader``/``(images, labels)``
            pair, taken as the train split.

    Returns:
        The :class:`Dataset`.
    """
    if isinstance(data, Dataset):
        return data
    if isinstance(data, dict):
        if "train" not in data:
            raise DataError(
                f"the data dict has {sorted(data)} but no 'train'",
                "give data={'train': ..., 'test': ...} (val optional)",
            )
        import difflib
        import inspect

        known = list(inspect.signature(from_tensors).parameters)
        for key in data:
            if key not in known:
                near = difflib.get_close_matches(str(key), known, n=1)
                raise DataError(
                    f"the data dict has an unknown key {key!r}"
                    + (f" (did you mean {near[0]!r}?)" if near else ""),
                    f"use the keys {', '.join(known)}",
                )
        return from_tensors(**data)
    return from_tensors(train=data)
