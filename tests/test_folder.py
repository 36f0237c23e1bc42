"""Image folders (pqd.folder / pqd.data.from_folder, recipe data.dataset: folder): decoding,
the memory-mapped cache, bad files, splits, any resolution, and whole runs on real images."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from PIL import Image

import pqd
from helpers import load_benchmark, write_image_folder
from pqd import folder as pf
from pqd.cli import main
from pqd.data import Dataset, Loader, load_dataset
from pqd.data.tensors import resize_images
from pqd.errors import DataError

CLASSES = 3  # airplane, automobile, bird: sorted already, so folder ids == CIFAR ids


def _subset(subset_dir: Path, n_train: int, n_test: int) -> Dataset:
    """The first images of the first CLASSES classes of the real subset (no val split)."""
    d = load_dataset("cifar10", subset_dir, val_size=0, download=False)
    keep = d.train_y < CLASSES
    tx, ty = d.train_x[keep][:n_train], d.train_y[keep][:n_train]
    keep = d.test_y < CLASSES
    sx, sy = d.test_x[keep][:n_test], d.test_y[keep][:n_test]
    d.train_x, d.train_y, d.test_x, d.test_y = tx, ty, sx, sy
    d.val_x, d.val_y = tx[:0], ty[:0]
    d.classes = d.classes[:CLASSES]
    return d


def _one_line(exc: pytest.ExceptionInfo[DataError]) -> str:
    line = exc.value.line()
    assert "\n" not in line and "; fix: " in line
    return line


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory, subset_dir: Path) -> Path:
    """Real subset images at 64x64: train/ as JPEG and PNG in turn (one of them grayscale,
    one a corrupt JPEG), test/ as PNG; val/ is carved."""
    root = tmp_path_factory.mktemp("photos")
    d = _subset(subset_dir, 150, 45)
    paths = write_image_folder(
        root / "train", d.train_x, d.train_y, d.classes, size=64, formats=("jpg", "png")
    )
    write_image_folder(root / "test", d.test_x, d.test_y, d.classes, size=64)
    Image.open(paths[1]).convert("L").save(paths[1])  # a grayscale PNG
    bad = root / "train" / d.classes[0] / "zz_corrupt.jpg"
    bad.write_bytes(paths[0].read_bytes()[:300])  # a truncated JPEG
    return root


# --------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "I;16"])
def test_every_mode_becomes_rgb(tmp_path: Path, mode: str) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    img = Image.fromarray(rgb)
    if mode == "I;16":
        gray = np.asarray(img.convert("L"), dtype=np.uint16) * 257  # 16-bit: 0..65535
        img = Image.fromarray(gray.astype("<u2"))
        assert img.mode == "I;16"
        expect = np.repeat((gray >> 8).astype(np.uint8)[None], 3, 0)
    else:
        img = img.convert(mode)
        expect = np.asarray(img.convert("RGB")).transpose(2, 0, 1)
    path = tmp_path / "x.png"
    img.save(path)
    out = pf.decode_image(path, 20)
    assert out.dtype == np.uint8 and out.shape == (3, 20, 20)
    assert np.array_equal(out, expect)
    if mode in ("L", "I;16"):
        assert np.array_equal(out[0], out[1]) and np.array_equal(out[1], out[2])


@pytest.mark.parametrize("fmt", ["bmp", "webp", "png", "jpg"])
def test_formats_decode_to_the_pixels_written(tmp_path: Path, fmt: str) -> None:
    rgb = np.zeros((16, 16, 3), dtype=np.uint8)
    rgb[:, :8] = (200, 30, 30)
    rgb[:, 8:] = (20, 40, 220)
    path = tmp_path / f"x.{fmt}"
    Image.fromarray(rgb).save(path, **({"lossless": True} if fmt == "webp" else {}))
    out = pf.decode_image(path, 16).transpose(1, 2, 0).astype(int)
    tol = 12 if fmt == "jpg" else 0
    assert np.abs(out[:, 1:7] - rgb[:, 1:7]).max() <= tol
    assert np.abs(out[:, 9:15] - rgb[:, 9:15]).max() <= tol


def test_short_side_resize_then_center_crop(tmp_path: Path) -> None:
    # 40 rows x 120 cols: thirds red | green | blue; short side 40 -> 20, width 60 -> crop 20
    rgb = np.zeros((40, 120, 3), dtype=np.uint8)
    rgb[:, :40, 0] = rgb[:, 40:80, 1] = rgb[:, 80:, 2] = 255
    path = tmp_path / "wide.png"
    Image.fromarray(rgb).save(path)
    out = pf.decode_image(path, 20)
    assert out.shape == (3, 20, 20)
    assert (out[1, :, 2:18] == 255).all() and (out[0, :, 2:18] == 0).all()  # only green kept
    # the tensor readers do the same: short side, then center crop
    t = resize_images(torch.from_numpy(rgb.transpose(2, 0, 1).copy())[None], 20)
    assert t.shape == (1, 3, 20, 20) and (t[0, 1, :, 2:18] == 255).all()


# --------------------------------------------------------------------------- folders


def test_bad_file_is_one_line_or_skipped_and_counted(photos: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError) as exc:
        pf.from_folder(photos, cache_dir=tmp_path / "c")
    line = _one_line(exc)
    assert "1 of 151 image files" in line and "train/airplane/zz_corrupt.jpg" in line
    assert "on_bad_image: skip" in line
    d = pf.from_folder(photos, cache_dir=tmp_path / "c", on_bad_image="skip")
    s = d.summary()
    assert s["skipped_images"] == 1 and "train/airplane/zz_corrupt.jpg" in s["skipped_files"][0]
    assert s["train"] + s["val"] == 150 and s["test"] == 45
    # the cached result still refuses the bad file without skip (no silent reuse)
    with pytest.raises(DataError, match=r"zz_corrupt\.jpg"):
        pf.from_folder(photos, cache_dir=tmp_path / "c")


def test_many_bad_files_name_the_first_few_and_the_count(tmp_path: Path) -> None:
    for c in ("a", "b"):
        for i in range(3):
            (tmp_path / "train" / c).mkdir(parents=True, exist_ok=True)
            (tmp_path / "train" / c / f"{i}.png").write_bytes(b"not a png")
    with pytest.raises(DataError) as exc:
        pf.from_folder(tmp_path, cache_dir=tmp_path / "c", image_size=16)
    line = _one_line(exc)
    assert "6 of 6 image files" in line and "and 3 more" in line and "train/a/0.png" in line


def test_empty_class_folder_is_one_line_or_skipped(tmp_path: Path, photos: Path) -> None:
    root = tmp_path / "r"
    for c in ("cat", "dog"):
        (root / "train" / c).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (i * 60, 0, 0)).save(root / "train" / c / f"{i}.png")
    (root / "train" / "emu").mkdir()
    (root / "train" / "emu" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError) as exc:
        pf.from_folder(root, image_size=8, val_size=0, test_size=2)
    line = _one_line(exc)
    assert "hold no images" in line and "train/emu/" in line
    d = pf.from_folder(root, image_size=8, val_size=0, test_size=2, on_bad_image="skip")
    assert d.classes == ["cat", "dog"] and d.summary()["skipped_empty_classes"] == ["emu"]


@pytest.mark.parametrize(
    ("layout", "needle"),
    [
        ({}, "does not exist"),
        ({"images/a/0.png": 1}, "has no train/ folder"),
        ({"train/a/0.png": 1}, "1 class folder(s) with images"),
        ({"train/a/0.png": 1, "train/b/0.png": 1, "val/c/0.png": 1}, "class folder 'c'"),
    ],
)
def test_wrong_layouts_are_one_line(tmp_path: Path, layout: dict, needle: str) -> None:
    root = tmp_path / "r"
    for rel in layout:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(root / rel)
    with pytest.raises(DataError) as exc:
        pf.from_folder(root, image_size=8)
    assert needle in _one_line(exc)


def test_cache_is_reused_memory_mapped_and_renewed_on_change(
    photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "c"
    d1 = pf.from_folder(photos, cache_dir=cache, on_bad_image="skip", image_size=48)
    files = sorted(cache.glob("*.u8"))
    assert {f.stat().st_size % (3 * 48 * 48) for f in files} == {0}
    calls: list[Path] = []
    real = pf.decode_image

    def counting(path: Path, size: int) -> np.ndarray:
        calls.append(Path(path))
        return real(path, size)

    monkeypatch.setattr(pf, "decode_image", counting)
    d2 = pf.from_folder(photos, cache_dir=cache, on_bad_image="skip", image_size=48)
    assert calls == []  # nothing decoded again
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(d1, f"{split}_x"), getattr(d2, f"{split}_x"))
        assert torch.equal(getattr(d1, f"{split}_y"), getattr(d2, f"{split}_y"))
    # a view of a cache file mapped into memory, not a copy
    ptr = d2.train_x.data_ptr()
    maps = Path("/proc/self/maps").read_text().splitlines()
    spans = [
        [int(v, 16) for v in line.split()[0].split("-")] for line in maps if str(cache) in line
    ]
    assert any(lo <= ptr < hi for lo, hi in spans)
    # a changed file (new size and mtime) is decoded again: its folder's listing changed
    some = sorted((photos / "test").rglob("*.png"))[0]
    stat = some.stat()
    Image.open(some).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(some, compress_level=0)
    try:
        d3 = pf.from_folder(photos, cache_dir=cache, on_bad_image="skip", image_size=48)
        assert len(calls) == 45  # only test/ again
        assert not torch.equal(d3.test_x, d2.test_x) and torch.equal(d3.train_x, d2.train_x)
    finally:
        Image.open(some).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(some)
        os.utime(some, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_cache_goes_to_the_user_cache_folder_never_the_data(
    photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(pf.CACHE_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    root = tmp_path / "r"
    (root / "train").mkdir(parents=True)
    for c in ("a", "b"):
        (root / "train" / c).symlink_to(sorted((photos / "test").iterdir())[0])
    d = pf.from_folder(root, image_size=16, val_size=2, test_size=2)
    assert d.summary()["cache"] == str(tmp_path / "xdg" / "pqd")
    assert list((tmp_path / "xdg" / "pqd").glob("*.u8"))
    assert sorted(p.name for p in root.iterdir()) == ["train"]  # nothing written in the data
    (tmp_path / "xdg").rename(tmp_path / "gone")
    (tmp_path / "xdg").write_text("a file where the cache folder would go")
    with pytest.raises(DataError, match="cannot be written") as e:
        pf.from_folder(root, image_size=16, val_size=2, test_size=2)
    assert pf.CACHE_DIR_ENV in e.value.fix


def test_cache_folder_order_env_then_xdg_then_home(
    photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PQD_CACHE_DIR, else $XDG_CACHE_HOME/pqd, else ~/.cache/pqd: never the data folder."""
    root = tmp_path / "r"
    (root / "train").mkdir(parents=True)
    for c in ("a", "b"):
        (root / "train" / c).symlink_to(sorted((photos / "test").iterdir())[0])
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv(pf.CACHE_DIR_ENV, str(tmp_path / "env"))
    cached = []
    for unset in (None, pf.CACHE_DIR_ENV, "XDG_CACHE_HOME"):
        if unset:
            monkeypatch.delenv(unset)
        d = pf.from_folder(root, image_size=16, val_size=2, test_size=2)
        cached.append(d.summary()["cache"])
    assert cached == [
        str(tmp_path / "env"),
        str(tmp_path / "xdg" / "pqd"),
        str(tmp_path / "home" / ".cache" / "pqd"),
    ]
    assert sorted(p.name for p in root.iterdir()) == ["train"]  # nothing written in the data


