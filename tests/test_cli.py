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
        "name": "tiny", "seed": 0, "model": {"name": "tiny_cnn"},
        "data": {"dataset": "cifar10", "root": str(root), "val_size": 100, "download": False,
                 "limit_train": 600, "limit_test": 200},
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


@pytest.mark.parametrize(("patch", "needle"), [
    ({"stages": [{"stage": "prune", "sparsity": 1.5}]}, "stages.0.sparsity"),
    ({"stages": [{"stage": "prune", "sparsity": 0.5, "epochs": -1}]}, "stages.0.epochs"),
    ({"stages": [{"stage": "prunee"}]}, "unknown stage 'prunee'"),
    ({"baseline": {"epocs": 3}}, "baseline.epocs"),
    ({"train": {"lr": "fast"}}, "train.lr"),
    ({"measure": {"runtimes": ["tensorrt"]}}, "measure.runtimes.0"),
])
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


@pytest.mark.parametrize(("model", "needle"), [
    ("resnet7", "unknown model 'resnet7'"),
    ("no_such_pkg.nets:build", "does not import"),
    ("collections:OrderedDict", "returned a OrderedDict, not an nn.Module"),
])
def test_bad_model_is_one_line(tmp_path: Path, capsys, subset_dir: Path, model: str,
                               needle: str) -> None:
    path = write_recipe(tmp_path, tiny(subset_dir, model={"name": model}))
    line = one_error_line(capsys, main(["run", str(path), "--out", str(tmp_path / "o")]))
    assert needle in line


def test_validate_prints_resolved_recipe(capsys) -> None:
    assert main(["validate", str(ROOT / "recipes" / "quickstart.yaml")]) == 0
    out = capsys.readouterr().out
    assert "stages prune -> quantize -> distill" in out
    assert yaml.safe_load(out.rsplit("ok:", 1)[0])["model"]["name"] == "fastnet_q8"


def test_report_on_a_folder_without_record(tmp_path: Path, capsys) -> None:
    line = one_error_line(capsys, main(["report", str(tmp_path)]))
    assert "record.json does not exist" in line


@pytest.mark.integration
def test_run_writes_the_record_contract(tmp_path: Path, subset_dir: Path) -> None:
    recipe = write_recipe(tmp_path, tiny(subset_dir))
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "pqd.cli", "run", str(recipe), "--out", str(out),
         "--no-progress", "stages.0.sparsity=0.6"],
        capture_output=True, text=True, env=env, timeout=600)
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
        assert r["parity"]["top1_agreement"] >= 0.95
    base, final = record["baseline"], record["final"]
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
    assert "| final | int8 |" in (out / "report.md").read_text()


def test_torchaos_enum_constant_warning_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    from pqd.cli import _quiet_libraries

    _quiet_libraries()
    log = logging.getLogger("torch.utils._pytree")
    with caplog.at_level(logging.WARNING, logger="torch.utils._pytree"):
        log.warning("%s is an Enum subclass and is now natively supported by torch.compile "
                    "as an opaque value type.", "<enum 'KernelPreference'>")
        log.warning("another pytree warning")
    assert [r.getMessage() for r in caplog.records] == ["another pytree warning"]


def test_import_pqd_is_quiet_about_known_harmless_messages() -> None:
    """From Python (no CLI), preparing a QAT model prints none of torchao's / torch's
    known-harmless messages, while the user's own warnings still show."""
    code = ("import warnings, torch, pqd\n"
            "from pqd.models import build_model\n"
            "from pqd.stages.quantize import prepare_qat\n"
            "m = build_model('tiny_cnn', 10, (0.5,) * 3, (0.25,) * 3)\n"
            "g = prepare_qat(m, torch.rand(2, 3, 32, 32))\n"
            "import copy; copy.deepcopy(g)\n"
            "warnings.warn('users own warning', UserWarning)\n"
            "warnings.warn('users own future', FutureWarning)\n"
            "print('prepared')\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    for noise in ("Failed to load", "_C_cutlass", "register_constant", "LeafSpec",
                  "x86_inductor_quantizer"):
        assert noise not in out
    assert "users own warning" in out and "users own future" in out and "prepared" in out


def test_help_and_validate_read_as_plain_english(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "The pqd command" in out and "``" not in out
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "tiny_cnn"}, "baseline": {"epochs": 1},
                                    "stages": [{"stage": "distill", "epochs": 1}]}))
    assert main(["validate", str(path), "--quiet"]) == 0
    line = capsys.readouterr().out
    assert "1 baseline epoch," in line and "(1 epoch)" in line and "epochs" not in line
