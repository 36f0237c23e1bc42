"""Deployment targets: ``auto`` from the CPU flags, the weight range each target trains
with, the kernels in words, and the parity verdict of a measured artifact."""

from __future__ import annotations

from typing import Any

import pytest

from pqd.measurement.env import kernels_in_words
from pqd.recipe import recipe_from_dict
from pqd.target import assess, reduces_range, resolve

AVX2 = ["avx2"]
VNNI = ["avx2", "avx512f", "avx512_vnni", "avx512_bf16"]


def test_auto_follows_the_cpu_flags() -> None:
    assert resolve("auto", VNNI) == "x86-vnni"
    assert resolve("auto", ["avx2", "avx_vnni"]) == "x86-vnni"  # Alder Lake style VEX VNNI
    assert resolve("auto", AVX2) in ("x86-avx2", "portable")  # portable off x86
    for name in ("portable", "x86-avx2", "x86-vnni"):
        assert resolve(name, AVX2) == name
    with pytest.raises(ValueError, match="unknown target"):
        resolve("arm-sve", AVX2)


def test_only_the_vnni_target_trains_full_8bit_weights() -> None:
    assert reduces_range("portable") and reduces_range("x86-avx2")
    assert not reduces_range("x86-vnni")


def test_portable_is_the_recipe_default() -> None:
    recipe = recipe_from_dict({"model": {"name": "tiny_cnn"}})
    assert recipe.export.target == "portable" and recipe.export.parity_min_agreement == 0.99


def test_kernels_in_words_name_vnni_and_bf16() -> None:
    assert "saturate" in kernels_in_words(AVX2) and "emulated" in kernels_in_words(AVX2)
    words = kernels_in_words(VNNI)
    assert "with VNNI" in words and "bf16 in hardware" in words


def _artifact(agreement: float, pairs: int = 0, samples: int = 1000) -> dict:
    parity = {"samples": samples, "top1_agreement": agreement, "max_abs_logit_diff": 1.2}
    return {
        "runtimes": {"onnxruntime": {"parity": parity}},
        "saturation": {
            "pairs_at_risk": pairs,
            "layers": [],
            "checked_layers": 3,
            "max_pair_magnitude": 200 if pairs else 120,
        },
    }


def test_low_agreement_fails_parity_naming_the_runtime_and_figure() -> None:
    verdict = assess(_artifact(0.943), "portable", VNNI, 0.99)
    assert not verdict["parity_ok"]
    [line] = verdict["parity_problems"]
    assert "onnxruntime" in line and "94.30%" in line and "1000" in line
    assert assess(_artifact(0.995), "portable", VNNI, 0.99) == {
        "parity_ok": True,
        "parity_problems": [],
    }


def test_parity_fails_only_beyond_the_noise_of_its_images() -> None:
    """4 of 300 images disagreeing (98.67%, Wilson 95% CI 96.6-99.5%) is within noise of
    99%; 10 of 300 (96.67%, CI 94.0-98.2%) is below it; at 10,000 images 98.67% is too."""
    assert assess(_artifact(296 / 300, samples=300), "portable", VNNI, 0.99)["parity_ok"]
    verdict = assess(_artifact(290 / 300, samples=300), "portable", VNNI, 0.99)
    assert not verdict["parity_ok"] and "95% CI 93.97-98.18%" in verdict["parity_problems"][0]
    assert not assess(_artifact(0.9867, samples=10_000), "portable", VNNI, 0.99)["parity_ok"]
    # a strict minimum still fails on one image
    assert not assess(_artifact(299 / 300, samples=300), "portable", VNNI, 1.0)["parity_ok"]


def test_a_vnni_file_on_an_avx2_cpu_is_flagged_even_when_agreement_holds() -> None:
    verdict = assess(_artifact(1.0, pairs=40), "x86-vnni", AVX2, 0.99)
    assert not verdict["parity_ok"] and "x86-vnni" in verdict["parity_problems"][0]
    # the same file on a VNNI CPU is fine; a portable file with no risky pairs is fine anywhere
    assert assess(_artifact(1.0, pairs=40), "x86-vnni", VNNI, 0.99)["parity_ok"]
    assert assess(_artifact(1.0), "portable", AVX2, 0.99)["parity_ok"]
    # a file of unknown origin with saturating pairs, measured without VNNI
    verdict = assess(_artifact(1.0, pairs=3), None, AVX2, 0.99)
    assert not verdict["parity_ok"] and "3 weight pairs" in verdict["parity_problems"][0]