def test_carved_splits_are_stratified_disjoint_and_recorded(photos: Path, tmp_path: Path) -> None:
    d = pf.from_folder(photos, cache_dir=tmp_path / "c", on_bad_image="skip", val_size=30, seed=3)
    s = d.summary()
    assert (
        s["splits"]["val"].startswith("carved from train/: val_size 30")
        and "seed 3" in (s["splits"]["val"])
    )
    assert s["splits"]["test"] == "test/" and s["classes"] == ["airplane", "automobile", "bird"]
    total = torch.bincount(torch.cat([d.train_y, d.val_y]), minlength=3)
    quota = total.double() * 30 / total.sum()
    val = torch.bincount(d.val_y, minlength=3)
    assert val.sum() == 30 and ((val - quota).abs() < 1).all()  # each class its share
    rows = {bytes(x.numpy()) for x in d.train_x} | set()
    assert not rows & {bytes(x.numpy()) for x in d.val_x}  # no image in both
    assert len(d.train_y) == 120 and d.mean != (0.0, 0.0, 0.0)
    other = pf.from_folder(
        photos, cache_dir=tmp_path / "c", on_bad_image="skip", val_size=30, seed=4
    )
    assert not torch.equal(other.val_x, d.val_x)  # the seed draws the split


# --------------------------------------------------------------------------- any resolution


