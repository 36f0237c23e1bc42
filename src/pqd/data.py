"""Data sets (CIFAR-10/100, SVHN, your own ``.npz``, image folders) and a tensor-resident
batch loader.

Images are kept as uint8 ``[N, 3, H, W]`` tensors (for image folders: views of a
memory-mapped cache, see :mod:`pqd.folder`); :class:`Loader` converts each batch to
float32 in [0, 1] and augments it on the fly on the target device. Normalisation is *not*
done here: the model does it inside its graph, with :attr:`Dataset.mean` / :attr:`Dataset.std`.

Every user-facing problem (missing/corrupt/unsafe files, impossible split sizes) raises
:class:`pqd.errors.DataError` with one line naming the problem and the fix. CIFAR pickles are
read only with a restricted unpickler that builds dicts, lists, bytes, ints and numpy arrays.
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import torch

from pqd.dataset import (  # noqa: F401  (re-exported: pqd.data is the data API)
    OFFICIAL_TEST_SIZES,
    Dataset,
    _channel_stats,
    _check_limit,
    _val_count,
    stratified_split,
)
from pqd.errors import DataError, DataRootError

if TYPE_CHECKING:
    from pqd.folder import from_folder

__all__ = [
    "DATASETS",
    "DataRoot",
    "Dataset",
    "Loader",
    "RestrictedUnpickler",
    "as_dataset",
    "check_data",
    "data_root",
    "download_and_verify",
    "from_folder",
    "from_tensors",
    "load_dataset",
    "resolve_data_root",
    "safe_extract",
    "stratified_split",
]

DATASETS = ("cifar10", "cifar100", "svhn", "npz", "folder")
"""Names accepted by :func:`load_dataset`."""

ENV_DATA_DIR = "PQD_DATA_DIR"
"""Environment variable naming the data folder (below ``--data-dir`` and the recipe's
``data.root``: it is the fallback for recipes that name none)."""

# Official archives (module-level so tests can point them at local file:// URLs).
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
SVHN_TRAIN_URL = "http://ufldl.stanford.edu/housenumbers/train_32x32.mat"
SVHN_TRAIN_MD5 = "e26dedcc434d2e4c54c9b2d4a06d8373"
SVHN_TEST_URL = "http://ufldl.stanford.edu/housenumbers/test_32x32.mat"
SVHN_TEST_MD5 = "eb5a983be6a315427106f1b164d9cef3"

DOWNLOAD_TIMEOUT_S = 30.0
"""Socket timeout of each download read, in seconds."""

# Per-channel mean/std of the official training images in [0, 1].
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
SVHN_MEAN = (0.4377, 0.4438, 0.4728)
SVHN_STD = (0.1980, 0.2010, 0.1970)

_CIFAR10_DIR = "cifar-10-batches-py"
_CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR100_DIR = "cifar-100-python"
_SVHN_FILES = ("train_32x32.mat", "test_32x32.mat")


# --------------------------------------------------------------------------- data set


ROOT_SOURCES = ("flag", "override", "recipe", "env", "default")
"""Where a data folder can come from, first wins: ``--data-dir``, ``data.root=`` on the
command line, the recipe's ``data.root``, ``$PQD_DATA_DIR``, pqd's default ``./data``."""

_SOURCE_TEXT = {
    "flag": "the one given with --data-dir",
    "override": "the one given as data.root= on the command line",
    "recipe": "the recipe's data.root",
    "env": f"the one in {ENV_DATA_DIR}, used as neither --data-dir nor data.root names one",
    "default": "pqd's default ./data, as none was named",
}


@dataclass(frozen=True)
class DataRoot:
    """The data folder and where it was named (one of :data:`ROOT_SOURCES`)."""

    path: Path
    source: str

    def where(self) -> str:
        """Where the folder was named, in words (for error lines)."""
        return _SOURCE_TEXT[self.source]

    def download(self, asked: bool | None) -> bool:
        """Whether missing official files may be downloaded: ``data.download`` (or
        ``--download``) when set; else (None) only into pqd's default ``./data``, never
        into a folder the user named."""
        return asked if asked is not None else self.source == "default"

    def fix(self, holding: str) -> str:
        """The fix for a folder that does not hold the data: change the place it was named
        (not what the user just did again)."""
        return {
            "flag": f"check the path after --data-dir: it must be {holding} (--data-dir "
            "wins over data.root and PQD_DATA_DIR)",
            "override": f"check the path after data.root= on the command line (relative to "
            f"the current folder): it must be {holding}",
            "recipe": f"set data.root in the recipe to {holding} (a relative path starts at "
            "the recipe's folder), or name one with --data-dir DIR",
            "env": f"point {ENV_DATA_DIR} at {holding}, or name the folder with data.root in "
            "the recipe or --data-dir DIR (both win over the variable)",
            "default": f"name {holding} with --data-dir DIR, data.root in the recipe, or "
            f"{ENV_DATA_DIR}",
        }[self.source]

    def explain(self, exc: DataRootError) -> DataError:
        """``exc`` with where the folder was named and the fix that fits that place."""
        fix = self.fix(exc.holding) + (f"; or {exc.hint}" if exc.hint else "")
        return DataError(f"{exc.problem} (the data folder is {self.where()})", fix)


def data_root(
    cli_dir: str | Path | None, recipe_root: str | Path | None, root_from: str = "recipe"
) -> DataRoot:
    """The data folder and where it was named, first given wins: ``--data-dir``
    (``cli_dir``), the recipe's ``data.root`` (``recipe_root``: from the command line's
    ``data.root=`` when ``root_from`` is ``"override"``), ``$PQD_DATA_DIR``, else ``./data``;
    ``~`` expanded, made absolute (it need not exist). The same for every kind of data set.
    """
    candidates = (
        (cli_dir, "flag"),
        (recipe_root, root_from),
        (os.environ.get(ENV_DATA_DIR), "env"),
    )
    for candidate, source in candidates:
        if candidate is not None and str(candidate).strip():
            chosen, where = str(candidate).strip(), source
            break
    else:
        chosen, where = "data", "default"
    return DataRoot(Path(os.path.abspath(Path(chosen).expanduser())), where)


def resolve_data_root(cli_dir: str | Path | None, recipe_root: str | Path | None) -> Path:
    """The data folder: ``--data-dir``, else recipe ``data.root``, else ``$PQD_DATA_DIR``,
    else ``./data`` (:func:`data_root` without where it came from)."""
    return data_root(cli_dir, recipe_root).path


def load_dataset(
    name: str,
    root: str | Path,
    *,
    val_size: int | float = 0.1,
    seed: int = 0,
    download: bool = False,
    limit_train: int | None = None,
    limit_test: int | None = None,
    image_size: int | None = None,
    test_size: int | float = 0.1,
    on_bad_image: str = "error",
    progress: bool = False,
) -> Dataset:
    """Load data set ``name`` from ``root`` (official layouts); missing official files are
    downloaded only with ``download=True``.

    ``val_size`` is a count (int >= 1) or a fraction (0 < f < 1) of the official training
    images, carved out stratified by class with ``seed``; 0 means no validation split.
    ``limit_train`` / ``limit_test`` keep the first N images of each official split (before
    the validation split), for tiny runs. ``image_size`` (pixels; default: the data's own,
    32 for CIFAR/SVHN) resizes the images (short side, then center crop). ``folder`` is
    :func:`from_folder` (``test_size``, ``on_bad_image`` and ``progress`` are its own).
    """
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}", f"use one of {', '.join(DATASETS)}")
    if name == "folder":
        from pqd.folder import from_folder

        return from_folder(
            root,
            image_size=image_size,
            val_size=val_size,
            test_size=test_size,
            seed=seed,
            on_bad_image=on_bad_image,
            limit_train=limit_train,
            limit_test=limit_test,
            progress=progress,
        )
    limit_train = _check_limit("limit_train", limit_train)
    limit_test = _check_limit("limit_test", limit_test)
    root = Path(os.path.abspath(Path(root).expanduser()))

    if name == "npz":
        raw = _load_npz(root, limit_train, limit_test)
    else:
        _ensure_files(name, root, download)
        reader = {"cifar10": _load_cifar10, "cifar100": _load_cifar100, "svhn": _load_svhn}[name]
        raw = reader(root, limit_train, limit_test)

    train_idx, val_idx = stratified_split(raw.train_y, val_size, seed)
    train_x, train_y = raw.train_x[train_idx], raw.train_y[train_idx]
    val_x, val_y = raw.train_x[val_idx], raw.train_y[val_idx]
    test_x = raw.test_x
    if image_size is not None and tuple(train_x.shape[-2:]) != (image_size, image_size):
        train_x, val_x, test_x = (resize_images(x, image_size) for x in (train_x, val_x, test_x))
    if raw.mean is None or raw.std is None:
        mean, std = _channel_stats(train_x)
    else:
        mean, std = raw.mean, raw.std
    return Dataset(
        name=name,
        num_classes=len(raw.classes),
        classes=list(raw.classes),
        mean=mean,
        std=std,
        train_x=train_x,
        train_y=train_y,
        val_x=val_x,
        val_y=val_y,
        test_x=test_x,
        test_y=raw.test_y,
        root=raw.root,
    )


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
        if len(mean) != c or len(std) != c:
            raise DataError(
                f"mean/std have {len(mean)}/{len(std)} values for {c} channels",
                "give one mean and one std per channel",
            )
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
    import hashlib

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
    for other, n in ((vx, "val"), (sx, "test")):
        if other.shape[0] and tuple(other.shape[1:]) != tuple(tx.shape[1:]):
            raise DataError(
                f"{n} images are {tuple(other.shape[1:])}, train images {tuple(tx.shape[1:])}",
                "give every split the same image shape",
            )
    mean = mean if mean is not None else (0.0,) * c
    std = std if std is not None else (1.0,) * c
    if len(mean) != c or len(std) != c:
        raise DataError(
            f"mean/std have {len(mean)}/{len(std)} values for {c} channels",
            "give one mean and one std per channel",
        )
    labels = torch.cat([ty, vy, sy])
    n_classes = num_classes or int(labels.max()) + 1
    if int(labels.min()) < 0 or int(labels.max()) >= n_classes:
        raise DataError(
            f"labels range over {int(labels.min())}..{int(labels.max())} for {n_classes} classes",
            "use class ids 0..num_classes-1",
        )
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


@dataclass
class _Raw:
    """What a reader returns: official splits (limits applied), classes, optional stats."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]
    root: Path
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None


