"""Files present? A data set's files checked without loading them (:func:`check_data`),
and the one-line error that says what is missing and how to get it."""

from __future__ import annotations

from pathlib import Path

from pqd.data.download import (
    _DOWNLOAD_MB,
    _check_download_target,
    _download,
    _NetworkError,
    _remove_empty,
)
from pqd.data.roots import ENV_DATA_DIR
from pqd.data.sources import (
    _CIFAR10_DIR,
    _CIFAR10_TRAIN,
    _CIFAR100_DIR,
    _SVHN_FILES,
    _holding,
)
from pqd.errors import DataError, DataRootError


def _required_files(name: str, root: Path) -> list[Path]:
    if name == "cifar10":
        folder = root / _CIFAR10_DIR
        return [folder / f for f in (*_CIFAR10_TRAIN, "test_batch", "batches.meta")]
    if name == "cifar100":
        folder = root / _CIFAR100_DIR
        return [folder / f for f in ("train", "test", "meta")]
    return [root / f for f in _SVHN_FILES]


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