def test_image_size_resizes_the_official_readers(subset_dir: Path) -> None:
    d = load_dataset(
        "cifar10",
        subset_dir,
        val_size=10,
        limit_train=40,
        limit_test=8,
        download=False,
        image_size=48,
    )
    assert d.train_x.shape[1:] == (3, 48, 48) and d.test_x.shape == (8, 3, 48, 48)
    native = load_dataset(
        "cifar10", subset_dir, val_size=10, limit_train=40, limit_test=8, download=False
    )
    assert torch.equal(d.test_x, resize_images(native.test_x, 48))
    assert d.summary()["image_size"] == [48, 48]


def test_resized_crop_loader_is_seeded_zooms_in_and_flips() -> None:
    n, s = 64, 64
    ramp = torch.arange(s, dtype=torch.float32).mul(4).round().to(torch.uint8)  # 0..252
    x = ramp.view(1, 1, 1, s).expand(n, 3, s, s).contiguous()
    y = torch.zeros(n, dtype=torch.int64)
    a = Loader(x, y, 16, augment=True, crop="auto", seed=5)
    assert a.crop == "resized"
    b = Loader(x, y, 16, augment=True, crop="resized", seed=5)
    batches_a, batches_b = list(a), list(b)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(batches_a, batches_b, strict=True))
    out = torch.cat([p[0] for p in batches_a]) * 255
    assert out.shape == (n, 3, s, s)
    slope = (out[:, 0, 0, -1] - out[:, 0, 0, 0]) / (s - 1)  # per image, pixels per column
    assert (slope.abs() <= 4.0 + 1e-3).all() and (slope.abs() < 3.9).sum() > n // 2  # zoomed
    assert (slope > 0).any() and (slope < 0).any()  # some flipped
    assert torch.equal(out[:, 0], out[:, 1])  # rows within an image stay alike
    assert not torch.equal(torch.cat([p[0] for p in a]), torch.cat([p[0] for p in batches_a]))
    small = Loader(x[:, :, :32, :32].contiguous(), y, 16, augment=True, crop="auto")
    assert small.crop == "pad"


