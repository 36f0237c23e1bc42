"""Data sets, safe pickles, downloads and the tensor-resident loader."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import torch.nn.functional as F

import pqd.data as data
from helpers import write_image_folder
from pqd.data import Dataset, Loader, check_data, load_dataset, resolve_data_root
from pqd.data.download import download_and_verify, safe_extract
from pqd.data.sources import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN
from pqd.dataset import stratified_split
from pqd.errors import DataError, DataRootError

SUBSET_DEFAULT = "/work/shared/data/cifar-10-subset"
CIFAR10_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")


# --------------------------------------------------------------------------- fixtures/helpers


@pytest.fixture(scope="module")
def subset_root() -> Path:
    """Folder holding the real CIFAR-10 subset (``$PQD_DATA_DIR`` or the shared copy)."""
    root = Path(os.environ.get("PQD_DATA_DIR") or SUBSET_DEFAULT)
    folder = root / "cifar-10-batches-py"
    missing = [f for f in CIFAR10_FILES if not (folder / f).is_file()]
    if missing:
        pytest.fail(
            f"the CIFAR-10 subset is missing: no {folder / missing[0]}; set PQD_DATA_DIR "
            f"to a folder holding cifar-10-batches-py/ (shared copy: {SUBSET_DEFAULT})"
        )
    return root


@pytest.fixture(scope="module")
def subset(subset_root: Path) -> Dataset:
    return load_dataset("cifar10", subset_root, val_size=500, seed=0, download=False)


def _pickle(obj: object, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=2))


def write_cifar10(root: Path, n: int = 20, seed: int = 0) -> Path:
    """A tiny synthetic CIFAR-10 in the official layout (n images per file)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    for f in CIFAR10_FILES[:-1]:
        _pickle(
            {
                b"batch_label": f.encode(),
                b"labels": [int(v) for v in np.arange(n) % 10],
                b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            },
            folder / f,
        )
    _pickle(
        {b"label_names": [f"c{i}".encode() for i in range(10)], b"num_vis": 3072},
        folder / "batches.meta",
    )
    return folder


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def make_tar(path: Path, files: dict[str, Path | bytes], level: int = 1) -> Path:
    with tarfile.open(path, "w:gz", compresslevel=level) as tar:
        for name, src in files.items():
            if isinstance(src, Path):
                tar.add(src, arcname=name)
            else:
                info = tarfile.TarInfo(name)
                info.size = len(src)
                tar.addfile(info, io.BytesIO(src))
    return path


