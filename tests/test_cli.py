"""The ``pqd`` command: bad input ends in one line and exit 2; a real run writes the record
contract; ``pqd report`` re-renders it."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml

from pqd.cli import main

ROOT = Path(__file__).resolve().parents[1]


def write_recipe(tmp_path: Path, data: dict, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def tiny(root: Path | str, **extra: object) -> dict:
    """A tiny real-data recipe: tiny_cnn on 600 subset images, one epoch per step."""
    data = {
        "name": "tiny",
        "seed": 0,
        "model": {"name": "tiny_cnn"},
        "data": {
            "dataset": "cifar10",
            "root": str(root),
            "val_size": 100,
            "download": False,
            "limit_train": 600,
            "limit_test": 200,
        },
        "train": {"batch_size": 64, "lr": 0.05},
        "baseline": {"epochs": 1},
        "stages": [
            {"stage": "prune", "sparsity": 0.5, "epochs": 1},
            {"stage": "quantize", "epochs": 1},
            {"stage": "distill", "epochs": 1},
        ],
        "measure": {"warmup": 2, "repeats": 10, "batch_sizes": [1, 8]},
    }
    data.update(extra)
    return data


def one_error_line(capsys: pytest.CaptureFixture[str], code: int) -> str:
    out = capsys.readouterr()
    assert code == 2
    lines = out.err.strip().splitlines()
    assert len(lines) == 1, out.err
    assert lines[0].startswith("pqd: error: ") and "fix:" in lines[0], lines[0]
    assert "Traceback" not in out.err
    return lines[0]


@pytest.mark.parametrize(
    ("patch", "needle"),
    [
        ({"stages": [{"stage": "prune", "sparsity": 1.5}]}, "stages.0.sparsity"),
        ({"stages": [{"stage": "prune", "sparsity": 0.5, "epochs": -1}]}, "stages.0.epochs"),
        ({"stages": [{"stage": "prunee"}]}, "unknown stage 'prunee'"),
        ({"baseline": {"epocs": 3}}, "baseline.epocs"),
        ({"train": {"lr": "fast"}}, "train.lr"),
        ({"measure": {"runtimes": ["tensorrt"]}}, "measure.runtimes.0"),
    ],
)
def test_bad_recipe_is_one_line(tmp_path: Path, capsys, patch: dict, needle: str) -> None:
    path = write_recipe(tmp_path, {**tiny(tmp_path), **patch})
    for cmd in (["validate", str(path)], ["run", str(path), "--out", str(tmp_path / "o")]):
        line = one_error_line(capsys, main(cmd))
        assert needle in line
    assert not (tmp_path / "o").exists()  # nothing written for a rejected recipe


def test_bad_override_is_one_line(tmp_path: Path, capsys) -> None:
    path = write_recipe(tmp_path, tiny(tmp_path))
    line = one_error_line(capsys, main(["validate", str(path), "stages.7.sparsity=0.2"]))
    assert "stages.7" in line
    line = one_error_line(capsys, main(["validate", str(path), "stages.0.sparsity=2"]))
    assert "stages.0.sparsity" in line


def test_missing_data_folder_is_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("PQD_DATA_DIR", raising=False)  # CI sets it; it would win over data.root
    path = write_recipe(tmp_path, tiny(tmp_path / "nowhere"))
    line = one_error_line(capsys, main(["run", str(path), "--out", str(tmp_path / "o")]))
    assert "cifar10 files are missing" in line and "--data-dir" in line
    assert not (tmp_path / "o").exists()


def _two_class_folder(root: Path) -> Path:
    """A tiny image folder (train/ and test/, two classes of 4 PNGs each)."""
    import torch

    from helpers import write_image_folder

    g = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        x = torch.randint(0, 256, (8, 3, 16, 16), generator=g, dtype=torch.uint8)
        write_image_folder(root / split, x, torch.arange(8) % 2, ["a", "b"])
    return root


def test_data_root_on_the_command_line_wins_over_the_environment(
    tmp_path: Path, capsys, monkeypatch, subset_dir: Path
) -> None:
    """PQD_DATA_DIR (set for CIFAR) neither replaces an image folder's data.root= on the
    command line nor the recipe's own data.root; an error names where the folder came from
    and a fix other than what the user just did."""
    monkeypatch.setenv("PQD_DATA_DIR", str(subset_dir))
    monkeypatch.setenv("PQD_CACHE_DIR", str(tmp_path / "cache"))
    photos = _two_class_folder(tmp_path / "photos")
    recipe = tiny(tmp_path / "gone")
    recipe["data"] = {"dataset": "folder", "root": str(tmp_path / "gone"), "image_size": 16}
    path = write_recipe(tmp_path, recipe)
    assert main(["validate", str(path), f"data.root={photos}", "--quiet"]) == 0
    assert f"ok: {path}" in capsys.readouterr().out

    line = one_error_line(capsys, main(["validate", str(path), "--quiet"]))
    assert f"image folder {tmp_path / 'gone'} does not exist" in line
    assert "(the data folder is the recipe's data.root)" in line
    assert "set data.root in the recipe to the folder holding train/<class>/" in line

    line = one_error_line(capsys, main(["validate", str(path), f"data.root={tmp_path / 'x'}"]))
    assert "given as data.root= on the command line" in line
    assert "check the path after data.root=" in line and "pass ROOT as data.root" not in line

    line = one_error_line(capsys, main(["validate", str(path), "--data-dir", str(subset_dir)]))
    assert (
        f"{subset_dir} has no train/ folder (the data folder is the one given with --data-dir)"
        in line
    )

    # the variable is the fallback of a recipe that names no folder
    del recipe["data"]["root"]
    path = write_recipe(tmp_path, recipe)
    line = one_error_line(capsys, main(["validate", str(path), "--quiet"]))
    assert f"{subset_dir} has no train/ folder (the data folder is the one in PQD_DATA_DIR" in line
    assert "point PQD_DATA_DIR at the folder holding train/<class>/" in line


def test_named_data_folder_is_never_downloaded_into_unless_asked(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    import pqd.data.download

    tried: list[str] = []
    monkeypatch.setattr(pqd.data.download, "_fetch", lambda url, *a: tried.append(url))
    monkeypatch.delenv("PQD_DATA_DIR", raising=False)
    recipe = tiny(tmp_path / "nowhere")
    del recipe["data"]["download"]  # the default
    path = write_recipe(tmp_path, recipe)
    line = one_error_line(capsys, main(["run", str(path), "--out", str(tmp_path / "o")]))
    assert "cifar10 files are missing" in line and "downloads only when asked" in line
    assert "add --download (or set data.download: true)" in line
    assert not tried and not (tmp_path / "nowhere").exists() and not (tmp_path / "o").exists()

    # asked for: validate says the run will download it (nothing is fetched by validate)
    assert main(["validate", str(path), "--download"]) == 0
    assert "will download it" in capsys.readouterr().out
    assert main(["validate", str(path), "data.download=true", "--quiet"]) == 0
    assert not tried

    # no folder named anywhere: the official data set may go into pqd's default ./data
    monkeypatch.chdir(tmp_path)
    del recipe["data"]["root"]
    path = write_recipe(tmp_path, recipe)
    assert main(["validate", str(path)]) == 0
    assert f"not under {tmp_path / 'data'} yet: pqd run will download it" in (
        capsys.readouterr().out
    )


def test_the_readmes_fresh_machine_quickstart_would_download_into_data(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    """README's `pqd run recipes/quickstart.yaml --out runs/quick --data-dir data --download`:
    validated in an empty folder, it plans the download into ./data (nothing fetched)."""
    import pqd.data.download

    tried: list[str] = []
    monkeypatch.setattr(pqd.data.download, "_fetch", lambda url, *a: tried.append(url))
    monkeypatch.delenv("PQD_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    recipe = ROOT / "recipes" / "quickstart.yaml"
    assert main(["validate", str(recipe), "--data-dir", "data", "--download"]) == 0
    out = capsys.readouterr().out
    assert f"not under {tmp_path / 'data'} yet: pqd run will download it" in out
    assert not tried and not (tmp_path / "data").exists()


@pytest.mark.parametrize(
    ("model", "needle"),
    [
        ("resnet7", "unknown model 'resnet7'"),
        ("no_such_pkg.nets:build", "does not import"),
        ("collections:OrderedDict", "returned a OrderedDict, not an nn.Module"),
    ],
)
def test_bad_model_is_one_line(
    tmp_path: Path, capsys, subset_dir: Path, model: str, needle: str
) -> None:
    path = write_recipe(tmp_path, tiny(subset_dir, model={"name": model}))
    line = one_error_line(capsys, main(["run", str(path), "--out", str(tmp_path / "o")]))
    assert needle in line


def test_validate_prints_resolved_recipe(capsys, subset_dir: Path) -> None:
    recipe = str(ROOT / "recipes" / "quickstart.yaml")
    assert main(["validate", recipe, "--data-dir", str(subset_dir)]) == 0
    out = capsys.readouterr().out
    assert "stages prune -> quantize -> distill" in out
    assert yaml.safe_load(out.rsplit("ok:", 1)[0])["model"]["name"] == "fastnet_q8"


def test_report_on_a_folder_without_record(tmp_path: Path, capsys) -> None:
    line = one_error_line(capsys, main(["report", str(tmp_path)]))
    assert "record.json does not exist" in line


@pytest.mark.integration
def test_a_user_model_with_mobile_blocks_gets_an_all_integer_int8_file(
    tmp_path: Path, subset_dir: Path
) -> None:
    """The held-out style of user model (depthwise convs, concat, a squeeze-excite gate,
    SiLU, ``torch.add`` and ``+`` residuals; tests/user_blocks.py) as ``module:callable``
    through prune -> quantize -> distill with the real CLI: onnxruntime runs every conv,
    the gate and the activations of its INT8 file as integer kernels."""
    recipe = tiny(subset_dir, model={"name": "user_blocks:build"})
    recipe["measure"]["runtimes"] = ["onnxruntime"]
    path = write_recipe(tmp_path, recipe)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "pqd.cli", "run", str(path), "--out", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    # --no-progress into a pipe: phase lines, what and how far, no bar redraws
    for line in ("pqd: [1/3] prune: starting", "pqd: [2/3] quantize: epoch 1/", "pqd: measuring "):
        assert line in proc.stderr, proc.stderr[-2000:]
    assert "\r" not in proc.stderr
    record = json.loads((out / "record.json").read_text())
    assert record["recipe"]["model"]["name"] == "user_blocks:build"
    assert [s["name"] for s in record["stages"]] == ["prune", "quantize", "distill"]
    final = record["final"]
    assert final["precision"] == "int8" and final["parity_ok"], final["parity_problems"]
    ort = final["runtimes"]["onnxruntime"]
    kernels = ort["kernels"]
    assert kernels.get("QLinearConv") == 12, kernels  # every conv, depthwise and gate convs
    assert not {"Conv", "FusedConv"} & set(kernels), kernels  # no float conv
    # the gate (QLinearSigmoid, QLinearMul), SiLU (the same two), cat, both residuals
    assert kernels.get("QLinearSigmoid") == 4 and kernels.get("QLinearMul") == 4, kernels
    assert kernels.get("QLinearConcat") == 1 and kernels.get("QLinearAdd") == 3, kernels
    assert ort["float_ops"] == [], ort["float_ops"]  # nothing runs on a dequantized tensor


@pytest.mark.integration
def test_run_writes_the_record_contract(tmp_path: Path, subset_dir: Path) -> None:
    recipe = write_recipe(tmp_path, tiny(subset_dir))
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pqd.cli",
            "run",
            str(recipe),
            "--out",
            str(out),
            "--no-progress",
            "stages.0.sparsity=0.6",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"x (faster|slower) at batch 1", proc.stdout)
    record = json.loads((out / "record.json").read_text())

    for key in ("pqd_version", "recipe", "environment", "baseline", "final", "stages"):
        assert key in record
    assert record["recipe"]["stages"][0]["sparsity"] == 0.6  # the override is in the record
    env_ = record["environment"]
    assert env_["cpu"] and env_["measure_threads"] == 2 and "onnxruntime" in env_["libraries"]
    for key in ("baseline", "final"):
        r = record[key]
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["size_bytes"] == (out / r["artifact"]).stat().st_size
        lat = r["latency_ms"]
        assert lat["batch"] == 1 and 0 < lat["p50"] <= lat["p90"]
        assert set(lat["batches"]) == {"1", "8"}
        assert r["params"] >= r["nonzero_params"] > 0 and r["macs"] > 0 and r["bitops"] > 0
        assert r["parity"]["top1_agreement"] >= 0.99 and r["parity_ok"], r["parity_problems"]
        lo, hi = r["accuracy_ci"]  # Wilson on the test images
        assert lo < r["accuracy"] < hi and r["test_images"] == record["data"]["test"]
    # the paired comparison agrees with the per-image predictions the run keeps
    preds = np.load(out / "predictions.npz")
    right_f, right_b = preds["final"] == preds["labels"], preds["baseline"] == preds["labels"]
    assert right_f.mean() == pytest.approx(record["final"]["accuracy"])
    paired = record["comparison"]["paired"]
    assert paired["a_only"] == int((right_f & ~right_b).sum())
    assert paired["b_only"] == int((~right_f & right_b).sum())
    assert paired["ci_low"] <= paired["difference"] <= paired["ci_high"]
    assert paired["verdict"] in ("tie", "final better", "baseline better")
    assert "McNemar p =" in proc.stdout
    val = np.load(out / "val_predictions.npz")
    assert (val["final"] == val["labels"]).mean() == pytest.approx(
        record["final"]["val_accuracy"], abs=0.01
    )
    assert env_["kernels"] and isinstance(env_["cpu_flags"], list)
    base, final = record["baseline"], record["final"]
    # the default portable target: 7-bit weights, nothing that saturates without VNNI
    assert final["target"] == "portable" and base["target"] == "any"
    assert final["saturation"]["pairs_at_risk"] == 0 and final["saturation"]["checked_layers"]
    assert final["saturation"]["max_pair_magnitude"] <= 128
    meta = {p.key: p.value for p in onnx.load(str(out / "final.onnx")).metadata_props}
    assert meta["pqd.target"] == "portable" and meta["pqd.saturating_weight_pairs"] == "0"
    assert base["precision"] == "fp32" and final["precision"] == "int8"
    # sparsity read back from the int8 file holds at least every masked zero
    assert final["masked_sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert final["sparsity"] >= final["masked_sparsity"] and base["sparsity"] < 0.01
    assert final["bitops"] * 8 < base["bitops"]  # 8x8-bit vs 32x32-bit MACs, fewer nonzeros
    assert final["size_bytes"] < base["size_bytes"]  # tiny net: scales weigh as much as weights
    assert [s["name"] for s in record["stages"]] == ["prune", "quantize", "distill"]
    for s in record["stages"]:
        assert s["seconds"] > 0 and 0 <= s["val_accuracy"] <= 1 and s["config"]["epochs"] == 1
    assert (out / "report.md").read_text().startswith("# pqd run: tiny")
    for name in ("recipe.yaml", "baseline.safetensors", "baseline.onnx", "final.onnx"):
        assert (out / name).is_file()

    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "| final | int8 |" in report and "built for target **portable**" in report
    assert "final vs baseline on the same" in report and "McNemar p =" in report


@pytest.mark.integration
def test_a_vnni_file_measured_without_vnni_is_flagged_in_one_line(
    tmp_path: Path, subset_dir: Path, capsys, monkeypatch
) -> None:
    """A file built for x86-vnni (8-bit weights), measured where the CPU flags say AVX2 only:
    parity_ok false, one warning line naming the target, the figure and the fix."""
    import pqd.measurement.env as env_mod

    monkeypatch.setattr(env_mod, "cpu_flags", lambda: ["avx2"])
    recipe = tiny(
        subset_dir,
        stages=[{"stage": "quantize", "mode": "ptq", "epochs": 0}],
        measure={"warmup": 1, "repeats": 5, "batch_sizes": [1], "runtimes": ["onnxruntime"]},
    )
    path = write_recipe(tmp_path, recipe)
    out = tmp_path / "run"
    assert (
        main(["run", str(path), "--out", str(out), "--no-progress", "export.target=x86-vnni"]) == 0
    )
    err = capsys.readouterr().err.strip().splitlines()
    warnings_ = [line for line in err if line.startswith("pqd: warning: ")]
    assert len(warnings_) == 1, err
    assert "x86-vnni" in warnings_[0] and "without VNNI" in warnings_[0]
    assert "fix: rebuild" in warnings_[0]
    record = json.loads((out / "record.json").read_text())
    final = record["final"]
    assert final["target"] == "x86-vnni" and final["parity_ok"] is False
    assert final["saturation"]["pairs_at_risk"] > 0  # read from the 8-bit file
    assert record["baseline"]["parity_ok"] is True  # the float file runs alike everywhere
    assert record["environment"]["cpu_flags"] == ["avx2"]
    assert "saturate" in record["environment"]["kernels"]
    assert "**FAILED**" in (out / "report.md").read_text()


def test_torchaos_enum_constant_warning_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    from pqd._quiet import quiet_command

    quiet_command()
    log = logging.getLogger("torch.utils._pytree")
    with caplog.at_level(logging.WARNING, logger="torch.utils._pytree"):
        log.warning(
            "%s is an Enum subclass and is now natively supported by torch.compile "
            "as an opaque value type.",
            "<enum 'KernelPreference'>",
        )
        log.warning("another pytree warning")
    assert [r.getMessage() for r in caplog.records] == ["another pytree warning"]


def test_out_that_is_a_file_names_it_before_any_work(
    tmp_path: Path, capsys, subset_dir: Path
) -> None:
    path = write_recipe(tmp_path, tiny(subset_dir))
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out in (afile, afile / "sub"):
        line = one_error_line(capsys, main(["run", str(path), "--out", str(out)]))
        assert f"cannot write {afile}: it or a folder above it is a file" in line
        assert "free space" not in line and "finished steps" not in line
    assert afile.read_text() == "x"


@pytest.mark.parametrize(
    ("readonly", "needle", "fix"),
    [
        (True, "the file system is read-only", "on a writable file system"),
        (False, "permission denied", "you may write to"),
    ],
)
def test_out_on_a_read_only_or_forbidden_folder(
    tmp_path: Path, capsys, monkeypatch, subset_dir: Path, readonly: bool, needle: str, fix: str
) -> None:
    import pqd.cli

    path = write_recipe(tmp_path, tiny(subset_dir))
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access, real_statvfs = os.access, os.statvfs

    class Flags:
        def __init__(self, p: object) -> None:
            self.f_flag = real_statvfs(p).f_flag | (os.ST_RDONLY if readonly else 0)

    # tests run as root here, where chmod does not stop writes: make the folder look locked
    monkeypatch.setattr(
        pqd.cli.os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode)
    )
    monkeypatch.setattr(pqd.cli.os, "statvfs", Flags)
    line = one_error_line(capsys, main(["run", str(path), "--out", str(locked / "run")]))
    assert f"cannot write {locked}: {needle}" in line and fix in line
    assert "free space" not in line and not (locked / "run").exists()


@pytest.mark.parametrize(
    ("code", "needle"),
    [
        (30, "the file system is read-only"),  # EROFS
        (13, "permission denied"),  # EACCES
        (28, "No space left on device writing"),  # ENOSPC
    ],
)
def test_storage_errors_while_running_name_the_cause(
    tmp_path: Path, capsys, monkeypatch, subset_dir: Path, code: int, needle: str
) -> None:
    import pqd.pipeline

    def fail(*_: object, **__: object) -> None:
        raise OSError(code, os.strerror(code), str(tmp_path / "o" / "baseline.safetensors"))

    monkeypatch.setattr(pqd.pipeline, "run", fail)
    path = write_recipe(tmp_path, tiny(subset_dir))
    line = one_error_line(capsys, main(["run", str(path), "--out", str(tmp_path / "o")]))
    assert needle in line and str(tmp_path / "o" / "baseline.safetensors") in line
    assert ("free space" in line) == (code == 28)


@pytest.mark.parametrize(
    ("runtimes", "installed", "needles"),
    [
        (
            ["auto"],
            [],
            ["no ONNX runtime is installed", "reinstall pqd, or pip install onnxruntime"],
        ),
        (["onnxruntime"], ["openvino"], ["onnxruntime is not installed", "reinstall pqd"]),
        (
            ["openvino"],
            ["onnxruntime"],
            ["openvino is not installed", "pip install 'pqd[openvino]'"],
        ),
        (
            ["onnxruntime", "openvino-ir"],
            ["onnxruntime"],
            ["openvino (for openvino-ir) is not installed", "remove openvino-ir from"],
        ),
    ],
)
@pytest.mark.slow
def test_a_missing_runtime_gets_the_right_install_advice(
    tmp_path: Path,
    capsys,
    monkeypatch,
    subset_dir: Path,
    runtimes: list[str],
    installed: list[str],
    needles: list[str],
) -> None:
    import pqd.measurement.runtime

    monkeypatch.setattr(pqd.measurement.runtime, "available_runtimes", lambda: installed)
    data = tiny(subset_dir)
    data["measure"]["runtimes"] = runtimes
    path = write_recipe(tmp_path, data)
    line = one_error_line(capsys, main(["run", str(path), "--out", str(tmp_path / "o")]))
    assert all(n in line for n in needles), line
    assert "pip install onnxruntime (or pqd[openvino])" not in line


def test_validate_checks_what_it_can_without_training(
    tmp_path: Path, capsys, subset_dir: Path, monkeypatch
) -> None:
    import torch

    from pqd.models import build_model

    monkeypatch.delenv("PQD_DATA_DIR", raising=False)
    ckpt = tmp_path / "base.pt"
    torch.save(build_model("tiny_cnn", 10, [0.5] * 3, [0.25] * 3).net.state_dict(), ckpt)
    data = tiny(subset_dir, baseline={"checkpoint": str(ckpt)})
    path = write_recipe(tmp_path, data)
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    checked = out.rsplit("ok:", 1)[1]
    assert f"checked data: cifar10 files present and readable in {subset_dir}" in checked
    assert "checked model: tiny_cnn builds" in checked and "10 logits" in checked
    assert f"checked checkpoint: {ckpt} loads into the model" in checked
    assert "checked runtimes: onnxruntime" in checked

    # three things wrong at once: one line each, with its fix, and a non-zero exit
    line_args = [
        "model.name=nosuch:build",
        f"baseline.checkpoint={tmp_path / 'gone.pt'}",
        f"data.root={tmp_path / 'nodata'}",
    ]
    assert main(["validate", str(path), *line_args, "--quiet"]) == 2
    captured = capsys.readouterr()
    assert "ok:" not in captured.out
    lines = captured.err.strip().splitlines()
    assert len(lines) == 3 and all(
        ln.startswith("pqd: error: ") and "fix:" in ln for ln in lines
    ), lines
    assert f"files are missing under {tmp_path / 'nodata'}" in lines[0]
    assert "'nosuch'" in lines[1] and "does not import" in lines[1]
    assert "gone.pt' does not exist" in lines[2]


def test_validate_catches_a_checkpoint_for_another_class_count(
    tmp_path: Path, capsys, subset_dir: Path
) -> None:
    import torch

    from pqd.models import build_model

    torch.save(
        build_model("tiny_cnn", 100, [0.5] * 3, [0.25] * 3).net.state_dict(), tmp_path / "c100.pt"
    )
    path = write_recipe(tmp_path, tiny(subset_dir, baseline={"checkpoint": "c100.pt"}))
    line = one_error_line(capsys, main(["validate", str(path), "--data-dir", str(subset_dir)]))
    assert "another shape" in line and "100x" in line  # found relative to the recipe file


@pytest.mark.slow
def test_import_pqd_is_quiet_about_known_harmless_messages(tmp_path: Path) -> None:
    """From Python (no CLI), pqd's public calls that prepare, convert and export a QAT model
    print none of torchao's / torch's known-harmless messages (filtered while pqd's calls
    run, not installed by ``import pqd``), while the user's own warnings still show."""
    code = (
        "import warnings, torch, pqd\n"
        "from pqd.models import build_model\n"
        "m = build_model('tiny_cnn', 10, (0.5,) * 3, (0.25,) * 3)\n"
        "x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)\n"
        "data = {'train': (x, torch.arange(64) % 10), 'val_size': 16}\n"
        "state = pqd.apply_stages(m, [pqd.Quantize(mode='ptq', calibration_batches=1)], data)\n"
        "net = pqd.torch_model(state).eval()\n"
        "pqd.export(state, 'm.onnx', torch.rand(2, 3, 32, 32))\n"
        "warnings.warn('users own warning', UserWarning)\n"
        "warnings.warn('users own future', FutureWarning)\n"
        "print('prepared')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=tmp_path,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    for noise in (
        "Failed to load",
        "_C_cutlass",
        "register_constant",
        "LeafSpec",
        "x86_inductor_quantizer",
    ):
        assert noise not in out
    assert "users own warning" in out and "users own future" in out and "prepared" in out


