"""Downloads, only when asked: the official archives fetched, checked (md5) and
extracted safely (no path leaves the target)."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from pqd.data.roots import ENV_DATA_DIR
from pqd.data.sources import (
    _CIFAR10_DIR,
    _CIFAR100_DIR,
    _SVHN_FILES,
    CIFAR10_MD5,
    CIFAR10_URL,
    CIFAR100_MD5,
    CIFAR100_URL,
    DOWNLOAD_TIMEOUT_S,
    SVHN_TEST_MD5,
    SVHN_TEST_URL,
    SVHN_TRAIN_MD5,
    SVHN_TRAIN_URL,
    _holding,
)
from pqd.errors import DataError

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
