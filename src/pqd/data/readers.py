"""Readers of the official files and of ``.npz`` (a restricted unpickler for CIFAR's
pickles) and :func:`load_dataset`, which splits and limits what they read."""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from pqd.data.download import _DOWNLOAD_MB, _check_download_target
from pqd.data.files import _ensure_files, _missing, _not_a_folder, _required_files
from pqd.data.roots import ENV_DATA_DIR
from pqd.data.sources import (
    _CIFAR10_DIR,
    _CIFAR10_TRAIN,
    _CIFAR100_DIR,
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    DATASETS,
    NUM_CLASSES,
    SVHN_MEAN,
    SVHN_STD,
    _holding,
)
from pqd.data.tensors import resize_images
from pqd.dataset import (
    Dataset,
    channel_stats,
    check_limit,
    stratified_split,
)
from pqd.errors import DataError, DataRootError


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
    limit_train = check_limit("limit_train", limit_train)
    limit_test = check_limit("limit_test", limit_test)
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
        mean, std = channel_stats(train_x)
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
    classes = _npz_classes(path, classes_arr, top)
    if limit_train is not None:
        tx, ty = tx[:limit_train], ty[:limit_train]
    if limit_test is not None:
        ex, ey = ex[:limit_test], ey[:limit_test]
    mean, std = _npz_stats(path, stats, tx.shape[1])
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


def _npz_classes(path: Path, classes_arr: np.ndarray | None, top: int) -> list[str]:
    """The class names stored in the file (enough for label ``top``), else ``"0"``..``top``;
    at least two."""
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
    return classes


def _npz_stats(
    path: Path, stats: dict[str, np.ndarray], channels: int
) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """The normalisation the model expects, as stored (``mean`` and ``std``, one value per
    channel), or ``(None, None)`` when the file has neither (then the training images'
    statistics are used)."""
    if not stats:
        return None, None
    if set(stats) != {"mean", "std"} or any(v.size != channels for v in stats.values()):
        raise DataError(
            f"{path}: 'mean' and 'std' must both be there, one value per channel",
            "store mean=np.array([...]) and std=np.array([...]), or neither",
        )
    mean = tuple(float(v) for v in stats["mean"].reshape(-1))
    std = tuple(float(v) for v in stats["std"].reshape(-1))
    return mean, std


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
