"""The real CLI on the real CIFAR-10 subset: PTQ (entropy) with mixed precision, then
feature KD on the quantized graph; then `pqd sensitivity` on that run's baseline."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from pqd.cli import main

SUBSET = Path(os.environ.get("PQD_DATA_DIR") or "/work/shared/data/cifar-10-subset")

RECIPE = {
    "name": "quant-options",
    "model": {"name": "tiny_resnet"},
    "data": {"dataset": "cifar10", "val_size": 128, "limit_train": 384, "limit_test": 128},
    "train": {"batch_size": 64, "lr": 0.1},
    "baseline": {"epochs": 1},
    "stages": [
        {
            "stage": "quantize",
            "mode": "ptq",
            "epochs": 0,
            "calibration_batches": 2,
            "activations": {"observer": "entropy"},
            "mixed_precision": {"max_drop_points": 0.0, "max_float_layers": 1},
        },
        {"stage": "distill", "epochs": 1, "features": {"loss": "fitnet"}, "train": {"lr": 0.01}},
    ],
    "measure": {"batch_sizes": [1], "warmup": 2, "repeats": 10},
}


@pytest.mark.integration
def test_cli_ptq_mixed_precision_feature_kd_then_sensitivity(tmp_path, capsys) -> None:
    if not (SUBSET / "cifar-10-batches-py").is_dir():
        pytest.fail(f"the CIFAR-10 subset is missing under {SUBSET}; set PQD_DATA_DIR")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    run = tmp_path / "run"
    assert (
        main(["run", str(recipe), "--out", str(run), "--data-dir", str(SUBSET), "--no-progress"])
        == 0
    )
    record = json.loads((run / "record.json").read_text())
    quant, distill = record["stages"]
    assert quant["info"]["calibration_split"] == "val"
    assert quant["info"]["calibration_images"] == 128
    floats, mixed = quant["info"]["float_layers"], quant["info"]["mixed_precision"]
    assert len(floats) == mixed["trace"][-1]["float_layers"] <= 1
    assert floats == quant["info"]["sensitivity"]["ranking"][: len(floats)]
    assert mixed["met_budget"] or len(floats) == 1
    assert record["final"]["precision"] == ("int8+fp32(1 layers)" if floats else "int8")
    feat = distill["info"]["feature_kd"]
    assert feat["student_graph"] and feat["points"] == [
        "net.features.0",
        "net.features.1",
        "net.features.2",
    ]
    kernels = record["final"]["runtimes"]["onnxruntime"]["kernels"]
    assert kernels.get("QLinearConv", 0) >= 3  # the quantized convs still fuse
    assert record["final"]["parity"]["top1_agreement"] >= 0.95
    capsys.readouterr()

    out = tmp_path / "sens"
    assert (
        main(
            [
                "sensitivity",
                str(recipe),
                f"baseline.checkpoint={run / 'baseline.safetensors'}",
                "--out",
                str(out),
                "--data-dir",
                str(SUBSET),
                "--no-progress",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    result = json.loads((out / "sensitivity.json").read_text())
    assert result["val_images"] == 128 and result["scheme"]["observer"] == "entropy"
    assert len(result["layers"]) == 7  # tiny_resnet: 6 convs (one a shortcut) + classifier
    assert result["ranking"][0] in printed.splitlines()[2]  # the table's first row
    assert "sensitivity.json" in printed


@pytest.mark.integration
def test_cli_sensitivity_rejects_an_empty_validation_split(tmp_path, capsys) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "data": {**RECIPE["data"], "val_size": 0}}))
    assert main(["sensitivity", str(recipe), "--data-dir", str(SUBSET), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "validation split" in err and len(err.strip().splitlines()) == 1
