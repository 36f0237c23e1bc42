"""benchmarks/ceiling.py: the whitening conv whitens, the flips alternate between epochs over
the same translations, and a run trains, tests and renders its page from the JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import load_benchmark, write_image_folder
from pqd.data import load_dataset


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("ceiling")


def test_the_whitening_conv_decorrelates_the_patches_it_was_set_from(bench) -> None:
    g = torch.Generator().manual_seed(0)
    # correlated channels, and pixels correlated along rows only: noise smoothed across
    # columns plus a shared component
    base = F.avg_pool2d(torch.randn(64, 1, 32, 34, generator=g), (1, 3), stride=1)
    x = base + 0.3 * F.avg_pool2d(torch.randn(64, 3, 32, 33, generator=g), (1, 2), stride=1)
    net = bench.build_net(x)
    w = net[0].weight
    assert not w.requires_grad and torch.equal(w[:12], -w[12:])
    out = F.conv2d(x, w)[:, :12]  # the 12 eigen-directions, without bias
    flat = out.permute(1, 0, 2, 3).reshape(12, -1)
    cov = flat @ flat.T / flat.shape[1]
    off = cov - torch.diag(torch.diag(cov))
    assert off.abs().max() < 0.05  # decorrelated
    assert torch.diag(cov).min() > 0.3 and torch.diag(cov).max() < 1.01  # about unit variance
    # the patches' layout matters: the same filters with rows and columns swapped do not
    swapped = F.conv2d(x, w.transpose(2, 3))[:, :12].permute(1, 0, 2, 3).reshape(12, -1)
    cov_s = swapped @ swapped.T / swapped.shape[1]
    assert (cov_s - torch.diag(torch.diag(cov_s))).abs().max() > 0.05


def test_the_schedule_and_the_parameter_groups_are_airbench94s(bench) -> None:
    assert bench.lr_factor(0, 476) == pytest.approx(0.2)
    assert bench.lr_factor(int(0.23 * 476), 476) == pytest.approx(1.0)
    assert bench.lr_factor(476, 476) == pytest.approx(0.07)
    net = bench.build_net(torch.randn(8, 3, 32, 32))
    biases, others = bench.param_groups(net)
    names = {id(p): k for k, p in net.named_parameters()}
    assert {names[id(p)].rsplit(".", 1)[-1] for p in biases["params"]} == {"bias"}
    assert all("norm" in names[id(p)] for p in biases["params"])
    assert biases["lr"] == pytest.approx(64 * others["lr"])
    # decoupled weight decay: the same decay per step in both groups
    assert biases["lr"] * biases["weight_decay"] == pytest.approx(
        others["lr"] * others["weight_decay"]
    )
    frozen = [k for k, p in net.named_parameters() if not p.requires_grad]
    assert "0.weight" in frozen and all(k == "0.weight" or "norm" in k for k in frozen)


def test_lookahead_moves_the_slow_weights_and_copies_them_back(bench) -> None:
    net = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(net.weight)
    la = bench.Lookahead(net)
    with torch.no_grad():
        net.weight.fill_(1.0)
    la.update(net, 0.75)
    assert torch.allclose(net.weight, torch.full((1, 2), 0.25))
    with torch.no_grad():
        net.weight.fill_(5.0)
    la.update(net, 1.0)  # the end of an epoch: back to the slow weights
    assert torch.allclose(net.weight, torch.full((1, 2), 0.25))


def test_flips_alternate_between_epochs_over_the_same_translations(bench) -> None:
    n = 40
    x = torch.arange(n * 3 * 32 * 32, dtype=torch.float32).view(n, 3, 32, 32)
    y = torch.arange(n)
    base = torch.rand(n, generator=torch.Generator().manual_seed(1)) < 0.5
    bench.HYP["batch_size"], keep = 16, bench.HYP["batch_size"]
    try:
        even = list(bench._batches(x, y, 0, base, torch.Generator().manual_seed(3)))
        odd = list(bench._batches(x, y, 1, base, torch.Generator().manual_seed(3)))
    finally:
        bench.HYP["batch_size"] = keep
    padded = F.pad(x, (2, 2, 2, 2), mode="reflect")
    seen = 0
    for (xe, ye), (xo, yo) in zip(even, odd, strict=True):
        assert torch.equal(ye, yo) and torch.equal(xo, xe.flip(-1))
        for img, label in zip(xe, ye, strict=True):
            unflipped = img.flip(-1) if base[label] else img
            windows = [padded[label, :, r : r + 32, c : c + 32] for r in range(5) for c in range(5)]
            assert any(torch.equal(unflipped, w) for w in windows)  # a 0-2 pixel shift
            seen += 1
    assert seen == 32  # two full batches of 16; the last 8 images wait for the next epoch


@pytest.mark.integration
def test_a_run_trains_tests_and_renders_from_its_json(
    bench, subset_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PQD_CACHE_DIR", str(tmp_path / "cache"))
    data = load_dataset("cifar10", subset_dir, val_size=0)
    folder = tmp_path / "jpg"
    monkeypatch.setitem(bench.HYP, "batch_size", 256)  # a fast test: 8 small steps an epoch
    train = data.train_x[:2048], data.train_y[:2048]
    for split, x, yy in (("train", *train), ("test", data.test_x, data.test_y)):
        write_image_folder(folder / split, x, yy, data.classes, formats=("jpg",))
    results = tmp_path / "res"
    args = ["--jpeg", str(folder), "--subset", str(subset_dir), "--epochs", "2"]
    assert bench.main([*args, "--results", str(results)]) == 0
    r = json.loads((results / "ceiling.json").read_text())
    assert r["data"] == {**r["data"], "train": 2048, "test": 1017, "subset_test": 1017}
    assert r["data"]["match_mean_abs"] < 12.0
    (run,) = r["runs"]
    # it learns: 16 steps lift it 5 standard errors above chance (10%, sd 0.9 points)
    assert run["epochs"] == 2 and 0.15 < run["single"]["accuracy"] < 1.0
    c = run["tta_vs_single"]
    assert c["difference"] == pytest.approx(
        run["tta"]["accuracy"] - run["single"]["accuracy"], abs=1e-6
    )
    # the folder's test images are the subset's as JPEG: the one-pass figures agree
    assert run["subset_jpeg"]["accuracy"] == pytest.approx(run["single"]["accuracy"], abs=1e-9)
    page = (results / "ceiling.md").read_text()
    assert "McNemar p " in page and r["environment"]["cpu"] in page and "94.01%" in page
    assert "points lower" not in page  # no run at the published epochs
    published = {**r, "runs": [{**run, "epochs": 9.9}]}
    gap = 100 * (0.9401 - run["tta"]["accuracy"])
    assert f"where the official pixels give 94.01%: {gap:.2f} points lower" in bench.render(
        published
    )
    (results / "ceiling.md").unlink()
    assert bench.main(["--render", "--results", str(results)]) == 0
    assert (results / "ceiling.md").read_text() == page