def test_help_and_validate_read_as_plain_english(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "The pqd command" in out and "``" not in out
    from pqd.cli import _parser

    names = next(
        a.choices for a in _parser()._actions if isinstance(a.choices, dict) and "run" in a.choices
    )
    description = out.split("positional arguments")[0]
    for name in names:  # plan and audit included
        assert re.search(rf"\b{name}\b", description), name
        assert re.search(rf"^\s+{name}\s+\S", out, re.M), name  # with its one-line help
    path = tmp_path / "r.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": {"name": "tiny_cnn"},
                "baseline": {"epochs": 1},
                "stages": [{"stage": "distill", "epochs": 1}],
            }
        )
    )
    assert main(["validate", str(path), "--quiet"]) == 0
    line = capsys.readouterr().out
    assert "1 baseline epoch," in line and "(1 epoch)" in line and "epochs" not in line


@pytest.mark.parametrize(
    ("patch", "needle"),
    [
        ({"model": {"name": "resnet81"}}, "unknown model 'resnet81' (did you mean 'resnet18'"),
        (
            {"stages": [{"stage": "quantise"}]},
            "unknown stage 'quantise' (did you mean 'quantize'?)",
        ),
        ({"measure": {"runtimes": ["onnxruntim"]}}, "(did you mean 'onnxruntime'?)"),
        (
            {"baseline": {"epocs": 1}},
            "baseline.epocs: Extra inputs are not permitted (did you mean 'epochs'?)",
        ),
        ({"trian": {"lr": 0.1}}, "trian: Extra inputs are not permitted (did you mean 'train'?)"),
    ],
)
def test_wrong_names_get_did_you_mean(
    tmp_path: Path, capsys, subset_dir: Path, patch: dict, needle: str
) -> None:
    path = write_recipe(tmp_path, {**tiny(subset_dir), **patch})
    line = one_error_line(capsys, main(["validate", str(path), "--quiet"]))
    assert needle in line
