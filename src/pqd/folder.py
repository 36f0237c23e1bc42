"""Image folders (``root/train/<class>/*.jpg``) decoded once into a memory-mapped uint8 cache.

    data = pqd.data.from_folder("photos", image_size=64)      # recipe: data: {dataset: folder}

Layout: ``root/train/<class>/...`` (class names: the folder names, sorted; files found
recursively), optional ``root/val/<class>/...`` and ``root/test/<class>/...``; a split that is
not there is carved from ``train/`` (class-stratified, seeded: test first, then val).
JPEG, PNG, BMP and WebP files are read with Pillow; grayscale, palette and RGBA images become
RGB. Every image is decoded *before* training, resized (short side to ``image_size``, then the
center ``image_size`` x ``image_size`` crop) and written into one uint8 ``[N, 3, S, S]`` file
per split folder under the cache folder, keyed by a hash of the folder's listing (paths,
sizes, mtimes) and the size. Later loads map that file (``np.memmap``) instead of decoding
again, and the :class:`pqd.data.Dataset` tensors are views of it, so data larger than memory
works (the OS pages it in). Files that cannot be decoded (corrupt, truncated) stop the load
with one line naming them, or with ``on_bad_image="skip"`` are left out and counted.

Cache folder: ``cache_dir``, else ``$PQD_CACHE_DIR``, else the user's cache folder
``$XDG_CACHE_HOME/pqd`` (``~/.cache/pqd``); never inside the data folder unless asked (the
data may be shared or read-only). Deleting it is always safe.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pqd.dataset import Dataset, channel_stats, check_limit, stratified_split
from pqd.errors import DataError, DataRootError

__all__ = [
    "CACHE_DIR_ENV",
    "DEFAULT_IMAGE_SIZE",
    "IMAGE_EXTENSIONS",
    "check_folder",
    "decode_image",
    "from_folder",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
"""File endings read as images (case-insensitive); other files are ignored."""

DEFAULT_IMAGE_SIZE = 64
"""``image_size`` of a folder data set when none is given, in pixels."""

CACHE_DIR_ENV = "PQD_CACHE_DIR"
"""Environment variable naming the decoded-image cache folder."""

_CACHE_VERSION = 1
_SHOWN = 3  # bad files named in an error line
_LAYOUT_FIX = (
    "lay the images out as ROOT/train/<class>/*.jpg (optional ROOT/val/<class>/, "
    "ROOT/test/<class>/) and pass ROOT as data.root / --data-dir"
)
_HOLDING = "the folder holding train/<class>/ image folders (ROOT/train/<class>/*.jpg)"
_SKIP_FIX = (
    "replace or delete them, or leave them out with data.on_bad_image: skip "
    "(pqd.data.from_folder(..., on_bad_image='skip'))"
)


@dataclass
class _Listing:
    """The image files of one split folder, with labels (class ids) and the root they are
    relative to."""

    folder: Path
    files: list[Path]
    labels: np.ndarray

    def rel(self, i: int) -> str:
        return str(self.files[i].relative_to(self.folder.parent))


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def _subdirs(folder: Path) -> list[str]:
    try:
        return sorted(e.name for e in folder.iterdir() if e.is_dir() and not e.name.startswith("."))
    except OSError as e:
        raise DataError(f"cannot read {folder} ({e.strerror or e})", "check its permissions") from e


def _images_in(folder: Path) -> list[Path]:
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files.extend(Path(dirpath) / f for f in sorted(filenames) if _is_image(Path(f)))
    return files


def _classes(root: Path, on_bad_image: str) -> tuple[list[str], list[str]]:
    """Class names of ``root/train`` (sorted folder names with images) and the names of
    class folders without images (left out under ``skip``, an error otherwise)."""
    root = Path(root)
    if not root.is_dir():
        raise DataRootError(f"image folder {root} does not exist", _LAYOUT_FIX, holding=_HOLDING)
    train = root / "train"
    if not train.is_dir():
        raise DataRootError(f"{root} has no train/ folder", _LAYOUT_FIX, holding=_HOLDING)
    names = _subdirs(train)
    empty = [n for n in names if not _images_in(train / n)]
    if empty and on_bad_image != "skip":
        shown = ", ".join(f"train/{n}/" for n in empty[:_SHOWN])
        more = f" and {len(empty) - _SHOWN} more" if len(empty) > _SHOWN else ""
        raise DataError(
            f"{len(empty)} class folder(s) in {train} hold no images "
            f"({', '.join(IMAGE_EXTENSIONS)}): {shown}{more}",
            "put images into them or remove them, or leave them out with "
            "data.on_bad_image: skip (pqd.data.from_folder(..., on_bad_image='skip'))",
        )
    classes = [n for n in names if n not in empty]
    if len(classes) < 2:
        raise DataError(
            f"{train} holds {len(classes)} class folder(s) with images; a classifier needs two",
            _LAYOUT_FIX,
        )
    return classes, empty


def _listing(folder: Path, classes: list[str], ignore: Sequence[str] = ()) -> _Listing:
    unknown = [n for n in _subdirs(folder) if n not in classes and n not in ignore]
    if unknown:
        raise DataError(
            f"{folder} has class folder {unknown[0]!r}"
            f"{f' and {len(unknown) - 1} more' if len(unknown) > 1 else ''} that train/ lacks "
            "(or that holds no training images)",
            "give every class in val/ and test/ training images in train/, or remove it",
        )
    files: list[Path] = []
    labels: list[int] = []
    for k, name in enumerate(classes):
        if (folder / name).is_dir():
            found = _images_in(folder / name)
            files.extend(found)
            labels.extend([k] * len(found))
    return _Listing(folder, files, np.asarray(labels, dtype=np.int64))


def check_folder(root: str | Path, on_bad_image: str = "error") -> tuple[int, str]:
    """Check an image folder's layout without decoding it (``pqd validate``).

    Args:
        root: the folder holding ``train/`` (and optionally ``val/``, ``test/``).
        on_bad_image: ``error`` or ``skip`` (empty class folders are errors unless ``skip``).

    Returns:
        The number of classes and a one-line description of what was found.
    """
    root = Path(os.path.abspath(Path(root).expanduser()))
    classes, empty = _classes(root, on_bad_image)
    n = len(_listing(root / "train", classes, empty).files)
    extra = [s for s in ("val", "test") if (root / s).is_dir()]
    for s in extra:
        _listing(root / s, classes)
    splits = f"train/ ({n} images)" + "".join(f", {s}/" for s in extra)
    note = f"; {len(empty)} empty class folder(s) skipped" if empty else ""
    return len(classes), f"image folder {root}: {len(classes)} classes, {splits}{note}"


# --------------------------------------------------------------------------- decoding


def decode_image(path: str | Path, size: int) -> np.ndarray:
    """One image file as uint8 ``[3, size, size]``: RGB, short side resized to ``size``
    (bilinear, antialiased), center crop. Raises whatever Pillow raises for a bad file."""
    from PIL import Image

    im: Image.Image  # the opened file, then its converted copies
    with Image.open(path) as im:
        im.draft("RGB", (size, size))  # JPEG: decode at the smallest scale still >= size
        if im.mode == "P" or (im.mode == "LA"):
            im = im.convert("RGBA")
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im, dtype=np.int64)
            im = Image.fromarray((arr >> 8 if arr.max() > 255 else arr).astype(np.uint8))
        rgb = im.convert("RGB")
    w, h = rgb.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        rgb = rgb.resize((nw, nh), Image.Resampling.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    rgb = rgb.crop((left, top, left + size, top + size))
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)


def _cache_root(root: Path, cache_dir: str | Path | None) -> Path:
    if cache_dir is not None or os.environ.get(CACHE_DIR_ENV):
        chosen = Path(str(cache_dir or os.environ[CACHE_DIR_ENV])).expanduser()
        try:
            chosen.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DataError(
                f"the image cache folder {chosen} cannot be created ({e.strerror or e})",
                f"pass a writable cache_dir or set {CACHE_DIR_ENV} to a writable folder",
            ) from e
        return chosen
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    chosen = Path(xdg) / "pqd"
    try:
        chosen.mkdir(parents=True, exist_ok=True)
        probe = chosen / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise DataError(
            f"the user cache folder {chosen} for decoded images cannot be written "
            f"({e.strerror or e})",
            f"set {CACHE_DIR_ENV} to a writable folder (or pass cache_dir to pqd.data.from_folder)",
        ) from e
    return chosen


def _key(parts: Sequence[Any]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(repr(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def _listing_key(listing: _Listing, size: int) -> str:
    parts: list[Any] = [_CACHE_VERSION, str(listing.folder), size]
    for f, y in zip(listing.files, listing.labels.tolist(), strict=True):
        try:
            st = f.stat()
        except OSError:
            parts.append((str(f), y, None))
            continue
        parts.append((str(f.relative_to(listing.folder)), y, st.st_size, st.st_mtime_ns))
    return _key(parts)


def _open(path: Path, n: int, size: int) -> torch.Tensor:
    """The cache file as a uint8 ``[n, 3, size, size]`` tensor viewing a copy-on-write map."""
    if n == 0:
        return torch.empty(0, 3, size, size, dtype=torch.uint8)
    mm = np.memmap(path, dtype=np.uint8, mode="c", shape=(n, 3, size, size))
    return torch.from_numpy(mm)


def _read_meta(meta_path: Path, data_path: Path, size: int) -> dict[str, Any] | None:
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        n = int(meta["n"])
        if data_path.stat().st_size != n * 3 * size * size or len(meta["labels"]) != n:
            return None
        return meta
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_meta(meta_path: Path, meta: dict[str, Any]) -> None:
    tmp = meta_path.with_name(f"{meta_path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(meta), encoding="utf-8")
    os.replace(tmp, meta_path)


_Decoded = tuple[torch.Tensor, np.ndarray, list[list[str]], str]
"""A decoded split: uint8 images (a view of a cache file), labels, skipped files, cache key."""


def _decode_split(
    listing: _Listing, size: int, cache: Path, on_bad_image: str, progress: bool
) -> _Decoded:
    """Decode a split folder's listing into the cache (or map the cached file).

    Returns:
        uint8 images ``[N, 3, size, size]`` (a view of the cache file), their labels, the
        skipped files as ``[relative path, reason]`` and the cache key.
    """
    key = _listing_key(listing, size)
    data_path, meta_path = cache / f"{key}.u8", cache / f"{key}.json"
    meta = _read_meta(meta_path, data_path, size)
    if meta is not None:
        if meta["skipped"] and on_bad_image != "skip":
            _bad_error(listing.folder, len(listing.files), meta["skipped"])
        labels = np.asarray(meta["labels"], dtype=np.int64)
        return _open(data_path, int(meta["n"]), size), labels, meta["skipped"], key
    n = len(listing.files)
    tmp = data_path.with_name(f"{data_path.name}.{os.getpid()}.tmp")
    bad: dict[int, str] = {}
    lock = threading.Lock()
    try:
        if n:
            out = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=(n, 3, size, size))

            def work(i: int) -> None:
                try:  # (no warnings.catch_warnings here: it is process-wide, not per thread)
                    out[i] = decode_image(listing.files[i], size)
                except Exception as e:  # Pillow raises many types for bad files
                    with lock:
                        bad[i] = f"{type(e).__name__}: {e}".splitlines()[0][:120]

            bar = _bar(n, f"decoding {listing.folder.name}/", progress)
            with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
                for _ in pool.map(work, range(n), chunksize=16):
                    bar.update(1)
            bar.close()
            if bad and on_bad_image != "skip":
                _bad_error(listing.folder, n, [[listing.rel(i), bad[i]] for i in sorted(bad)])
            keep = [i for i in range(n) if i not in bad]
            if bad:  # move the good rows forward (in place: a row only moves down), cut the rest
                for j, i in enumerate(keep):
                    if i != j:
                        out[j] = out[i]
            out.flush()
            del out
            with open(tmp, "r+b") as f:
                f.truncate(len(keep) * 3 * size * size)
        else:
            keep = []
            tmp.write_bytes(b"")
        os.replace(tmp, data_path)
    finally:
        tmp.unlink(missing_ok=True)
    labels = listing.labels[keep]
    skipped = [[listing.rel(i), bad[i]] for i in sorted(bad)]
    _write_meta(meta_path, {"n": len(keep), "labels": labels.tolist(), "skipped": skipped})
    return _open(data_path, len(keep), size), labels, skipped, key


def _bad_error(folder: Path, n: int, bad: list[list[str]]) -> None:
    """Raise the one-line error naming the first undecodable files (and the first reason)."""
    shown = ", ".join(
        f"{rel} ({why})" if j == 0 else rel for j, (rel, why) in enumerate(bad[:_SHOWN])
    )
    more = f" and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else ""
    raise DataError(
        f"{len(bad)} of {n} image files in {folder} cannot be decoded: {shown}{more}", _SKIP_FIX
    )


def _bar(total: int, desc: str, progress: bool) -> Any:
    from pqd.progress import bar

    return bar(total=total, desc=desc, show=progress, leave=False, unit="img")


def _gather(
    base: torch.Tensor, parts: list[np.ndarray], cache: Path, key: str
) -> list[torch.Tensor]:
    """Rows ``parts[0]``, ``parts[1]``... of ``base`` written one after the other into a
    cache file (chunked copies, no decoding), returned as views of it."""
    size = int(base.shape[-1])
    n = sum(len(p) for p in parts)
    path, meta_path = cache / f"{key}.u8", cache / f"{key}.json"
    if _read_meta(meta_path, path, size) is None:
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            if n:
                out = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=(n, 3, size, size))
                src = base.numpy()
                order = np.concatenate(parts)
                for s in range(0, n, 1024):
                    out[s : s + 1024] = src[order[s : s + 1024]]
                out.flush()
                del out
            else:
                tmp.write_bytes(b"")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        _write_meta(meta_path, {"n": n, "labels": [0] * n, "skipped": []})
    whole = _open(path, n, size)
    views, start = [], 0
    for p in parts:
        views.append(whole[start : start + len(p)])
        start += len(p)
    return views


def _limit(labels: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """Indices of a class-balanced subset of ``limit`` images (all when ``limit`` is None)."""
    if limit is None or limit >= len(labels):
        return np.arange(len(labels))
    return stratified_split(torch.from_numpy(labels), limit, seed)[1].numpy()


def from_folder(
    root: str | Path,
    *,
    image_size: int | None = None,
    val_size: int | float = 0.1,
    test_size: int | float = 0.1,
    seed: int = 0,
    on_bad_image: str = "error",
    limit_train: int | None = None,
    limit_test: int | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> Dataset:
    """A :class:`pqd.data.Dataset` from an image folder (recipe ``data: {dataset: folder}``).

    Args:
        root: the folder holding ``train/<class>/*`` and optionally ``val/<class>/*`` and
            ``test/<class>/*`` (JPEG, PNG, BMP, WebP).
        image_size: side of the square images the model sees, in pixels (short side
            resized to it, then center-cropped); default :data:`DEFAULT_IMAGE_SIZE`.
        val_size: count or fraction of ``train/`` carved out (stratified) when there is no
            ``val/`` folder (0: no validation split).
        test_size: the same for the test split when there is no ``test/`` folder (carved
            first, before ``val_size``).
        seed: seed of the carved splits and of the ``limit_*`` subsets.
        on_bad_image: ``error`` (one line naming the files that cannot be decoded and the
            empty class folders) or ``skip`` (leave them out; counted in :meth:`summary`).
        limit_train: keep a class-balanced subset of N images of ``train/`` (tiny runs).
        limit_test: keep N images of the test split.
        cache_dir: where the decoded images are kept (see the module documentation).
        progress: show a progress bar while decoding.

    Returns:
        The data set; its tensors are views of memory-mapped cache files, its
        ``summary()`` holds the classes, image size, splits, cache folder and skipped files.
    """
    if on_bad_image not in ("error", "skip"):
        raise DataError(f"on_bad_image is {on_bad_image!r}", "use 'error' or 'skip'")
    size = DEFAULT_IMAGE_SIZE if image_size is None else image_size
    if isinstance(size, bool) or not isinstance(size, int) or not 8 <= size <= 4096:
        raise DataError(f"image_size {image_size!r} is not a side in pixels", "use 8..4096")
    limit_train = check_limit("limit_train", limit_train)
    limit_test = check_limit("limit_test", limit_test)
    root = Path(os.path.abspath(Path(root).expanduser()))
    classes, empty = _classes(root, on_bad_image)
    cache = _cache_root(root, cache_dir)

    train_list = _subset(_listing(root / "train", classes, empty), limit_train, seed)
    decoded: dict[str, _Decoded] = {}
    decoded["train"] = _decode_split(train_list, size, cache, on_bad_image, progress)
    for split in ("val", "test"):
        if (root / split).is_dir():
            lst = _listing(root / split, classes)
            if split == "test":
                lst = _subset(lst, limit_test, seed)
            decoded[split] = _decode_split(lst, size, cache, on_bad_image, progress)

    _, ty_np, _, base_key = decoded["train"]
    _check_every_class(ty_np, classes, root / "train")
    rest, val_idx, test_idx, splits = _carve(decoded, ty_np, val_size, test_size, seed, limit_test)
    train_x, train_y = _gather_carved(decoded, rest, val_idx, test_idx, cache)
    mean, std = _cached_stats(train_x, cache, _key(["stats", base_key, rest.tolist()]))
    info = _summary(decoded, splits, cache, on_bad_image, empty)
    return Dataset(
        name="folder",
        num_classes=len(classes),
        classes=classes,
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        train_x=train_x,
        train_y=train_y,
        val_x=decoded["val"][0],
        val_y=torch.from_numpy(np.ascontiguousarray(decoded["val"][1])),
        test_x=decoded["test"][0],
        test_y=torch.from_numpy(np.ascontiguousarray(decoded["test"][1])),
        root=root,
        info=info,
    )


def _check_every_class(labels: np.ndarray, classes: list[str], folder: Path) -> None:
    """Every class has a decoded training image (``labels``), or a DataError names one."""
    for c in range(len(classes)):
        if not (labels == c).any():
            raise DataError(
                f"class {classes[c]!r} has no decodable training image in {folder}",
                "add images to it, or remove the class folder",
            )


def _subset(listing: _Listing, limit: int | None, seed: int) -> _Listing:
    """A class-balanced subset of ``limit`` files of ``listing`` (see :func:`_limit`)."""
    keep = _limit(listing.labels, limit, seed)
    return _Listing(listing.folder, [listing.files[i] for i in keep], listing.labels[keep])


def _carve(
    decoded: dict[str, _Decoded],
    ty_np: np.ndarray,
    val_size: int | float,
    test_size: int | float,
    seed: int,
    limit_test: int | None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, dict[str, str]]:
    """The splits that have no folder, carved from the training labels ``ty_np`` (test
    first, then val; stratified, seeded).

    Returns:
        The indices that stay for training, those of val and of test (None: from its own
        folder), and how each split was made.
    """
    ty = torch.from_numpy(ty_np)
    rest, test_idx = np.arange(len(ty_np)), None
    splits: dict[str, str] = {}
    if "test" not in decoded:
        r, t = stratified_split(ty, test_size, seed)
        rest, test_idx = r.numpy(), t.numpy()
        if limit_test is not None and limit_test < len(test_idx):
            test_idx = test_idx[_limit(ty_np[test_idx], limit_test, seed)]
        splits["test"] = f"carved from train/: test_size {test_size}, stratified, seed {seed}"
    else:
        splits["test"] = "test/"
    val_idx = None
    if "val" not in decoded:
        r2, v = stratified_split(ty[rest], val_size, seed)
        rest, val_idx = rest[r2.numpy()], rest[v.numpy()]
        splits["val"] = f"carved from train/: val_size {val_size}, stratified, seed {seed}"
    else:
        splits["val"] = "val/"
    return rest, val_idx, test_idx, splits


def _gather_carved(
    decoded: dict[str, _Decoded],
    rest: np.ndarray,
    val_idx: np.ndarray | None,
    test_idx: np.ndarray | None,
    cache: Path,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The training images and labels left after carving; the carved splits are put into
    ``decoded`` (all as views of one gathered cache file, :func:`_gather`)."""
    tx, ty_np, _, base_key = decoded["train"]
    ty = torch.from_numpy(ty_np)
    if test_idx is None and val_idx is None:
        return tx, ty
    parts = [rest] + [p for p in (val_idx, test_idx) if p is not None]
    gkey = _key(["gather", base_key, *(p.tolist() for p in parts)])
    views = _gather(tx, parts, cache, gkey)
    train_x, train_y = views[0], ty[torch.from_numpy(rest)]
    views = views[1:]
    if val_idx is not None:
        decoded["val"] = (views.pop(0), ty_np[val_idx], [], gkey)
    if test_idx is not None:
        decoded["test"] = (views.pop(0), ty_np[test_idx], [], gkey)
    return train_x, train_y


def _summary(
    decoded: dict[str, _Decoded],
    splits: dict[str, str],
    cache: Path,
    on_bad_image: str,
    empty: list[str],
) -> dict[str, Any]:
    """The data set's ``info``: how the splits were made, the cache, what was skipped."""
    skipped = [f for part in decoded.values() for f in part[2]]
    info: dict[str, Any] = {
        "splits": splits,
        "cache": str(cache),
        "on_bad_image": on_bad_image,
        "skipped_images": len(skipped),
    }
    if skipped:
        info["skipped_files"] = [f"{p} ({why})" for p, why in skipped[:20]]
    if empty:
        info["skipped_empty_classes"] = empty
    return info


def _cached_stats(
    x: torch.Tensor, cache: Path, key: str
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of the training images, read from the cache when there."""
    path = cache / f"{key}.stats.json"
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        return tuple(d["mean"]), tuple(d["std"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    mean, std = channel_stats(x)
    _write_meta(path, {"mean": list(mean), "std": list(std)})
    return mean, std