# --------------------------------------------------------------------------- files present?


def _required_files(name: str, root: Path) -> list[Path]:
    if name == "cifar10":
        folder = root / _CIFAR10_DIR
        return [folder / f for f in (*_CIFAR10_TRAIN, "test_batch", "batches.meta")]
    if name == "cifar100":
        folder = root / _CIFAR100_DIR
        return [folder / f for f in ("train", "test", "meta")]
    return [root / f for f in _SVHN_FILES]


def _holding(name: str) -> str:
    return {
        "cifar10": f"{_CIFAR10_DIR}/",
        "cifar100": f"{_CIFAR100_DIR}/",
        "svhn": " and ".join(_SVHN_FILES),
    }[name]


def _not_a_folder(name: str, root: Path) -> DataRootError:
    return DataRootError(
        f"data root {root} is a file, not a folder",
        f"pass --data-dir DIR or set {ENV_DATA_DIR} to a folder holding {_holding(name)}",
        holding=f"a folder holding {_holding(name)}",
    )


def _missing(name: str, root: Path, first: Path) -> DataRootError:
    """The files are absent and no download was asked for: how to ask for one."""
    ask = (
        f"add --download (or set data.download: true) to download {name} "
        f"(about {_DOWNLOAD_MB[name]} MB) into it (pqd downloads only when asked)"
    )
    return DataRootError(
        f"{name} files are missing under {root} (no {first})",
        f"pass --data-dir DIR or set {ENV_DATA_DIR} to a folder holding {_holding(name)}, or {ask}",
        holding=f"a folder holding {_holding(name)}",
        hint=ask,
    )