# --------------------------------------------------------------------------- whole runs


def _recipe(tmp_path: Path, root: Path, **data: object) -> Path:
    recipe = {
        "name": "folder64",
        "seed": 0,
        "model": {"name": "tiny_cnn"},
        "data": {"dataset": "folder", "root": str(root), "image_size": 64, "val_size": 30, **data},
        "train": {"batch_size": 32, "lr": 0.05},
        "baseline": {"epochs": 1},
        "stages": [{"stage": "quantize", "epochs": 1}],
        "measure": {"warmup": 1, "repeats": 5, "batch_sizes": [1]},
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _input_hw(path: Path) -> list[int]:
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    return [d.dim_value for d in dims[2:]]


@pytest.mark.integration
def test_pqd_run_on_an_image_folder(photos: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv(pf.CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv("PQD_DATA_DIR", raising=False)
    strict = _recipe(tmp_path, photos)
    assert main(["run", str(strict), "--out", str(tmp_path / "no"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pqd: error: ") and "zz_corrupt.jpg" in err[0]
    assert not (tmp_path / "no" / "record.json").exists()

    path = _recipe(tmp_path, photos, on_bad_image="skip")
    assert main(["validate", str(path)]) == 0
    assert "image folder" in capsys.readouterr().out
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out), "--no-progress"]) == 0
    record = json.loads((out / "record.json").read_text())
    data = record["data"]
    assert data["name"] == "folder" and data["image_size"] == [64, 64]
    assert data["classes"] == ["airplane", "automobile", "bird"] and data["skipped_images"] == 1
    assert (data["train"], data["val"], data["test"]) == (120, 30, 45)
    assert record["final"]["precision"] == "int8" and 0.0 <= record["final"]["accuracy"] <= 1.0
    assert record["final"]["macs"] > record["final"]["params"] * 64 * 64 / 16  # 64x64 MACs
    for name in ("baseline.onnx", "final.onnx"):
        assert _input_hw(out / name) == [64, 64]
        meta = {p.key: p.value for p in onnx.load(str(out / name)).metadata_props}
        assert json.loads(meta["pqd.classes"]) == ["airplane", "automobile", "bird"]
    assert (out / "report.md").read_text().startswith("# pqd run: folder64")


@pytest.mark.integration
def test_compress_an_image_folder(photos: Path, tmp_path: Path) -> None:
    from pqd.models import build_model

    data = pqd.data.from_folder(
        photos, image_size=64, val_size=30, on_bad_image="skip", cache_dir=tmp_path / "c"
    )
    torch.manual_seed(0)
    model = build_model("tiny_cnn", data.num_classes, data.mean, data.std)
    result = pqd.compress(
        model,
        data,
        [pqd.Quantize(epochs=1)],
        out=tmp_path / "run",
        baseline_epochs=1,
        measure={"repeats": 5, "batch_sizes": [1]},
        train={"batch_size": 32},
    )
    assert result.record["data"]["skipped_images"] == 1
    assert result.record["final"]["precision"] == "int8"
    assert _input_hw(result.final_onnx) == [64, 64]
    meta = {p.key: p.value for p in onnx.load(str(result.final_onnx)).metadata_props}
    assert json.loads(meta["pqd.classes"]) == data.classes
    assert (result.run_dir / "report.md").is_file()


@pytest.mark.integration
def test_png_folder_at_32_matches_the_cifar_reader(
    subset_dir: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    """The same images, split as the CIFAR reader splits them, written as lossless PNG: the
    folder reader yields the same images per split, and the same trained model measures the
    same test accuracy through `pqd run` on both (the record's baseline accuracy)."""
    monkeypatch.setenv(pf.CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv("PQD_DATA_DIR", raising=False)
    cifar = load_dataset(
        "cifar10", subset_dir, val_size=100, limit_train=600, limit_test=300, download=False, seed=0
    )
    root = tmp_path / "png"
    for split in ("train", "val", "test"):
        write_image_folder(
            root / split, getattr(cifar, f"{split}_x"), getattr(cifar, f"{split}_y"), cifar.classes
        )
    folder = pf.from_folder(root, image_size=32)
    assert folder.classes == cifar.classes
    for split in ("train", "val", "test"):
        # files are listed by class, then name (= index): sort the CIFAR split the same way
        y = getattr(cifar, f"{split}_y")
        order = torch.sort(y, stable=True).indices
        assert torch.equal(getattr(folder, f"{split}_y"), y[order])
        assert torch.equal(getattr(folder, f"{split}_x"), getattr(cifar, f"{split}_x")[order])

    common = {
        "name": "same",
        "seed": 0,
        "model": {"name": "tiny_cnn"},
        "train": {"batch_size": 32, "lr": 0.05},
        "stages": [],
        "measure": {"warmup": 1, "repeats": 5, "batch_sizes": [1]},
    }
    recipes = {
        "cifar": {
            **common,
            "baseline": {"epochs": 5},
            "data": {
                "dataset": "cifar10",
                "root": str(subset_dir),
                "val_size": 100,
                "limit_train": 600,
                "limit_test": 300,
                "download": False,
            },
        },
    }
    (tmp_path / "cifar.yaml").write_text(yaml.safe_dump(recipes["cifar"]))
    assert (
        main(["run", str(tmp_path / "cifar.yaml"), "--out", str(tmp_path / "a"), "--no-progress"])
        == 0
    )
    ckpt = tmp_path / "a" / "baseline.safetensors"
    recipes["folder"] = {
        **common,
        "baseline": {"checkpoint": str(ckpt)},
        "data": {"dataset": "folder", "root": str(root), "image_size": 32},
    }
    (tmp_path / "folder.yaml").write_text(yaml.safe_dump(recipes["folder"]))
    assert (
        main(["run", str(tmp_path / "folder.yaml"), "--out", str(tmp_path / "b"), "--no-progress"])
        == 0
    )
    acc = {
        name: json.loads((tmp_path / name / "record.json").read_text())["baseline"]["accuracy"]
        for name in ("a", "b")
    }
    assert acc["b"] == acc["a"]  # the checkpoint trained in "a", measured on each reader's test
    assert acc["b"] > 0.2  # a trained model (chance: 0.1), so wrong labels would show
    capsys.readouterr()


def test_loader_benchmark_prints_its_table(capsys) -> None:
    bench = load_benchmark("loader")
    args = ["--sizes", "16,24", "--images", "40", "--models", "tiny_cnn", "--steps", "1"]
    assert bench.main([*args, "--batch", "8"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 16x16") or "24x24" in line]
    assert len(rows) == 2 and all(float(r.split("|")[-2].strip(" x")) > 0 for r in rows)
    assert "CPU: " in out
