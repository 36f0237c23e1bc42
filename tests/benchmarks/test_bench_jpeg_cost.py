"""benchmarks/jpeg_cost.py: every subset image finds its own JPEG copy, a folder without the
copies is refused, and a run trains both arms and renders its page from the JSON."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import load_benchmark, write_image_folder
from pqd.data import load_dataset


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("jpeg_cost")


def jpeg(images: torch.Tensor, quality: int = 75) -> torch.Tensor:
    """Each uint8 ``[N, 3, H, W]`` image through a JPEG file and back."""
    out = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, "JPEG", quality=quality)
        out.append(torch.from_numpy(np.asarray(Image.open(buf).convert("RGB"))).permute(2, 0, 1))
    return torch.stack(out)


def test_every_image_finds_its_own_copy_and_a_missing_one_is_refused(bench, subset_dir) -> None:
    data = load_dataset("cifar10", subset_dir, val_size=0)
    x, y = data.test_x[:200], data.test_y[:200]
    order = torch.randperm(200, generator=torch.Generator().manual_seed(0))
    pool_x, pool_y = jpeg(x)[order], y[order]
    idx, mad = bench.match(x, y, pool_x, pool_y)
    assert torch.equal(order[torch.from_numpy(idx)], torch.arange(200))
    assert 1.0 < mad.mean() < 12.0  # JPEG changed the pixels, a little
    keep = torch.ones(200, dtype=torch.bool)
    keep[int((order == 17).nonzero())] = False  # image 17's copy is gone
    with pytest.raises(SystemExit, match="does not hold a copy of every subset image"):
        bench.match(x, y, pool_x[keep], pool_y[keep])


@pytest.mark.integration
def test_a_run_trains_both_arms_and_renders_from_its_json(
    bench, subset_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PQD_CACHE_DIR", str(tmp_path / "cache"))
    data = load_dataset("cifar10", subset_dir, val_size=0)
    folder = tmp_path / "jpg"
    for split, x, yy in (("train", data.train_x, data.train_y), ("test", data.test_x, data.test_y)):
        write_image_folder(folder / split, x, yy, data.classes, formats=("jpg",))
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        "model: {name: tiny_cnn}\ntrain: {batch_size: 128, lr: 0.05, amp: 'off'}\n"
        "baseline: {epochs: 1}\n"
    )
    results = tmp_path / "res"
    args = ["--recipe", str(recipe), "--subset", str(subset_dir), "--jpeg", str(folder)]
    assert bench.main([*args, "--seeds", "0", "1", "--results", str(results)]) == 0
    r = json.loads((results / "jpeg-cost.json").read_text())
    assert r["epochs"] == 1 and r["data"] == {**r["data"], "train": 5170, "test": 1017}
    c = r["clean_vs_jpeg"]
    means = {
        k: np.mean([s["accuracy"] for s in cell["per_seed"]]) for k, cell in r["cells"].items()
    }
    assert c["difference"] == pytest.approx(means["clean->clean"] - means["jpeg->jpeg"], abs=1e-6)
    assert c["ci_low"] <= c["difference"] <= c["ci_high"] and c["seeds"] == 2
    assert all(0.1 < m < 1.0 for m in means.values())  # one epoch learns something
    page = (results / "jpeg-cost.md").read_text()
    assert "**JPEG cost**" in page and "McNemar p =" in page and r["environment"]["cpu"] in page
    (results / "jpeg-cost.md").unlink()
    assert bench.main(["--render", "--results", str(results)]) == 0
    assert (results / "jpeg-cost.md").read_text() == page