def _ensure_files(name: str, root: Path, download: bool) -> None:
    """Make sure ``name``'s official files are under ``root``; download them if allowed."""
    if root.exists() and not root.is_dir():
        raise _not_a_folder(name, root)
    missing = [p for p in _required_files(name, root) if not p.is_file()]
    if not missing:
        return
    fix = (
        f"pass --data-dir DIR or set {ENV_DATA_DIR} to a folder holding {_holding(name)}, "
        "or allow network access"
    )
    if not download:
        raise _missing(name, root, missing[0])
    _check_download_target(name, root)
    created = [d for d in (root, *root.parents) if not d.exists()]  # deepest first
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _remove_empty(created)
        raise DataError(
            f"{name} files are missing under {root} and the folder cannot be "
            f"created ({e.strerror or e})",
            fix,
        ) from e
    try:
        _download(name, root)
    except _NetworkError as e:
        _remove_empty(created)
        raise DataError(
            f"{name} files are missing under {root} and the download from "
            f"{e.url} failed ({e.reason})",
            fix,
        ) from e
    except BaseException:
        _remove_empty(created)
        raise
    still = [p for p in _required_files(name, root) if not p.is_file()]
    if still:
        raise DataError(
            f"the downloaded {name} archive did not provide {still[0]}",
            f"place the official files under {root} yourself ({_holding(name)})",
        )


NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "svhn": 10}
"""Classes of the official data sets (``npz`` says its own)."""


def check_data(
    name: str,
    root: str | Path,
    *,
    download: bool,
    explicit: bool = True,
    on_bad_image: str = "error",
) -> tuple[int, str]:
    """Check data set ``name`` under ``root`` without downloading or loading it all: its
    files are present and readable (class names parsed), or a download is allowed there.

    Args:
        name: one of :data:`DATASETS`.
        root: the data folder.
        download: whether a missing data set may be downloaded (``data.download``).
        explicit: ``root`` was given by the user (else it is pqd's default ``./data``); a
            given folder that does not exist is an error even when downloads are allowed.
        on_bad_image: an image folder's ``data.on_bad_image`` (empty class folders).

    Returns:
        The number of classes and a one-line description of what was found.
    """
    root = Path(os.path.abspath(Path(root).expanduser()))
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}", f"use one of {', '.join(DATASETS)}")
    if name == "folder":
        from pqd.folder import check_folder

        return check_folder(root, on_bad_image)
    if name == "npz":
        raw = _load_npz(root, 1, 1)
        return len(raw.classes), f"npz files readable in {root} ({len(raw.classes)} classes)"
    if root.exists() and not root.is_dir():
        raise _not_a_folder(name, root)
    files = _required_files(name, root)
    missing = [p for p in files if not p.is_file()]
    if not missing:
        for path in files:
            try:
                with path.open("rb") as f:
                    f.read(1)
            except OSError as e:
                raise DataError(
                    f"{path} cannot be read ({e.strerror or e})",
                    "fix its permissions, or download the data set again",
                ) from e
        if name == "cifar10":
            _label_names(files[-1], b"label_names", 10)
        elif name == "cifar100":
            _label_names(files[-1], b"fine_label_names", 100)
        return NUM_CLASSES[name], f"{name} files present and readable in {root}"
    where = f"pass --data-dir DIR or set {ENV_DATA_DIR} to a folder holding {_holding(name)}"
    if not download:
        raise _missing(name, root, missing[0])
    if explicit and not root.exists():
        raise DataRootError(
            f"data folder {root} does not exist",
            f"{where}, or create the folder to have pqd run download {name} "
            f"(about {_DOWNLOAD_MB[name]} MB) into it",
            holding=f"a folder holding {_holding(name)}",
            hint=f"create the folder to have pqd run download {name} into it",
        )
    _check_download_target(name, root)
    return NUM_CLASSES[name], (
        f"{name} is not under {root} yet: pqd run will download it (about {_DOWNLOAD_MB[name]} MB)"
    )


DOWNLOAD_MARKER = ".pqd-download"
"""An (empty) file of this name in a data folder allows pqd to download into it even though
the folder holds other things."""

_DOWNLOAD_MB = {"cifar10": 163, "cifar100": 161, "svhn": 246}
_OWN_ENTRIES = {
    _CIFAR10_DIR,
    _CIFAR100_DIR,
    *_SVHN_FILES,
    "cifar-10-python.tar.gz",
    "cifar-100-python.tar.gz",
}


