"""Smoke tests of benchmarks/runtime.py: the GEMM floor, the table, the runtime check."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import fake_latency, load_benchmark

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("runtime")


def test_gemm_peaks_and_floor_are_positive(bench):
    peaks = bench.gemm_peaks(threads=1, sizes=(32, 64), repeats=2, warmup=1, min_time_s=0.0)
    assert peaks["int8"] > 0 and peaks["fp32"] > 0
    assert peaks["int8_size"] in (32, 64) and set(peaks["by_size"]) == {32, 64}
    floors = bench.floors_ms(555_000_000, peaks)
    assert floors["int8"] > 0 and floors["fp32"] > 0
    assert floors["ratio"] == pytest.approx(peaks["int8"] / peaks["fp32"])


def test_missing_runtime_exits_nonzero_with_one_line(bench, monkeypatch, capsys):
    import pqd.measurement.runtime as rt

    monkeypatch.setattr(rt, "available_runtimes", lambda: ["onnxruntime"])
    assert bench.main(["--runtimes", "openvino"]) != 0
    err = capsys.readouterr().err.strip()
    assert "openvino is not installed" in err and len(err.splitlines()) == 1


def test_table_renders_every_row(bench):
    row = {
        "p50": 2.0,
        "p90": 2.5,
        "speedup_vs_eager": 7.0,
        "max_abs_logit_diff": 0.01,
        "round_p50s": [1.9, 2.1],
    }
    result = {
        "rows": [
            {
                **row,
                "path": "FP32 eager NCHW",
                "speedup_vs_fp32_same_runtime": None,
                "x_floor": None,
            },
            {
                **row,
                "path": "INT8 ONNX onnxruntime",
                "speedup_vs_fp32_same_runtime": 3.5,
                "x_floor": 1.3,
            },
        ],
        "eager_reference": "FP32 eager NCHW",
        "ref_logit_absmax": {"fp32": 1.0},
        "model": "resnet18",
        "macs": 555_000_000,
        "params": 11_170_000,
        "samples": 300,
        "rounds": 10,
        "warmup": 50,
        "threads": 2,
        "switch_pause_ms": 100.0,
        "peaks": {"threads": 2, "int8": 400.0, "int8_size": 512, "fp32": 100.0, "fp32_size": 256},
        "floors_ms": {"int8": 1.39, "fp32": 5.55, "ratio": 4.0},
        "environment": {
            "cpu": "CPU",
            "cpu_flags": ["avx2"],
            "logical_cpus": 2,
            "libraries": {"torch": "2", "onnxruntime": "1"},
        },
        "other_load_cores": {"latency": 0.0, "gemm": 0.0},
        "wall_s": 60.0,
    }
    text = bench.table(result)
    assert "FP32 eager NCHW *" in text and "INT8 ONNX onnxruntime" in text
    assert "3.50x" in text and "1.90-2.10" in text
    assert max(map(len, text.splitlines())) <= 96 and "floor ratio (fp32/int8) 4.00x" in text
    flat = " ".join(line.strip() for line in text.splitlines())
    assert (
        "vs FP32 eager 7.00x (>= 8x: NOT met); vs its FP32 file 3.50x (>= 3.5x: met); "
        "x INT8 floor 1.30 (<= 1.5: met)"
    ) in flat
    # eager p50 2.0 ms / 8 = 0.25 ms, 0.18x the 1.39 ms floor
    assert "needs an INT8 p50 <= 0.25 ms here = 0.18x the INT8 floor" in flat


@pytest.mark.slow
def test_vit_int8_benchmark_times_both_files_and_names_the_integer_kernels(tmp_path):
    import json

    module = load_benchmark("vit_int8")
    out = tmp_path / "vit.json"
    args = ["--model", "vit_tiny", "--batches", "1", "4", "--repeats", "4", "--rounds", "2"]
    assert module.main([*args, "--profile", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["latency_ms"]) == {"1", "4"}
    for by_arm in result["latency_ms"].values():
        assert set(by_arm) == {"fp32", "int8"}
        assert all(0 < v["min"] <= v["p50"] for v in by_arm.values())
    int8, fp32 = result["files"]["int8"], result["files"]["fp32"]
    # vit_tiny: 2 blocks of 4 linears + the head; 2 attention matmuls per block; 3 tokenizer convs
    assert int8["integer"] == {
        "QGemm": 9,
        "QLinearMatMul": 2,
        "MatMulIntegerToFloat": 2,
        "QLinearConv": 3,
    }
    assert int8["float"] == {} and fp32["integer"] == {} and fp32["float"]["Gemm"] == 9
    assert "QGemm" in result["profile_ms"]["int8"] and "Gemm" in result["profile_ms"]["fp32"]
    assert result["environment"]["cpu"]


# the whole CIFAR-10 as JPEG folders: beside the checkout, or beside the subset that
# $PQD_DATA_DIR names (as .ci/run finds it for a clone elsewhere)
JPG = next(
    (
        p
        for p in (
            ROOT.parent / "shared" / "data" / "cifar-10-jpg",
            Path(os.environ.get("PQD_DATA_DIR") or ROOT).parent / "cifar-10-jpg",
        )
        if (p / "train").is_dir()
    ),
    ROOT.parent / "shared" / "data" / "cifar-10-jpg",
)


@pytest.mark.integration
@pytest.mark.skipif(not (JPG / "train").is_dir(), reason="the whole CIFAR-10 as JPEG is absent")
def test_headline_runs_the_full_scale_recipe_on_a_few_hundred_folder_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The full-scale recipe's code path (image folders, carved validation, the official test
    folder, every stage, both runtimes' statistics) on 400 train and 300 test JPEGs."""
    import json

    monkeypatch.setenv("PQD_CACHE_DIR", str(tmp_path / "cache"))
    bench = load_benchmark("headline")
    small = [
        "data.limit_train=400",
        "data.limit_test=300",
        "data.val_size=100",
        "baseline.epochs=1",
        "stages.0.epochs=1",
        "stages.2.epochs=1",
        "measure.runtimes=[onnxruntime]",
        "measure.batch_sizes=[1,8]",
    ]
    args = ["--out", str(tmp_path / "run"), "--results", str(tmp_path / "res")]
    assert bench.main([*args, "--data-dir", str(JPG), *small]) == 0
    s = json.loads((tmp_path / "res" / "cifar10.json").read_text())
    assert s["data"]["train"] == 300 and s["data"]["val"] == 100 and s["data"]["test"] == 300
    assert s["order"] == ["prune", "quantize", "distill"]
    final = s["artifacts"]["final"]["runtimes"]["onnxruntime"]
    lo, hi = final["accuracy_ci"]
    assert lo < final["accuracy"] < hi and hi - lo > 0.05  # 300 images: a wide interval
    p = s["paired"]
    assert p["n"] == 300 and p["ci_low"] <= p["difference"] <= p["ci_high"]
    assert s["speedup"]["onnxruntime"]["1"] > 0 and set(s["seconds"]) >= {"baseline", "export"}
    page = (tmp_path / "res" / "cifar10.md").read_text()
    assert "JPEG files" in page and "McNemar p =" in page and s["cpu"] in page
    assert "`fastnet_q8` (plan: [24, 64, M, 64, 256, M, 256, 256, M, 256])" in page  # as built
    # the page is rendered from the JSON alone
    (tmp_path / "res" / "cifar10.md").unlink()
    assert bench.main(["--render", "--results", str(tmp_path / "res")]) == 0
    assert (tmp_path / "res" / "cifar10.md").read_text() == page