class Evil:
    """Pickles to a call of ``os.system`` creating a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class EvilEval:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


# --------------------------------------------------------------------------- the real subset


def test_subset_loads(subset: Dataset, subset_root: Path) -> None:
    d = subset
    assert d.name == "cifar10" and d.num_classes == 10 and len(d.classes) == 10
    assert d.classes[3] == "cat"
    assert d.train_x.shape[0] + d.val_x.shape[0] == 5170
    assert (d.train_x.shape[0], d.val_x.shape[0], d.test_x.shape[0]) == (4670, 500, 1017)
    for x, y in ((d.train_x, d.train_y), (d.val_x, d.val_y), (d.test_x, d.test_y)):
        assert x.dtype == torch.uint8 and x.shape[1:] == (3, 32, 32)
        assert y.dtype == torch.int64 and y.shape == (x.shape[0],)
        assert int(y.min()) >= 0 and int(y.max()) <= 9
    assert int(d.test_y[0]) == 3  # the official test set starts with a cat
    assert d.mean == CIFAR10_MEAN and d.std == CIFAR10_STD
    assert d.root == subset_root / "cifar-10-batches-py"
    summary = d.summary()
    note = summary.pop("subset_note")
    assert summary == {
        "name": "cifar10",
        "train": 4670,
        "val": 500,
        "test": 1017,
        "num_classes": 10,
        "classes": d.classes,
        "image_size": [32, 32],
        "root": str(subset_root / "cifar-10-batches-py"),
    }
    assert "1017 of the official 10000" in note and "NOT comparable" in note
    # pixels match the pickle, row-major RGB planes
    raw = pickle.loads(
        (subset_root / "cifar-10-batches-py" / "test_batch").read_bytes(), encoding="bytes"
    )
    assert torch.equal(d.test_x[0], torch.from_numpy(raw[b"data"][0].reshape(3, 32, 32)))
    assert d.test_y.tolist() == list(raw[b"labels"])


def test_subset_split_stratified_and_deterministic(subset_root: Path) -> None:
    full = load_dataset("cifar10", subset_root, val_size=0, download=False)
    assert full.train_x.shape[0] == 5170
    assert full.val_x.shape == (0, 3, 32, 32) and full.val_y.shape == (0,)
    counts = torch.bincount(full.train_y, minlength=10)

    a = load_dataset("cifar10", subset_root, val_size=0.1, seed=0, download=False)
    assert a.val_x.shape[0] == 517 and a.train_x.shape[0] == 5170 - 517
    val_counts = torch.bincount(a.val_y, minlength=10)
    assert (val_counts > 0).all()  # every class present
    assert ((val_counts.double() - counts.double() * 517 / 5170).abs() < 1).all()
    assert torch.equal(val_counts + torch.bincount(a.train_y, minlength=10), counts)

    b = load_dataset("cifar10", subset_root, val_size=0.1, seed=0, download=False)
    c = load_dataset("cifar10", subset_root, val_size=0.1, seed=1, download=False)
    assert torch.equal(a.val_x, b.val_x) and torch.equal(a.train_y, b.train_y)
    assert not torch.equal(a.val_x, c.val_x)

    tr, va = stratified_split(full.train_y, 0.1, seed=0)
    assert torch.equal(torch.sort(torch.cat([tr, va])).values, torch.arange(5170))
    assert torch.equal(full.train_x[va], a.val_x) and torch.equal(full.train_x[tr], a.train_x)


def test_limits(subset_root: Path, subset: Dataset) -> None:
    d = load_dataset(
        "cifar10", subset_root, val_size=30, download=False, limit_train=300, limit_test=100
    )
    assert (d.train_x.shape[0], d.val_x.shape[0], d.test_x.shape[0]) == (270, 30, 100)
    assert torch.equal(d.test_x, subset.test_x[:100])
    with pytest.raises(DataError, match="limit_train"):
        load_dataset("cifar10", subset_root, download=False, limit_train=0)


@pytest.mark.parametrize("val_size", [5170, 6000, -1, 1.0, 1.5, -0.2, True, "10"])
def test_impossible_val_size(subset_root: Path, val_size: object) -> None:
    with pytest.raises(DataError, match="val_size"):
        load_dataset(
            "cifar10",
            subset_root,
            val_size=val_size,
            download=False,  # type: ignore
            limit_train=None,
        )


def test_unknown_name() -> None:
    with pytest.raises(DataError, match="cifar10, cifar100, svhn, npz"):
        load_dataset("imagenet", "/nonexistent")


# --------------------------------------------------------------------------- unsafe / corrupt


@pytest.mark.parametrize("evil", [Evil, EvilEval])
def test_hostile_pickle_refused(tmp_path: Path, evil: type) -> None:
    folder = write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    (folder / "data_batch_1").write_bytes(pickle.dumps(evil(marker), protocol=2))
    with pytest.raises(DataError) as ei:
        load_dataset("cifar10", tmp_path, download=False)
    msg = str(ei.value)
    assert "refusing to load" in msg and str(folder / "data_batch_1") in msg
    assert "posix.system" in msg or "nt.system" in msg or "builtins.eval" in msg
    assert "\n" not in msg
    assert not marker.exists()


def test_numpy1_pickle_names(tmp_path: Path, subset_root: Path, subset: Dataset) -> None:
    """Pickles written by numpy < 2 (as the official files are) name numpy.core.multiarray."""
    folder = tmp_path / "cifar-10-batches-py"
    shutil.copytree(subset_root / "cifar-10-batches-py", folder)
    raw = (folder / "test_batch").read_bytes()
    assert b"numpy._core.multiarray" in raw
    (folder / "test_batch").chmod(0o644)
    (folder / "test_batch").write_bytes(
        raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    )
    d = load_dataset("cifar10", tmp_path, val_size=0, download=False, limit_train=10)
    assert torch.equal(d.test_x, subset.test_x) and torch.equal(d.test_y, subset.test_y)


def test_truncated_and_wrong_pickles(tmp_path: Path) -> None:
    folder = write_cifar10(tmp_path)
    good = (folder / "test_batch").read_bytes()
    (folder / "test_batch").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="test_batch is corrupt or truncated") as ei:
        load_dataset("cifar10", tmp_path, download=False)
    assert str(folder / "test_batch") in str(ei.value) and "\n" not in str(ei.value)

    _pickle({b"pixels": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}, folder / "test_batch")
    with pytest.raises(DataError, match="lacks the keys"):
        load_dataset("cifar10", tmp_path, download=False)
    _pickle({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, folder / "test_batch")
    with pytest.raises(DataError, match=r"expected uint8 \[N, 3072\]"):
        load_dataset("cifar10", tmp_path, download=False)
    _pickle({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 11]}, folder / "test_batch")
    with pytest.raises(DataError, match="labels outside"):
        load_dataset("cifar10", tmp_path, download=False)


def test_missing_without_download(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(DataError) as ei:
        load_dataset("cifar10", root, download=False)
    msg = str(ei.value)
    assert "\n" not in msg
    assert str(root / "cifar-10-batches-py" / "data_batch_1") in msg
    assert "PQD_DATA_DIR" in msg and "--data-dir" in msg
    assert "--download" in msg  # says how to ask for a download
    assert not root.exists()


# --------------------------------------------------------------------------- downloads


def test_download_end_to_end(
    tmp_path: Path, subset_root: Path, subset: Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = subset_root / "cifar-10-batches-py"
    archive = make_tar(
        tmp_path / "cifar-10-python.tar.gz",
        {f"cifar-10-batches-py/{f}": src / f for f in CIFAR10_FILES},
    )
    monkeypatch.setattr(data.download, "CIFAR10_URL", archive.as_uri())
    monkeypatch.setattr(data.download, "CIFAR10_MD5", md5_of(archive))
    root = tmp_path / "data"
    d = load_dataset("cifar10", root, val_size=500, seed=0, download=True)
    assert torch.equal(d.test_x, subset.test_x) and torch.equal(d.val_y, subset.val_y)
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py"]  # archive removed


def test_download_wrong_md5(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = write_cifar10(tmp_path / "src", n=4)
    archive = make_tar(
        tmp_path / "cifar-10-python.tar.gz",
        {f"cifar-10-batches-py/{f}": folder / f for f in CIFAR10_FILES},
    )
    actual = md5_of(archive)
    monkeypatch.setattr(data.download, "CIFAR10_URL", archive.as_uri())
    monkeypatch.setattr(data.download, "CIFAR10_MD5", "0" * 32)
    root = tmp_path / "data"
    with pytest.raises(DataError) as ei:
        load_dataset("cifar10", root, download=True)
    msg = str(ei.value)
    assert "cifar-10-python.tar.gz" in msg and actual in msg and "0" * 32 in msg
    assert "\n" not in msg
    assert not root.exists()  # nothing extracted, no partial file or folder left

    dest = tmp_path / "copy.tar.gz"
    with pytest.raises(DataError, match="md5"):
        download_and_verify(archive.as_uri(), dest, "1" * 32)
    assert not dest.exists()
    assert download_and_verify(archive.as_uri(), dest, actual) == dest
    assert md5_of(dest) == actual


def test_download_network_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data.download, "CIFAR10_URL", (tmp_path / "absent.tar.gz").as_uri())
    root = tmp_path / "data"
    with pytest.raises(DataError) as ei:
        load_dataset("cifar10", root, download=True)
    msg = str(ei.value)
    assert "\n" not in msg and str(root) in msg and "download" in msg and "failed" in msg
    assert "PQD_DATA_DIR" in msg and "cifar-10-batches-py/" in msg


def test_tar_traversal_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dest = tmp_path / "root"
    for bad in ("../evil.txt", "/tmp/pqd-evil-abs.txt", "cifar-10-batches-py/../../evil.txt"):
        archive = make_tar(
            tmp_path / "bad.tar.gz", {"cifar-10-batches-py/ok.txt": b"fine", bad: b"evil"}
        )
        with pytest.raises(DataError, match="unsafe member path"):
            safe_extract(archive, dest)
        assert not (tmp_path / "evil.txt").exists() and not (dest / "cifar-10-batches-py").exists()

    link = tmp_path / "link.tar.gz"
    with tarfile.open(link, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(DataError, match="link"):
        safe_extract(link, dest)

    # through load_dataset: a correct md5 does not make a hostile archive acceptable
    archive = make_tar(tmp_path / "bad.tar.gz", {"../evil.txt": b"evil"})
    monkeypatch.setattr(data.download, "CIFAR10_URL", archive.as_uri())
    monkeypatch.setattr(data.download, "CIFAR10_MD5", md5_of(archive))
    with pytest.raises(DataError, match="unsafe member path"):
        load_dataset("cifar10", dest, download=True)
    assert not (tmp_path / "evil.txt").exists()
    assert not (dest / "bad.tar.gz").exists()


# --------------------------------------------------------------------------- other formats


def test_cifar100(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-100-python"
    for split, n in (("train", 300), ("test", 50)):
        _pickle(
            {
                b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                b"fine_labels": [i % 100 for i in range(n)],
                b"coarse_labels": [i % 20 for i in range(n)],
            },
            folder / split,
        )
    _pickle(
        {
            b"fine_label_names": [f"f{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"c{i}".encode() for i in range(20)],
        },
        folder / "meta",
    )
    d = load_dataset("cifar100", tmp_path, val_size=100, download=False)
    assert d.num_classes == 100 and d.classes[7] == "f7"
    assert (d.train_x.shape[0], d.val_x.shape[0], d.test_x.shape[0]) == (200, 100, 50)
    assert torch.bincount(d.val_y, minlength=100).tolist() == [1] * 100
    assert d.test_y.tolist() == [i % 100 for i in range(50)]
    assert d.mean == CIFAR100_MEAN


def test_svhn(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name, n in (("train_32x32.mat", 40), ("test_32x32.mat", 12)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = (np.arange(n) % 10 + 1).reshape(n, 1).astype(np.uint8)  # labels 1..10
        scipy.io.savemat(tmp_path / name, {"X": x, "y": y})
    d = load_dataset("svhn", tmp_path, val_size=0, download=False)
    assert d.num_classes == 10 and d.classes[0] == "0"
    assert d.train_x.shape == (40, 3, 32, 32) and d.test_x.shape == (12, 3, 32, 32)
    assert d.test_y.tolist() == [(i + 1) % 10 for i in range(12)]  # 10 -> 0
    x = scipy.io.loadmat(tmp_path / "test_32x32.mat")["X"]
    assert torch.equal(d.test_x[5], torch.from_numpy(x[:, :, :, 5].transpose(2, 0, 1).copy()))
    with pytest.raises(DataError, match=r"test_32x32\.mat"):
        load_dataset("svhn", tmp_path / "missing", download=False)


@pytest.mark.parametrize("layout", ["nhwc-file", "nchw-folder"])
def test_npz(tmp_path: Path, layout: str) -> None:
    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 256, (60, 3, 16, 16), dtype=np.uint8)
    x_test = rng.integers(0, 256, (10, 3, 16, 16), dtype=np.uint8)
    y_train, y_test = np.arange(60) % 3, np.arange(10) % 3
    if layout == "nhwc-file":
        path = tmp_path / "mine.npz"
        np.savez(
            path,
            x_train=x_train.transpose(0, 2, 3, 1),
            y_train=y_train,
            x_test=x_test.transpose(0, 2, 3, 1),
            y_test=y_test,
            classes=np.array(["a", "b", "c"]),
        )
        root = path
    else:
        np.savez(
            tmp_path / "data.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test
        )
        root = tmp_path
    d = load_dataset("npz", root, val_size=0.2, download=False)
    assert d.num_classes == 3
    assert d.classes == (["a", "b", "c"] if layout == "nhwc-file" else ["0", "1", "2"])
    assert (d.train_x.shape, d.val_x.shape[0]) == ((48, 3, 16, 16), 12)
    assert torch.equal(d.test_x, torch.from_numpy(x_test))
    expect = d.train_x.double().div(255).mean(dim=(0, 2, 3))
    assert np.allclose(d.mean, expect.numpy(), atol=1e-5)
    assert d.root == tmp_path

    np.savez(
        tmp_path / "bad.npz",
        x_train=x_train.astype(np.float32),
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
    )
    with pytest.raises(DataError, match="expected uint8"):
        load_dataset("npz", tmp_path / "bad.npz")
    with pytest.raises(DataError, match="no npz data set"):
        load_dataset("npz", tmp_path / "absent")


def test_resolve_data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PQD_DATA_DIR", raising=False)
    assert resolve_data_root(None, None) == tmp_path / "data"
    assert resolve_data_root(None, "rec") == tmp_path / "rec"
    monkeypatch.setenv("PQD_DATA_DIR", "~/envdir")
    assert resolve_data_root(None, None) == Path.home() / "envdir"
    assert resolve_data_root("cli", "rec") == tmp_path / "cli"
    assert resolve_data_root("cli", None).is_absolute()


def test_data_root_precedence_flag_recipe_env_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One order for every data set: --data-dir, data.root (command line or recipe), then
    PQD_DATA_DIR, then ./data; the recipe's own folder is not overridden by the variable."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PQD_DATA_DIR", str(tmp_path / "env"))
    got = data.data_root("cli", "rec", "override")
    assert (got.path, got.source) == (tmp_path / "cli", "flag")
    got = data.data_root(None, "rec", "override")
    assert (got.path, got.source) == (tmp_path / "rec", "override")
    got = data.data_root(None, "rec")
    assert (got.path, got.source) == (tmp_path / "rec", "recipe")  # before: env won
    got = data.data_root(None, "  ")
    assert (got.path, got.source) == (tmp_path / "env", "env")
    monkeypatch.delenv("PQD_DATA_DIR")
    got = data.data_root(None, None)
    assert (got.path, got.source) == (tmp_path / "data", "default")
    # only pqd's default folder is downloaded into unless a download is asked for
    assert got.download(None) and not data.data_root(None, "rec").download(None)
    assert data.data_root(None, "rec").download(True) and not got.download(False)


@pytest.mark.parametrize(
    ("source", "said", "not_the_same_again"),
    [
        ("flag", "given with --data-dir", "check the path after --data-dir"),
        ("override", "given as data.root= on the command line", "check the path after data.root="),
        ("recipe", "the recipe's data.root", "set data.root in the recipe"),
        ("env", "is the one in PQD_DATA_DIR", "point PQD_DATA_DIR at"),
        ("default", "pqd's default ./data", "name a folder holding"),
    ],
)
def test_missing_files_error_names_where_the_folder_came_from(
    tmp_path: Path, source: str, said: str, not_the_same_again: str
) -> None:
    root = data.DataRoot(tmp_path / "nowhere", source)
    with pytest.raises(DataRootError) as ei:
        load_dataset("cifar10", root.path)  # download is off unless asked for
    line = root.explain(ei.value).line()
    assert said in line and not_the_same_again in line and "cifar-10-batches-py/" in line
    assert "--download" in line and "data.download: true" in line  # how to ask for one
    assert not root.path.exists()


# --------------------------------------------------------------------------- loader


def _images(n: int = 50, h: int = 8, w: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)


def test_loader_shapes_and_plain_batches() -> None:
    x, y = _images(50), torch.arange(50)
    loader = Loader(x, y, 16)
    assert len(loader) == 4 and loader.num_samples == 50
    batches = list(loader)
    assert [b[0].shape[0] for b in batches] == [16, 16, 16, 2]
    xb = torch.cat([b[0] for b in batches])
    assert xb.dtype == torch.float32 and torch.equal(xb, x.float() / 255)
    assert torch.equal(torch.cat([b[1] for b in batches]), y)
    assert len(Loader(x, y, 16, drop_last=True)) == 3
    assert sum(1 for _ in Loader(x, y, 16, drop_last=True)) == 3

    # augment with no padding and no flip is the identity
    aug = Loader(x, y, 16, shuffle=True, augment=True, crop_padding=0, flip=False, seed=3)
    for xb, yb in aug:
        assert torch.equal(xb, x[yb].float() / 255)


def test_loader_shuffle_covers_epoch_and_is_deterministic() -> None:
    x, y = _images(103), torch.arange(103)
    a = Loader(x, y, 10, shuffle=True, augment=True, seed=7)
    b = Loader(x, y, 10, shuffle=True, augment=True, seed=7)
    c = Loader(x, y, 10, shuffle=True, augment=True, seed=8)
    epochs_a = [[(xb.clone(), yb.clone()) for xb, yb in a] for _ in range(2)]
    epochs_b = [[(xb, yb) for xb, yb in b] for _ in range(2)]
    for ea, eb in zip(epochs_a, epochs_b, strict=True):
        assert len(ea) == len(a) == 11
        for (xa, ya), (xb, yb) in zip(ea, eb, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
        seen = torch.cat([yb for _, yb in ea])
        assert torch.equal(torch.sort(seen).values, torch.arange(103))  # each once
    assert not torch.equal(
        torch.cat([yb for _, yb in epochs_a[0]]), torch.cat([yb for _, yb in epochs_a[1]])
    )  # advances per epoch
    assert not torch.equal(torch.cat([yb for _, yb in epochs_a[0]]), torch.cat([yb for _, yb in c]))


@pytest.mark.parametrize("pad_mode", ["reflect", "zeros"])
def test_loader_crop_and_flip(pad_mode: str) -> None:
    x, y = _images(64, 10, 12), torch.arange(64)
    p = 3
    loader = Loader(x, y, 64, shuffle=True, augment=True, crop_padding=p, pad_mode=pad_mode, seed=1)
    xb, yb = next(iter(loader))
    assert xb.shape == (64, 3, 10, 12) and xb.dtype == torch.float32
    assert float(xb.min()) >= 0.0 and float(xb.max()) <= 1.0
    src = x[yb].float() / 255
    padded = F.pad(src, (p, p, p, p), mode="reflect" if pad_mode == "reflect" else "constant")
    # all (2p+1)^2 windows of each padded image: [B, C, nh, nw, H, W]
    windows = padded.unfold(2, 10, 1).unfold(3, 12, 1)
    flipped_count, offsets = 0, set()
    for k in range(64):
        plain = (windows[k] == xb[k][:, None, None]).all(dim=(0, 3, 4))
        mirror = (windows[k] == xb[k].flip(-1)[:, None, None]).all(dim=(0, 3, 4))
        assert bool(plain.any() or mirror.any()), f"image {k} is not a crop of its source"
        hit = plain if plain.any() else mirror
        offsets.add(tuple(hit.nonzero()[0].tolist()))
        flipped_count += int(not plain.any())
    assert 5 < flipped_count < 59  # flips happen about half the time
    assert len(offsets) > 10  # crops vary


def test_loader_flip_only_and_channels_last() -> None:
    x, y = _images(32), torch.arange(32)
    loader = Loader(x, y, 32, augment=True, crop_padding=0, flip=True, channels_last=True)
    xb, _ = next(iter(loader))
    assert xb.is_contiguous(memory_format=torch.channels_last)
    src = x.float() / 255
    same = (xb == src).flatten(1).all(1)
    mirrored = (xb == src.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and 0 < int(mirrored.sum()) < 32


def test_loader_cutout_fills_one_square_per_image_with_the_batch_mean() -> None:
    x, y = _images(48, 12, 12), torch.arange(48)
    plain = Loader(x, y, 48, shuffle=True, augment=True, crop_padding=2, seed=4)
    cut = Loader(x, y, 48, shuffle=True, augment=True, crop_padding=2, seed=4, cutout=5)
    (a, ya), (b, yb) = next(iter(plain)), next(iter(cut))
    assert torch.equal(ya, yb)  # cutout draws after the crop and flip: the same crops
    changed = (a != b).any(dim=1)  # [B, H, W] pixels cutout touched
    fill = a.mean(dim=(0, 2, 3))
    sides = []
    for k in range(48):
        rows = changed[k].any(dim=1).nonzero().flatten()
        cols = changed[k].any(dim=0).nonzero().flatten()
        if rows.numel() == 0:
            continue  # the square fell on pixels that already had the fill colour
        # one square (cut off at the border): the changed pixels fill their bounding box
        box = changed[k, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        box_b = b[k, :, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert bool(box.all()) and torch.allclose(box_b, fill[:, None, None].expand_as(box_b))
        sides.append(max(rows.numel(), cols.numel()))
    assert max(sides) == 5 and min(sides) < 5  # whole squares, and some cut at a border
    assert len(sides) > 40


def test_loader_without_cutout_draws_what_it_always_drew() -> None:
    """Two epochs of a seeded loader without cutout equal what the loader drew before cutout
    existed (label order and pixel checksums recorded then): runs keep their batches."""
    x, y = _images(20), torch.arange(20)
    loader = Loader(x, y, 10, shuffle=True, augment=True, seed=2)
    batches = [b for _ in range(2) for b in loader]
    xs, ys = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert ys.tolist()[:20] == [
        8,
        1,
        19,
        0,
        10,
        14,
        12,
        4,
        16,
        15,
        7,
        6,
        2,
        17,
        13,
        18,
        11,
        3,
        9,
        5,
    ]
    assert ys.tolist()[20:] == [
        4,
        5,
        12,
        14,
        0,
        8,
        3,
        1,
        10,
        13,
        18,
        16,
        6,
        2,
        7,
        11,
        17,
        9,
        19,
        15,
    ]
    assert float(xs.sum()) == pytest.approx(3752.5728, abs=1e-3)
    weighted = (xs * torch.arange(xs.numel()).view_as(xs) % 7).sum()
    assert float(weighted) == pytest.approx(26764.34, abs=0.05)  # where each pixel went
    evaluated = Loader(x, y, 10, augment=False, cutout=4)  # cutout is augmentation only
    assert torch.equal(next(iter(evaluated))[0], x[:10].float() / 255)


def test_loader_leaves_global_rng_alone() -> None:
    x, y = _images(40), torch.arange(40)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    for _ in Loader(x, y, 8, shuffle=True, augment=True, seed=5):
        pass
    assert torch.equal(state, torch.get_rng_state())


def test_loader_rejects_bad_input() -> None:
    x, y = _images(4), torch.arange(4)
    with pytest.raises(ValueError):
        Loader(x.float(), y, 2)
    with pytest.raises(DataError, match="crop_padding 8 is too large for 8x8"):
        Loader(x, y, 2, augment=True, crop_padding=8)  # reflect padding >= image size
    Loader(x, y, 2, augment=True, crop_padding=8, pad_mode="zeros")
    with pytest.raises(DataError, match="cutout 9 does not fit 8x8"):
        Loader(x, y, 2, augment=True, cutout=9)
    with pytest.raises(ValueError):
        Loader(x, y, 2, pad_mode="edge")


def test_no_leftover_files(tmp_path: Path) -> None:
    """download_and_verify leaves no temporary files behind on a failed download."""
    dest = tmp_path / "out" / "f.bin"
    with pytest.raises(DataError, match="failed"):
        download_and_verify((tmp_path / "nope").as_uri(), dest, "0" * 32)
    assert list((tmp_path / "out").iterdir()) == []


def test_a_failed_download_leaves_no_folders_it_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(data.download, "CIFAR10_URL", (tmp_path / "absent.tar.gz").as_uri())
    (tmp_path / "kept").mkdir()
    root = tmp_path / "kept" / "new" / "deeper"
    with pytest.raises(DataError, match="failed"):
        load_dataset("cifar10", root, download=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]
    assert list((tmp_path / "kept").iterdir()) == []


def test_no_download_into_a_folder_holding_other_things(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = write_cifar10(tmp_path / "src", n=4)
    archive = make_tar(
        tmp_path / "cifar-10-python.tar.gz",
        {f"cifar-10-batches-py/{f}": folder / f for f in CIFAR10_FILES},
    )
    monkeypatch.setattr(data.download, "CIFAR10_URL", archive.as_uri())
    monkeypatch.setattr(data.download, "CIFAR10_MD5", md5_of(archive))
    photos = tmp_path / "photos"  # a wrong --data-dir: the user's image folder
    photos.mkdir()
    (photos / "cat.jpg").write_bytes(b"\xff\xd8 not really")
    (photos / "dog.jpg").write_bytes(b"\xff\xd8 not really")
    with pytest.raises(DataError) as ei:
        load_dataset("cifar10", photos, val_size=0, download=True)
    msg = ei.value.line()
    assert "\n" not in msg and "'cat.jpg' and 1 more" in msg
    assert archive.as_uri() in msg and "163 MB" in msg and str(photos) in msg
    assert str(photos / ".pqd-download") in msg
    assert sorted(p.name for p in photos.iterdir()) == ["cat.jpg", "dog.jpg"]  # untouched

    (photos / ".pqd-download").touch()  # the user allows it
    assert load_dataset("cifar10", photos, val_size=0, download=True).train_x.shape[0] > 0

    # empty, missing and pqd-made folders (holding only data sets pqd fetches) need no marker
    for root in (tmp_path / "empty", tmp_path / "missing", tmp_path / "shared"):
        if root.name == "empty":
            root.mkdir()
        if root.name == "shared":
            (root / "cifar-100-python").mkdir(parents=True)
            (root / ".DS_Store").touch()
        assert load_dataset("cifar10", root, val_size=0, download=True).test_x.shape[0] > 0


def test_check_data_reads_nothing_big_and_downloads_nothing(
    tmp_path: Path, subset_root: Path
) -> None:
    classes, text = check_data("cifar10", subset_root, download=False)
    assert classes == 10 and "present and readable" in text
    with pytest.raises(DataError, match=r"data folder .* does not exist"):
        check_data("cifar10", tmp_path / "typo", download=True)
    assert not (tmp_path / "typo").exists()
    classes, text = check_data("cifar10", tmp_path / "data", download=True, explicit=False)
    assert "will download it (about 163 MB)" in text and not (tmp_path / "data").exists()
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").touch()
    with pytest.raises(DataError, match="not downloading cifar10"):
        check_data("cifar10", tmp_path / "pics", download=True)
    bad = tmp_path / "bad" / "cifar-10-batches-py"
    shutil.copytree(subset_root / "cifar-10-batches-py", bad)
    (bad / "batches.meta").write_bytes(b"junk")
    with pytest.raises(DataError, match=r"batches\.meta"):
        check_data("cifar10", bad.parent, download=False)


def test_run_seed_does_not_move_the_splits(subset_root: Path, tmp_path: Path) -> None:
    """Runs of seeds 0 and 1 that share a baseline (a multi-seed search) see the baseline's
    val split, and a folder's carved test split: otherwise seed 1 validates and tests on
    images the baseline trained on. ``data.split_seed`` alone moves them."""
    from pqd.pipeline import recipe_data
    from pqd.recipe import Recipe

    def data_of(seed: int, split_seed: int, dataset: str, root: Path) -> Dataset:
        recipe = Recipe.model_validate(
            {
                "name": "split",
                "seed": seed,
                "model": {"name": "tiny_cnn"},
                "data": {
                    "dataset": dataset,
                    "root": str(root),
                    "val_size": 0.1,
                    "split_seed": split_seed,
                    "download": False,
                },
                "stages": [],
            }
        )
        return recipe_data(recipe, str(root))  # the folder given, not $PQD_DATA_DIR

    a, b, c = (data_of(s, ss, "cifar10", subset_root) for s, ss in ((0, 0), (1, 0), (0, 1)))
    assert torch.equal(a.val_x, b.val_x) and torch.equal(a.train_y, b.train_y)
    assert not torch.equal(a.val_x, c.val_x)

    images = (torch.arange(60 * 3 * 8 * 8) % 251).to(torch.uint8).reshape(60, 3, 8, 8)
    labels = torch.arange(60) % 3
    write_image_folder(tmp_path / "train", images, labels, ["a", "b", "c"])
    f0, f1, f2 = (data_of(s, ss, "folder", tmp_path) for s, ss in ((0, 0), (1, 0), (0, 1)))
    assert torch.equal(f0.test_x, f1.test_x) and torch.equal(f0.val_x, f1.val_x)
    assert not torch.equal(f0.test_x, f2.test_x)