def _check_download_target(name: str, root: Path) -> None:
    """Refuse to download into a folder that holds something else (a wrong ``--data-dir``).

    Allowed: a missing or empty folder (hidden files aside), a folder holding only the data
    sets pqd downloads, or one with a :data:`DOWNLOAD_MARKER` file.
    """
    if not root.is_dir() or (root / DOWNLOAD_MARKER).exists():
        return
    try:
        other = sorted(
            e.name
            for e in root.iterdir()
            if not e.name.startswith(".") and e.name not in _OWN_ENTRIES
        )
    except OSError as e:
        raise DataError(
            f"{name} files are missing under {root}, which cannot be read ({e.strerror or e})",
            f"pass --data-dir DIR or set {ENV_DATA_DIR} to a folder holding {_holding(name)}",
        ) from e
    if not other:
        return
    url = SVHN_TRAIN_URL if name == "svhn" else (CIFAR10_URL if name == "cifar10" else CIFAR100_URL)
    raise DataError(
        f"{name} files are missing under {root} (no {_holding(name)}), which holds other "
        f"things ({other[0]!r}{f' and {len(other) - 1} more' if len(other) > 1 else ''}): "
        f"not downloading {name} (about {_DOWNLOAD_MB[name]} MB from {url}) into it",
        f"pass --data-dir DIR or set {ENV_DATA_DIR} to the folder holding {_holding(name)}, "
        f"or to a new or empty folder to download into; to download into {root} anyway, "
        f"create the empty file {root / DOWNLOAD_MARKER}",
    )


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) that are empty: what a failed download created."""
    for d in folders:
        try:
            d.rmdir()
        except OSError:
            return  # not empty, or not ours to remove: stop before its parents


def _download(name: str, root: Path) -> None:
    """Fetch ``name``'s official files into the existing folder ``root``."""
    if name == "svhn":
        for fname, url, md5 in (
            ("train_32x32.mat", SVHN_TRAIN_URL, SVHN_TRAIN_MD5),
            ("test_32x32.mat", SVHN_TEST_URL, SVHN_TEST_MD5),
        ):
            if not (root / fname).is_file():
                _fetch(url, root / fname, md5)
    else:
        url, md5 = (CIFAR10_URL, CIFAR10_MD5) if name == "cifar10" else (CIFAR100_URL, CIFAR100_MD5)
        archive = root / PurePosixPath(url).name
        _fetch(url, archive, md5)
        try:
            safe_extract(archive, root)
        finally:
            archive.unlink(missing_ok=True)


# --------------------------------------------------------------------------- download


