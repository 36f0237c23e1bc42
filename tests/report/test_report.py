"""Report texts: speed and accuracy phrases, plurals, stage notes, the parity and speed
notes under the summary, and labels in the plots that never overlap."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from pqd.progress import plural
from pqd.report import points_text, render_markdown, seconds_text, speed_text
from pqd.report.plots import place_labels
from pqd.report.text import notes_text


def test_speed_and_points_phrases() -> None:
    assert speed_text(0.84) == "1.19x slower" and speed_text(2.07) == "2.07x faster"
    assert speed_text(1.0) == "1.00x faster"
    assert points_text(-0.001) == "0.00 points" and points_text(-0.0) == "0.00 points"
    assert points_text(0.25) == "+0.25 points" and points_text(-1.5) == "-1.50 points"
    assert plural(1, "epoch") == "1 epoch" and plural(2, "epoch") == "2 epochs"


def test_a_continued_runs_time_counts_every_process() -> None:
    assert seconds_text({"total": 412.3}) == "412 s"  # a record from before all_processes
    assert seconds_text({"total": 412.3, "all_processes": 412.3}) == "412 s"
    one = {"total": 2674.0, "all_processes": 7310.4}
    assert seconds_text(one) == "7,310 s over several processes (2,674 s since the last start)"


def test_stage_notes_are_text_not_a_python_dict() -> None:
    info = {
        "calibration_split": "val",
        "scheme": {"mode": "qat", "float_layers": []},
        "precision": "int8",
    }
    text = notes_text(info)
    assert "{" not in text and "[" not in text and "'" not in text
    assert text == "calibration_split=val; scheme: mode=qat, float_layers=none; precision=int8"


def record(
    speedup: float = 0.84,
    drop: float = 0.001,
    p50: float = 1.0,
    p90: float = 1.5,
    kernels: dict[str, int] | None = None,
) -> dict[str, Any]:
    """A run record with what render_markdown reads."""
    lat = {"p50": p50, "p90": p90, "mean": p50, "batches": {"1": {"p50": p50}}}
    rt = {
        "version": "1.0",
        "accuracy": 0.5,
        "latency_ms": lat,
        "parity": {"top1_agreement": 0.995},
        "kernels": kernels or {},
    }
    art = {
        "precision": "int8",
        "accuracy": 0.5,
        "size_bytes": 1e6,
        "latency_ms": lat,
        "sparsity": 0.0,
        "macs": 1e6,
        "bitops": 1e9,
        "runtime": "onnxruntime",
        "runtimes": {"onnxruntime": rt},
    }
    base = {
        **copy.deepcopy(art),
        "precision": "fp32",
        "latency_ms": {**lat, "p50": 1.0, "p90": 1.1},
    }
    return {
        "name": "r",
        "order": ["quantize"],
        "recipe": {"model": {"name": "m"}},
        "seed": 0,
        "data": {"name": "d", "train": 1, "val": 1, "test": 1},
        "environment": {
            "measure_threads": 2,
            "cpu": "x",
            "logical_cpus": 2,
            "cpu_flags": [],
            "libraries": {},
        },
        "comparison": {
            "speedup_batch1_p50": speedup,
            "size_ratio": 4.0,
            "accuracy_drop_points": drop,
        },
        "baseline": base,
        "final": art,
        "stages": [
            {
                "index": 0,
                "name": "quantize",
                "config": {"epochs": 1},
                "seconds": 1.0,
                "val_accuracy": 0.5,
                "info": {"scheme": {"mode": "qat"}},
            }
        ],
        "timing_s": {k: 1.0 for k in ("baseline", "stages", "export", "measure", "total")},
    }


def test_report_explains_slow_int8_parity_and_noise() -> None:
    kernels = {
        "QLinearConv": 10,
        "Conv": 3,
        "QuantizeLinear": 4,
        "DequantizeLinear": 5,
        "Transpose": 2,
    }
    md = render_markdown(record(speedup=0.84, drop=0.001, p50=1.0, p90=2.5, kernels=kernels))
    assert "1.19x slower at batch 1" in md and "0.84x faster" not in md
    assert "accuracy 0.00 points" in md and "-0.00" not in md
    assert "INT8 is not faster here" in md
    assert "10 INT8 convs, 3 float convs, 4 Q/DQ pairs, 2 transposes" in md
    assert "p90 of final is more than 2x its p50" in md
    assert "Top-1 agreement:" in md and "99% or more is normal" in md
    assert "scheme: mode=qat" in md and "{'" not in md
    calm = render_markdown(record(speedup=2.0, p50=1.0, p90=1.2, kernels=kernels))
    assert "2.00x faster" in calm and "INT8 is not faster" not in calm
    assert "more than 2x its p50" not in calm


def test_labels_of_points_sharing_a_size_do_not_overlap() -> None:
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [2.0] * 12 + [8.0]
    ys = [0.80 + 0.001 * i for i in range(12)] + [0.5]
    ax.scatter(xs, ys)
    labels = [f"prune -> quantize -> distill s{i}" for i in range(13)]
    place_labels(ax, xs, ys, labels)
    fig.canvas.draw()
    boxes = [t.get_window_extent() for t in ax.texts]
    assert len(boxes) == 13
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert not a.overlaps(b)
    plt.close(fig)


def test_report_names_the_fastest_runtime_per_batch_and_float_ops() -> None:
    from pqd.measurement.artifacts import fastest_runtimes

    rec = record()
    final = rec["final"]

    def lat(p1: float, p64: float) -> dict[str, Any]:
        return {"batches": {"1": {"p50": p1}, "64": {"p50": p64}}, "p50": p1, "p90": p1}

    ov = copy.deepcopy(final["runtimes"]["onnxruntime"])
    final["runtimes"]["onnxruntime"]["latency_ms"] = lat(1.0, 30.0)
    final["runtimes"]["onnxruntime"]["settings"] = {"intra_op_threads": 2}
    final["runtimes"]["onnxruntime"]["float_ops"] = [
        {"op": "HardSigmoid", "count": 2, "why": "no integer HardSwish kernel"}
    ]
    final["runtimes"]["onnxruntime"]["transposes"] = 2
    ov["latency_ms"], ov["settings"] = lat(0.8, 35.0), {"threads": 2, "static_batch": 1}
    final["runtimes"]["openvino"] = ov
    fastest = fastest_runtimes(final["runtimes"])
    assert fastest["1"]["runtime"] == "openvino" and fastest["1"]["p50_ms"] == 0.8
    assert fastest["64"]["runtime"] == "onnxruntime"
    assert fastest["1"]["settings"] == {"threads": 2, "static_batch": 1}
    assert fastest["64"]["others_p50_ms"] == {"openvino": 35.0}
    final["fastest"] = fastest
    md = render_markdown(rec)
    assert "Deploy with openvino" in md  # ties go to batch 1's winner
    assert "batch 1 (openvino 0.800 ms vs onnxruntime 1.000)" in md
    assert "64 (onnxruntime 30.000 ms vs openvino 35.000)" in md
    assert "HardSigmoid x2 (no integer HardSwish kernel); 2 layout transposes" in md
    final["fastest"]["1"] = {**fastest["64"], "p50_ms": 0.5}
    assert "Deploy with onnxruntime" in render_markdown(rec)


def test_run_folder_gets_report_html_like_search_and_plan(tmp_path, capsys, monkeypatch) -> None:
    """write_record (pqd run, pqd audit) and pqd report write a self-contained report.html
    beside report.md: the same text, the plots it links embedded."""
    import base64
    import json

    from pqd.cli import main
    from pqd.record import write_record

    rec = record()
    write_record(rec, tmp_path)
    md = (tmp_path / "report.md").read_text()
    page = (tmp_path / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<title>pqd run: r</title>" in page
    assert "<table>" in page and "onnxruntime" in page

    png = b"\x89PNG\r\n\x1a\nfake"
    (tmp_path / "p.png").write_bytes(png)
    (tmp_path / "report.html").unlink()
    (tmp_path / "record.json").write_text(json.dumps(rec))
    import pqd.report

    orig = pqd.report.render_markdown
    monkeypatch.setattr(pqd.report, "render_markdown", lambda r: orig(r) + "\n![a plot](p.png)\n")
    assert main(["report", str(tmp_path)]) == 0
    assert md.splitlines()[0] in capsys.readouterr().out
    page = (tmp_path / "report.html").read_text()
    assert base64.b64encode(png).decode() in page  # embedded, not linked


def test_parity_failed_says_what_it_means_and_the_threshold() -> None:
    from pqd.report import parity_failed_text

    problem = (
        "onnxruntime: the file agrees with its torch model on only 98.67% of 300 test "
        "images (max |logit diff| 2.1; expected >= 99%)"
    )
    groups = [
        {"id": "a", "kind": "permutation", "label": "P -> Q", "n": 1, "parity_ok": True},
        {
            "id": "b",
            "kind": "permutation",
            "label": "Q -> P",
            "n": 1,
            "parity_ok": False,
            "parity_problems": [problem],
        },
    ]
    search = {"groups": groups, "ranking": ["a", "b"]}
    text = parity_failed_text(search)
    assert text.startswith("PARITY FAILED: ")
    assert "share of test images whose top-1 class differs between the file and the torch" in text
    assert "export.parity_min_agreement (default 0.99, so 1%)" in text
    assert f"Q -> P: {problem}" in text and "P -> Q" not in text
    groups[1]["parity_ok"] = True
    assert parity_failed_text(search) == ""