def targets_row(**numbers: Any) -> dict[str, Any]:
    """One target's row of the targets benchmark's JSON: ``numbers`` (accuracies) over a
    file at 0.3 ms, 3x faster than FP32, in full parity and without saturating pairs."""
    exact = {"top1_agreement": 1.0, "max_abs_logit_diff": 0.0}
    return {
        **numbers,
        "p50_ms": 0.3,
        "speedup": 3.0,
        "parity": exact,
        "saturation": {"pairs_at_risk": 0},
        "avx2_vs_native_openvino": exact,
    }


def test_targets_benchmark_compares_the_two_files_image_by_image() -> None:
    import numpy as np

    from helpers import load_benchmark
    from pqd.stats import compare_paired

    bench = load_benchmark("targets")
    y = np.arange(1000) % 10
    portable, vnni = y.copy(), y.copy()
    portable[:30] = (y[:30] + 1) % 10  # portable wrong on 30 images vnni gets right
    vnni[500:505] = (y[500:505] + 1) % 10  # and right on 5 it gets wrong
    c = compare_paired(portable, vnni, y)
    row = targets_row(
        accuracy=0.97, accuracy_ci=[0.96, 0.98], val_accuracy=0.9, baseline_accuracy=0.95
    )
    result = {
        "rows": {"portable": row, "x86-vnni": {**row, "accuracy": 0.995}},
        "paired": {**c.as_dict(), "verdict": c.verdict("portable", "8-bit")},
        "fp32_p50_ms": 0.9,
        "panels": {"fp32": {"panels": [0.9, 0.9, 0.9]}},
        "environment": {"cpu": "AMD EPYC", "cpu_flags": ["avx2"], "measure_threads": 2},
        "data": {"test": 1000},
    }
    text = bench.table(result)
    assert "| portable | 7-bit [-64, 63] | 97.00% [96.0, 98.0] |" in text
    assert "30 images only 8-bit gets right" not in text  # a is portable: its own count first
    assert "5 images only portable gets right, 30 only 8-bit" in text
    assert "8-bit better" in text and "McNemar p =" in text

    # the page: what ran, on which CPU, the JPEG caveat for image folders; --render redraws
    # it from the stored JSON alone
    result.update(
        walls_s={"portable": 10.0, "x86-vnni": 5.0},
        wall_s=20.0,
        name="cifar10",
        command="python benchmarks/targets.py --recipe recipes/cifar10.yaml",
        date="2026-12-07",
        pqd_version="0.1.0",
        folder_images=True,
    )
    page = bench.render(result)
    assert page.startswith("# Deployment targets: portable (7-bit) vs 8-bit, cifar10")
    assert "AMD EPYC (avx2); CIFAR-10 as JPEG files" in page and text in page
    assert "- wall seconds of each run (its record.json): portable 10 s, x86-vnni 5 s; " in page
    assert "this command 20 s" in page


def test_targets_benchmark_renders_its_page_from_the_stored_json(tmp_path, capsys) -> None:
    import json

    from helpers import load_benchmark

    bench = load_benchmark("targets")
    assert bench.main(["--results", str(tmp_path), "--render"]) == 2  # nothing stored yet
    assert "targets-quickstart.json not found; fix:" in capsys.readouterr().err
    row = targets_row(accuracy=0.8, val_accuracy=0.8, baseline_accuracy=0.8)
    stored = {
        "rows": {"portable": row, "x86-vnni": row},
        "paired": None,
        "fp32_p50_ms": 0.9,
        "panels": {"fp32": {"panels": [0.9]}},
        "environment": {"cpu": "AMD EPYC", "cpu_flags": ["avx2"], "measure_threads": 2},
        "data": {"test": 100},
        "walls_s": {"portable": 1.0},
        "wall_s": 2.0,
    }
    (tmp_path / "targets-quickstart.json").write_text(json.dumps(stored))
    assert bench.main(["--results", str(tmp_path), "--render"]) == 0
    page = (tmp_path / "targets-quickstart.md").read_text()
    assert "| portable | 7-bit [-64, 63] | 80.00% |" in page and "this command 2 s" in page


def test_targets_benchmark_reads_the_test_images_as_the_run_did(tmp_path) -> None:
    """An image folder at the recipe's image_size (not the folder default) and its splits:
    the AVX2 parity check feeds the files the images they were exported for."""
    import torch

    from helpers import load_benchmark, write_image_folder

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8, generator=g)
    labels = torch.arange(12) % 2
    for split in ("train", "test"):
        write_image_folder(tmp_path / "imgs" / split, images, labels, ["a", "b"], size=48)
    recipe = {
        "name": "r",
        "model": {"name": "tiny_cnn"},
        "data": {
            "dataset": "folder",
            "root": str(tmp_path / "imgs"),
            "image_size": 32,
            "val_size": 2,
        },
    }
    data = load_benchmark("targets").run_data({"recipe": recipe}, None)
    assert tuple(data.test_x.shape) == (12, 3, 32, 32) and len(data.val_y) == 2