class _NetworkError(Exception):
    """A download could not be completed (network, HTTP or local I/O failure)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"{url}: {reason}")
        self.url = url
        self.reason = reason


def download_and_verify(url: str, dest: Path, md5: str) -> Path:
    """Download ``url`` (http(s) or ``file://``) to the file ``dest`` and check its md5.

    Streams to a temporary file beside ``dest`` and renames it only once the md5 matches, so
    ``dest`` never holds a partial or wrong file. Returns ``dest``. Raises DataError on network
    failure or md5 mismatch.
    """
    try:
        return _fetch(url, Path(dest), md5)
    except _NetworkError as e:
        raise DataError(
            f"download of {e.url} failed ({e.reason})",
            f"check the network connection, or put the file at {dest} yourself",
        ) from e


def _fetch(url: str, dest: Path, md5: str) -> Path:
    dest = Path(dest)
    print(f"pqd: downloading {url} to {dest}", file=sys.stderr, flush=True)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    except OSError as e:
        raise _NetworkError(url, f"cannot write to {dest.parent}: {e.strerror or e}") from e
    tmp = Path(tmp_name)
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp:
                    _copy_stream(resp, out, digest)
            except urllib.error.HTTPError as e:
                raise _NetworkError(url, f"HTTP {e.code} {e.reason}") from e
            except urllib.error.URLError as e:
                raise _NetworkError(url, str(e.reason)) from e
            except (OSError, ValueError) as e:  # timeouts, resets, malformed URLs
                raise _NetworkError(url, str(e) or type(e).__name__) from e
        actual = digest.hexdigest()
        if actual != md5.lower():
            raise DataError(
                f"downloaded file {dest.name} from {url} is corrupt: md5 {actual}, "
                f"expected {md5.lower()}",
                f"retry the download, or fetch the official file yourself and place it at {dest}",
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _copy_stream(src: BinaryIO, out: BinaryIO, digest: Any) -> None:
    while True:
        chunk = src.read(1 << 20)
        if not chunk:
            return
        digest.update(chunk)
        out.write(chunk)


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract tar archive ``archive`` into ``dest``, refusing unsafe members.

    Every member is checked before anything is written: absolute paths, ``..`` components,
    links and device files are refused with DataError. Members are extracted into a temporary
    folder inside ``dest`` and then moved into place.
    """
    archive, dest = Path(archive), Path(dest)
    fix = "use the official archive; do not extract this file"
    try:
        tar = tarfile.open(archive, "r:*")  # noqa: SIM115 - closed by `with tar` below
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"cannot open archive {archive} ({e})", fix) from e
    with tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"archive {archive} is corrupt ({e})", fix) from e
        for m in members:
            p = PurePosixPath(m.name)
            if (
                m.name.startswith(("/", "\\"))
                or p.is_absolute()
                or ".." in p.parts
                or (len(m.name) > 1 and m.name[1] == ":")
            ):
                raise DataError(
                    f"refusing to extract {archive}: unsafe member path {m.name!r}", fix
                )
            if not (m.isfile() or m.isdir()):
                raise DataError(
                    f"refusing to extract {archive}: member {m.name!r} is a link or device", fix
                )
        dest.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".pqd-extract-", dir=dest))
        try:
            try:
                if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.10.12
                    tar.extractall(tmp, members=members, filter="data")
                else:  # pragma: no cover - members were checked above
                    tar.extractall(tmp, members=members)
            except (tarfile.TarError, OSError, EOFError) as e:
                raise DataError(f"cannot extract archive {archive} ({e})", fix) from e
            for path in sorted(tmp.rglob("*")):
                if path.is_file():
                    target = dest / path.relative_to(tmp)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(path, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- safe pickles


def _numpy_reconstruct() -> Any:
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return _reconstruct


def _numpy_scalar() -> Any:
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    return scalar


_SAFE_BUILTINS = frozenset(
    {
        "dict",
        "list",
        "tuple",
        "set",
        "frozenset",
        "bytes",
        "bytearray",
        "str",
        "int",
        "float",
        "bool",
        "complex",
    }
)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can only build builtin containers/scalars and numpy arrays.

    Any other global the pickle names (``os.system``, ``builtins.eval``...) raises DataError
    before it is looked up, so a hostile file cannot run code.
    """

    def __init__(self, file: BinaryIO, *, path: Path | str = "<pickle>") -> None:
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        module = {"__builtin__": "builtins"}.get(module, module)  # Python 2 pickles
        if module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            if name == "_reconstruct":
                return _numpy_reconstruct()
            if name == "scalar":  # numpy scalars (e.g. np.int64 labels): bytes -> number
                return _numpy_scalar()
        elif module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        elif module == "_codecs" and name == "encode":
            import _codecs

            return _codecs.encode
        elif module == "builtins" and name in _SAFE_BUILTINS:
            import builtins

            return getattr(builtins, name)
        raise DataError(
            f"refusing to load {self._path}: pickle references {module}.{name}",
            "use the official data files; a CIFAR pickle holds only dicts, lists, bytes, ints "
            "and numpy arrays",
        )


def _read_pickle(path: Path) -> Any:
    """Read ``path`` with :class:`RestrictedUnpickler` (DataError if unsafe or corrupt)."""
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, path=path).load()
    except DataError:
        raise
    except OSError as e:
        raise DataError(
            f"cannot read {path} ({e.strerror or e})", "check the file's permissions"
        ) from e
    except Exception as e:  # any other failure means a corrupt file
        raise DataError(
            f"{path} is corrupt or truncated ({type(e).__name__}: {e})",
            "delete it and download the official archive again",
        ) from e


def _cifar_batch(path: Path, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[N, 3, 32, 32]`` uint8 and labels ``[N]`` int64 of one CIFAR pickle."""
    d = _read_pickle(path)
    fix = "delete it and download the official archive again"
    if not isinstance(d, dict):
        raise DataError(f"{path} holds a {type(d).__name__}, not a CIFAR dict", fix)
    if b"data" not in d or label_key not in d:
        keys = ", ".join(sorted(repr(k) for k in d)[:8])
        raise DataError(f"{path} lacks the keys b'data' and {label_key!r} (has {keys})", fix)
    data, labels = d[b"data"], d[label_key]
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or (data.shape[1] != 3 * 32 * 32)
    ):
        desc = (
            f"{data.dtype} {list(data.shape)}"
            if isinstance(data, np.ndarray)
            else type(data).__name__
        )
        raise DataError(f"{path}: b'data' is {desc}, expected uint8 [N, 3072]", fix)
    try:
        y = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: {label_key!r} is not a list of integers", fix) from e
    if y.shape[0] != data.shape[0]:
        raise DataError(f"{path}: {data.shape[0]} images but {y.shape[0]} labels", fix)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(
            f"{path}: labels outside 0..{num_classes - 1} (found {int(y.min())}..{int(y.max())})",
            fix,
        )
    return data.reshape(-1, 3, 32, 32), y


def _cifar_split(
    paths: list[Path], label_key: bytes, num_classes: int, limit: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys, have = [], [], 0
    for p in paths:
        if limit is not None and have >= limit:
            break
        x, y = _cifar_batch(p, label_key, num_classes)
        xs.append(x)
        ys.append(y)
        have += x.shape[0]
    x = np.concatenate(xs) if len(xs) > 1 else np.array(xs[0], copy=True)
    y = np.concatenate(ys)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))


def _label_names(path: Path, key: bytes, num_classes: int) -> list[str]:
    meta = _read_pickle(path)
    names = meta.get(key) if isinstance(meta, dict) else None
    if not isinstance(names, list) or len(names) != num_classes:
        raise DataError(
            f"{path} lacks {key!r} with {num_classes} class names",
            "delete it and download the official archive again",
        )
    return [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names]


def _load_cifar10(root: Path, limit_train: int | None, limit_test: int | None) -> _Raw:
    folder = root / _CIFAR10_DIR
    classes = _label_names(folder / "batches.meta", b"label_names", 10)
    tx, ty = _cifar_split([folder / f for f in _CIFAR10_TRAIN], b"labels", 10, limit_train)
    ex, ey = _cifar_split([folder / "test_batch"], b"labels", 10, limit_test)
    return _Raw(tx, ty, ex, ey, classes, folder, CIFAR10_MEAN, CIFAR10_STD)


def _load_cifar100(root: Path, limit_train: int | None, limit_test: int | None) -> _Raw:
    folder = root / _CIFAR100_DIR
    classes = _label_names(folder / "meta", b"fine_label_names", 100)
    tx, ty = _cifar_split([folder / "train"], b"fine_labels", 100, limit_train)
    ex, ey = _cifar_split([folder / "test"], b"fine_labels", 100, limit_test)
    return _Raw(tx, ty, ex, ey, classes, folder, CIFAR100_MEAN, CIFAR100_STD)