def test_latency_model_benchmark_counts_candidates_within_ten_percent(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    subset_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The benchmark's share within +-10% is the share of its own candidates' errors, inside
    its Wilson interval; the page comes back from the JSON alone; -n 0 is one line. Times
    are MACs-based with noisy pieces (real timing of pieces and whole candidates:
    tests/latency_model/test_latency_model.py), so that predictions miss by a few to tens
    of percent."""
    import json

    fake_latency(monkeypatch, noise=0.3)
    bench = load_benchmark("latency_model")
    res = tmp_path / "res"
    args = ["--quick", "-n", "3", "--recipe", str(ROOT / "recipes" / "quickstart.yaml")]
    args += ["--data-dir", str(subset_dir), "--cache-dir", str(tmp_path / "cache")]
    assert bench.main([*args, "--results", str(res)]) == 0
    s = json.loads((res / "latency-model-quickstart.json").read_text())
    v = s["validation"]
    assert v["n"] == len(v["candidates"]) == 3
    errors = [c["error"] for c in v["candidates"]]
    assert v["within_10"] == sum(e <= 0.10 for e in errors) / 3
    assert v["within_10_ci"][0] <= v["within_10"] <= v["within_10_ci"][1]
    assert v["median_error"] == pytest.approx(sorted(errors)[1])
    assert all(c["measured_ms"] > 0 and c["predicted_ms"] > 0 for c in v["candidates"])
    # two panels by default: the measured p50 is their median, and how often they agree
    assert v["panels"] == 2 and all(len(c["panels_ms"]) == 2 for c in v["candidates"])
    for c in v["candidates"]:
        assert c["measured_ms"] == pytest.approx(sum(c["panels_ms"]) / 2, abs=1e-5)
    agree = sum(abs(b / a - 1) <= 0.10 for a, b in (c["panels_ms"] for c in v["candidates"]))
    assert v["panel_agreement"] == agree / 3
    page = (res / "latency-model-quickstart.md").read_text()
    assert "the measurement itself: panel 2 vs panel 1" in page
    assert s["cpu"] in page and "nn-Meter" in page and f"of {v['n']})" in page
    (res / "latency-model-quickstart.md").unlink()
    assert bench.main(["--render", "--results", str(res), "--quick", *args[3:5]]) == 0
    assert (res / "latency-model-quickstart.md").read_text() == page
    capsys.readouterr()
    assert bench.main(["-n", "0"]) == 2
    assert capsys.readouterr().out.count("error: -n must be at least 1; fix:") == 1


def test_train_speed_page_renders_ratios_against_float_from_its_json() -> None:
    bench = load_benchmark("train_speed")
    steps = {
        "float": {"images_per_s": 400.0, "bf16": True, "vs_float": 1.0, "of_peak": 0.9},
        "qat": {"images_per_s": 300.0, "bf16": True, "vs_float": 1.33, "of_peak": 0.6},
    }
    result = {
        "command": "python benchmarks/train_speed.py",
        "date": "2026-12-06",
        "pqd_version": "0.1.0",
        "torch": "2.13.0+cpu",
        "cpu": "AMD EPYC",
        "cpu_flags": ["avx2", "avx512_bf16"],
        "threads": 2,
        "batch": 128,
        "batches": 6,
        "rounds": 3,
        "images": "real CIFAR-10 training images, 32 px",
        "peak_gflops": {"fp32": 160.0, "bf16": 370.0},
        "loader_images_per_s": 2e5,
        "models": [{"model": "fastnet_q8", "steps": steps}],
    }
    steps["qat"]["spread"] = 0.05
    page = bench.render(result)
    assert "| fastnet_q8 | qat | 300 | 1.33x | 60.0% | bf16 | 5% |" in page
    assert "| fastnet_q8 | float | 400 | 1.00x | 90.0% | bf16 | - |" in page
    assert "3 interleaved rounds" in page and "AMD EPYC (avx2, avx512_bf16)" in page
    once = bench.render({**result, "rounds": None})  # one round measures no spread: no column
    assert "| fastnet_q8 | qat | 300 | 1.33x | 60.0% | bf16 |\n" in once
    assert "spread |" not in once


def test_the_readme_headline_is_the_one_the_benchmark_writes_from_its_json() -> None:
    """README's results table is generated (benchmarks/headline.py --render), never typed."""
    import json

    bench = load_benchmark("headline")
    root = Path(__file__).resolve().parents[2]
    summary = json.loads((root / "docs" / "results" / "cifar10.json").read_text())
    readme = (root / "README.md").read_text(encoding="utf-8")
    assert bench.readme_block(summary) in readme, "run: python benchmarks/headline.py --render"
    assert bench.render(summary) == (root / "docs" / "results" / "cifar10.md").read_text()


def test_the_headline_page_says_which_steps_continued_and_what_their_seconds_count() -> None:
    import json

    bench = load_benchmark("headline")
    root = Path(__file__).resolve().parents[2]
    summary = json.loads((root / "docs" / "results" / "cifar10.json").read_text())
    whole = bench.render({**summary, "continued": {}})
    assert "Stopped and continued" not in whole
    kept = bench.render({**summary, "continued": {"00-baseline": 40}, "carried": True})
    assert "Stopped and continued: 00-baseline after epoch 40 (its seconds include" in kept
    last = bench.render({**summary, "continued": {"01-prune": 1}, "carried": False})
    assert "01-prune after epoch 1 (its seconds count the last process only)" in last
    # a run over several processes: its whole time beside this command's
    several = bench.render({**summary, "wall_s": 3738.0, "run_s": 9100.4})
    assert "; the run 9,100 s over every process that worked on it; this command 3738 s." in several
    assert "over every process" not in bench.render({**summary, "run_s": 3739.0})


@pytest.mark.parametrize(
    ("name", "extra"),
    [("headline", ["--render"]), ("targets", ["--render"]), ("jpeg_cost", ["--results", "."])],
)
def test_a_benchmark_given_a_missing_recipe_says_so_in_one_line(
    name, extra, tmp_path, capsys, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    bench = load_benchmark(name)
    assert bench.main(["--recipe", str(tmp_path / "none.yaml"), *extra]) == 2
    assert not list(tmp_path.iterdir())  # nothing written
    err = capsys.readouterr().err.strip()
    assert err == f"benchmarks/{name}.py: error: recipe {str(tmp_path / 'none.yaml')!r} " + (
        "does not exist; fix: give the path of a YAML recipe"
    )