# --------------------------------------------------------------------------- SVHN


def _svhn_split(path: Path, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    import scipy.io

    fix = "delete it and download the official file again"
    try:
        mat = scipy.io.loadmat(str(path), variable_names=["X", "y"])
    except Exception as e:  # scipy raises many types for bad files
        raise DataError(f"{path} is not a readable .mat file ({type(e).__name__}: {e})", fix) from e
    x, y = mat.get("X"), mat.get("y")
    if not isinstance(x, np.ndarray) or x.ndim != 4 or x.shape[2] != 3 or x.dtype != np.uint8:
        desc = f"{x.dtype} {list(x.shape)}" if isinstance(x, np.ndarray) else "missing"
        raise DataError(f"{path}: 'X' is {desc}, expected uint8 [H, W, 3, N]", fix)
    if not isinstance(y, np.ndarray) or y.size != x.shape[3]:
        raise DataError(f"{path}: 'y' does not hold one label per image", fix)
    y = y.reshape(-1).astype(np.int64)
    if y.size and (y.min() < 0 or y.max() > 10):
        raise DataError(f"{path}: labels outside 0..10", fix)
    y[y == 10] = 0  # SVHN stores digit 0 as label 10
    if limit is not None:
        x, y = x[..., :limit], y[:limit]
    x = np.ascontiguousarray(x.transpose(3, 2, 0, 1))  # [H, W, C, N] -> [N, C, H, W]
    return torch.from_numpy(x), torch.from_numpy(np.ascontiguousarray(y))


def _load_svhn(root: Path, limit_train: int | None, limit_test: int | None) -> _Raw:
    tx, ty = _svhn_split(root / "train_32x32.mat", limit_train)
    ex, ey = _svhn_split(root / "test_32x32.mat", limit_test)
    return _Raw(tx, ty, ex, ey, [str(i) for i in range(10)], root, SVHN_MEAN, SVHN_STD)


# --------------------------------------------------------------------------- your own .npz


def _load_npz(root: Path, limit_train: int | None, limit_test: int | None) -> _Raw:
    path = root if root.suffix == ".npz" and not root.is_dir() else root / "data.npz"
    keys_fix = (
        "save it with np.savez(path, x_train=..., y_train=..., x_test=..., y_test=..., "
        "classes=np.array([...]))"
    )
    if not path.is_file():
        raise DataRootError(
            f"no npz data set at {path}",
            f"pass --data-dir pointing at a .npz file or a folder holding data.npz; {keys_fix}",
            holding="a .npz file or a folder holding data.npz",
        )
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in z.files]
            if missing:
                raise DataError(
                    f"{path} lacks {', '.join(missing)} (has {', '.join(z.files)})", keys_fix
                )
            arrays = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
            classes_arr = z["classes"] if "classes" in z.files else None
            stats = {k: z[k] for k in ("mean", "std") if k in z.files}
    except DataError:
        raise
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise DataError(
                f"{path} holds object arrays (pickled data), which pqd refuses",
                "store classes as a string array: classes=np.array(names, dtype=str)",
            ) from e
        raise DataError(f"{path} is not a readable .npz ({e})", keys_fix) from e
    except Exception as e:  # zipfile/OSError/EOF: corrupt file
        raise DataError(f"{path} is not a readable .npz ({type(e).__name__}: {e})", keys_fix) from e

    tx = _npz_images(path, "x_train", arrays["x_train"])
    ex = _npz_images(path, "x_test", arrays["x_test"])
    if tx.shape[1:] != ex.shape[1:]:
        raise DataError(
            f"{path}: x_train images are {list(tx.shape[1:])} but x_test images are "
            f"{list(ex.shape[1:])}",
            "give both splits the same image size",
        )
    ty = _npz_labels(path, "y_train", arrays["y_train"], tx.shape[0])
    ey = _npz_labels(path, "y_test", arrays["y_test"], ex.shape[0])
    top = int(max(ty.max(initial=-1), ey.max(initial=-1)))
    if classes_arr is not None:
        classes = [str(c) for c in np.asarray(classes_arr).reshape(-1).tolist()]
        if top >= len(classes):
            raise DataError(
                f"{path}: label {top} but only {len(classes)} classes",
                "list every class in `classes` or fix the labels",
            )
    else:
        classes = [str(i) for i in range(top + 1)]
    if len(classes) < 2:
        raise DataError(
            f"{path}: only {len(classes)} class(es)", "a classifier needs at least two classes"
        )
    if limit_train is not None:
        tx, ty = tx[:limit_train], ty[:limit_train]
    if limit_test is not None:
        ex, ey = ex[:limit_test], ey[:limit_test]
    mean = std = None
    if stats:  # the normalisation the model expects (else: the training images' statistics)
        if set(stats) != {"mean", "std"} or any(v.size != tx.shape[1] for v in stats.values()):
            raise DataError(
                f"{path}: 'mean' and 'std' must both be there, one value per channel",
                "store mean=np.array([...]) and std=np.array([...]), or neither",
            )
        mean = tuple(float(v) for v in stats["mean"].reshape(-1))
        std = tuple(float(v) for v in stats["std"].reshape(-1))
    return _Raw(
        torch.from_numpy(np.ascontiguousarray(tx)),
        torch.from_numpy(np.ascontiguousarray(ty)),
        torch.from_numpy(np.ascontiguousarray(ex)),
        torch.from_numpy(np.ascontiguousarray(ey)),
        classes,
        path.parent,
        mean,  # type: ignore[arg-type]
        std,  # type: ignore[arg-type]
    )


def _npz_images(path: Path, key: str, x: np.ndarray) -> np.ndarray:
    """``x`` as uint8 ``[N, 3, H, W]`` (accepts ``[N, H, W, 3]`` too)."""
    if x.dtype != np.uint8:
        raise DataError(
            f"{path}: {key} is {x.dtype}, expected uint8 images",
            f"convert it, e.g. {key}=(x * 255).round().astype(np.uint8)",
        )
    if x.ndim == 4 and x.shape[-1] == 3 and x.shape[1] != 3:
        return x.transpose(0, 3, 1, 2)
    if x.ndim == 4 and x.shape[1] == 3:
        return x
    raise DataError(
        f"{path}: {key} has shape {list(x.shape)}, expected [N, H, W, 3] or "
        "[N, 3, H, W] RGB images",
        "store RGB images (repeat grayscale to 3 channels)",
    )


def _npz_labels(path: Path, key: str, y: np.ndarray, n: int) -> np.ndarray:
    if y.dtype.kind not in "iu" or y.size != n or y.ndim > 2:
        raise DataError(
            f"{path}: {key} must hold {n} integer labels (got {y.dtype} {list(y.shape)})",
            f"store {key} as an int array of shape [{n}]",
        )
    y = y.reshape(-1).astype(np.int64)
    if y.size and y.min() < 0:
        raise DataError(f"{path}: {key} has negative labels", "use labels 0..K-1")
    return y


# --------------------------------------------------------------------------- loader


RESIZED_CROP_FROM = 64
"""Image side (pixels) from which ``crop="auto"`` means a random resized crop (below it:
a random crop after padding, as for CIFAR)."""


class Loader:
    """Tensor-resident batches: uint8 images live on ``device`` (on the CPU they may be views
    of a memory-mapped file); each batch is converted to float32 in [0, 1] and augmented on
    the fly on that device: ``crop="pad"`` takes a random crop after padding (CIFAR style),
    ``crop="resized"`` a random resized crop (a random area fraction in ``[min_scale, 1]``
    of the image, aspect ratio in [3/4, 4/3], scaled back to the full size, bilinear: the
    ImageNet-style crop), then a horizontal flip. ``crop="auto"`` chooses ``resized`` for
    images of :data:`RESIZED_CROP_FROM` pixels or more. No workers, no PIL.

    All randomness (shuffle order, crop offsets, flips) comes from the Loader's own
    ``torch.Generator`` seeded with ``seed``; each ``iter()`` draws one epoch's worth up front,
    so the generator advances once per epoch, two Loaders with the same seed give identical
    batch sequences, and the global torch RNG is never touched.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        augment: bool = False,
        crop_padding: int = 4,
        pad_mode: str = "reflect",
        flip: bool = True,
        drop_last: bool = False,
        device: str | torch.device = "cpu",
        seed: int = 0,
        channels_last: bool = False,
        crop: str = "pad",
        min_scale: float = 0.25,
    ) -> None:
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise ValueError(f"x must be uint8 [N, C, H, W], got {x.dtype} {list(x.shape)}")
        if y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"y must be [N={x.shape[0]}] labels, got {list(y.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if pad_mode not in ("reflect", "zeros"):
            raise ValueError(f"pad_mode must be 'reflect' or 'zeros', got {pad_mode!r}")
        h, w = int(x.shape[2]), int(x.shape[3])
        if crop not in ("auto", "pad", "resized"):
            raise ValueError(f"crop must be 'auto', 'pad' or 'resized', got {crop!r}")
        if crop == "auto":
            crop = "resized" if min(h, w) >= RESIZED_CROP_FROM else "pad"
        if not 0.0 < min_scale <= 1.0:
            raise ValueError(f"min_scale must be in (0, 1], got {min_scale}")
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
        if augment and crop == "pad" and pad_mode == "reflect" and crop_padding >= min(h, w):
            raise DataError(
                f"crop_padding {crop_padding} is too large for {h}x{w} images with reflect padding",
                f"set data.augment.crop_padding below {min(h, w)} or pad_mode: zeros",
            )
        self.device = torch.device(device)
        self.x = x.to(self.device).contiguous()
        self.y = y.to(self.device, torch.int64)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.crop = crop
        self.min_scale = float(min_scale)
        self.augment = augment and (crop == "resized" or crop_padding > 0 or flip)
        self.crop_padding = int(crop_padding)
        self.pad_mode = pad_mode
        self.flip = flip
        self.drop_last = drop_last
        self.channels_last = channels_last
        self.seed = int(seed)
        self.epoch = 0
        self._gen = torch.Generator().manual_seed(self.seed)
        self._ar_h = torch.arange(h, device=self.device)
        self._ar_w = torch.arange(w, device=self.device)

    @property
    def num_samples(self) -> int:
        """Number of images in the split."""
        return int(self.x.shape[0])

    def __len__(self) -> int:
        """Number of batches per epoch."""
        n, b = self.num_samples, self.batch_size
        return n // b if self.drop_last else math.ceil(n / b)

    def state_dict(self) -> dict[str, Any]:
        """Epochs drawn and the generator state: enough to continue the same batch sequence."""
        return {"epoch": self.epoch, "generator": self._gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict` (a resumed run draws the same next epochs)."""
        self.epoch = int(state["epoch"])
        self._gen.set_state(state["generator"])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, p = self.num_samples, self.crop_padding
        # Draw the whole epoch's randomness now (CPU generator, then one copy to the device).
        order = torch.randperm(n, generator=self._gen) if self.shuffle else None
        offsets = flips = None
        if self.augment and self.crop == "resized":
            offsets = self._resized_boxes(n)
            flips = torch.rand(n, generator=self._gen) < 0.5 if self.flip else None
        elif self.augment:
            offsets = torch.randint(0, 2 * p + 1, (n, 2), generator=self._gen)
            flips = torch.rand(n, generator=self._gen) < 0.5 if self.flip else None
        self.epoch += 1
        return self._batches(
            *(None if t is None else t.to(self.device) for t in (order, offsets, flips))
        )

    def _batches(
        self, order: torch.Tensor | None, offsets: torch.Tensor | None, flips: torch.Tensor | None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, b = self.num_samples, self.batch_size
        stop = n - n % b if self.drop_last else n
        for start in range(0, stop, b):
            end = min(start + b, n)
            if order is None:
                xb, yb = self.x[start:end], self.y[start:end]
            else:
                idx = order[start:end]
                xb, yb = self.x[idx], self.y[idx]
            if offsets is not None and self.crop == "resized":
                out = self._resized_crop(
                    xb, offsets[start:end], None if flips is None else flips[start:end]
                )
            elif offsets is not None:
                out = self._augment(
                    xb, offsets[start:end], None if flips is None else flips[start:end]
                )
            else:
                out = xb.to(torch.float32).div_(255.0)
            if self.channels_last:
                out = out.contiguous(memory_format=torch.channels_last)
            yield out, yb

    def _resized_boxes(self, n: int) -> torch.Tensor:
        """``[n, 4]`` crop boxes (width, height, center x, center y) in the [-1, 1] image
        coordinates of ``grid_sample``: area fraction uniform in [min_scale, 1], log aspect
        ratio uniform in [log 3/4, log 4/3], the box inside the image."""
        area = torch.empty(n).uniform_(self.min_scale, 1.0, generator=self._gen)
        log_r = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=self._gen)
        ratio = log_r.exp()
        bw = (area * ratio).sqrt().clamp(max=1.0)  # fractions of the side
        bh = (area / ratio).sqrt().clamp(max=1.0)
        cx = (torch.rand(n, generator=self._gen) * 2 - 1) * (1 - bw)
        cy = (torch.rand(n, generator=self._gen) * 2 - 1) * (1 - bh)
        return torch.stack([bw, bh, cx, cy], dim=1)

    def _resized_crop(
        self, xb: torch.Tensor, box: torch.Tensor, flips: torch.Tensor | None
    ) -> torch.Tensor:
        """Each image's box (:meth:`_resized_boxes`) scaled to the full size (bilinear),
        mirrored where ``flips``: one batched ``affine_grid`` + ``grid_sample``."""
        bsz, c, h, w = xb.shape
        theta = torch.zeros(bsz, 2, 3, device=xb.device)
        sx = box[:, 0] if flips is None else torch.where(flips, -box[:, 0], box[:, 0])
        theta[:, 0, 0], theta[:, 0, 2] = sx, box[:, 2]
        theta[:, 1, 1], theta[:, 1, 2] = box[:, 1], box[:, 3]
        grid = torch.nn.functional.affine_grid(theta, [bsz, c, h, w], align_corners=False)
        src = xb.to(torch.float32).div_(255.0)
        return torch.nn.functional.grid_sample(
            src, grid, mode="bilinear", padding_mode="border", align_corners=False
        )

    def _augment(
        self, xb: torch.Tensor, off: torch.Tensor, flips: torch.Tensor | None
    ) -> torch.Tensor:
        """Random crop (pad ``crop_padding``, take an HxW window) + flip, as one gather.

        Output pixel (i, j) of image k reads padded pixel (oy_k + i, ox_k + j), i.e. original
        pixel (oy_k + i - p, ox_k + j - p) mapped back into the image by reflection (or
        zeroed, for ``pad_mode='zeros'``); flipping reverses the column indices.
        """
        bsz, c, h, w = xb.shape
        p = self.crop_padding
        rows = off[:, 0:1] - p + self._ar_h  # [B, H], original coordinates
        cols = off[:, 1:2] - p + self._ar_w  # [B, W]
        if flips is not None:
            cols = torch.where(flips[:, None], cols.flip(1), cols)
        valid = None
        if self.pad_mode == "reflect":
            rows, cols = _reflect(rows, h), _reflect(cols, w)
        elif p > 0:
            valid = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
            rows, cols = rows.clamp(0, h - 1), cols.clamp(0, w - 1)
        lin = (rows[:, :, None] * w + cols[:, None, :]).view(bsz, 1, h * w).expand(bsz, c, h * w)
        out = torch.gather(xb.reshape(bsz, c, h * w), 2, lin)
        if valid is not None:
            out.masked_fill_(~valid.view(bsz, 1, h * w), 0)
        return out.view(bsz, c, h, w).to(torch.float32).div_(255.0)


def _reflect(i: torch.Tensor, n: int) -> torch.Tensor:
    """Map indices in [-(n-1), 2n-2] into [0, n) by reflection without repeating the edge."""
    i = i.abs()
    return torch.where(i >= n, 2 * (n - 1) - i, i)


def __getattr__(name: str) -> Any:
    """``from_folder`` lives in :mod:`pqd.folder` (which builds on this module): imported
    on first use, so either module can be imported first."""
    if name == "from_folder":
        from pqd.folder import from_folder

        return from_folder
    raise AttributeError(f"module 'pqd.data' has no attribute {name!r}")


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
