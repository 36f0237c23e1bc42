"""The audit beyond top-1: metrics by hand, and a small run whose record matches an
independent re-computation from the ONNX files' own outputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from helpers import load_benchmark, write_npz
from pqd.measurement import audit as audit_mod
from pqd.measurement.audit import (
    calibration,
    class_damage,
    corruption_errors,
    disagreement,
    per_class_accuracy,
    rapl_zones,
    reliability,
)


def test_ece_by_hand() -> None:
    # bin (0.6, 0.667]: confidences 0.62, 0.65 -> mean 0.635, 1 of 2 right (0.5) -> |0.135|
    # bin (0.933, 1]: 0.95, 0.99 -> mean 0.97, both right -> |0.03|
    conf = np.array([0.62, 0.65, 0.95, 0.99])
    ok = np.array([True, False, True, True])
    rel = reliability(conf, ok, 15)
    assert rel["ece"] == pytest.approx(0.5 * 0.135 + 0.5 * 0.03)
    assert sum(rel["bin_count"]) == 4 and rel["bin_count"][9] == 2 and rel["bin_count"][14] == 2
    assert rel["bin_accuracy"][0] is None
    # a confidence exactly on an edge goes to the lower bin; 0 to the first
    rel = reliability(np.array([0.0, 1 / 15, 1.0]), np.array([0, 1, 1]), 15)
    assert rel["bin_count"][0] == 2 and rel["bin_count"][14] == 1


def test_nll_and_brier_by_hand() -> None:
    logits = np.log(np.array([[0.7, 0.2, 0.1], [0.25, 0.5, 0.25]]))
    y = np.array([0, 2])
    cal = calibration(logits, y)
    assert cal["nll"] == pytest.approx(-(math.log(0.7) + math.log(0.25)) / 2)
    b0 = 0.3**2 + 0.2**2 + 0.1**2
    b1 = 0.25**2 + 0.5**2 + 0.75**2
    assert cal["brier"] == pytest.approx((b0 + b1) / 2)
    # first right at 0.7 (bin 10), second wrong at 0.5 (bin 7)
    assert cal["ece"] == pytest.approx(0.5 * 0.3 + 0.5 * 0.5)


def test_per_class_and_disagreement_by_hand() -> None:
    y = np.array([0, 0, 1, 1, 2, 2])
    base = np.array([0, 0, 1, 0, 2, 2])
    final = np.array([0, 1, 1, 1, 2, 0])
    names = ["cat", "dog", "eel"]
    pb, pf = per_class_accuracy(base, y, names), per_class_accuracy(final, y, names)
    assert pb == {"cat": 1.0, "dog": 0.5, "eel": 1.0}
    assert pf == {"cat": 0.5, "dog": 1.0, "eel": 0.5}
    dmg = class_damage(pb, pf)
    assert dmg["per_class_drop_points"] == {"cat": 50.0, "dog": -50.0, "eel": 50.0}
    assert dmg["largest_class_drop"]["points"] == 50.0
    d = disagreement(base, final, y, names)
    assert d["count"] == 3 and d["fraction"] == 0.5
    assert d["right_before"] == 2 and d["fixed"] == 1
    assert d["by_class"] == {"cat": 1, "dog": 1, "eel": 1}


def test_corruption_errors() -> None:
    base = {"accuracy": {"fog": [0.9, 0.8]}, "mean_accuracy": 0.85}
    final = {"accuracy": {"fog": [0.8, 0.6]}, "mean_accuracy": 0.70}
    ce = corruption_errors(base, final, clean_base=0.95, clean_final=0.9)
    assert ce["ce"]["fog"] == pytest.approx(0.6 / 0.3)
    # added errors: baseline 0.05 + 0.15 = 0.2; final 0.1 + 0.3 = 0.4
    assert ce["relative_ce"]["fog"] == pytest.approx(2.0)
    assert ce["mean_accuracy_drop_points"] == pytest.approx(15.0)


def test_rapl_reason_when_missing(tmp_path: Path) -> None:
    zones, why = rapl_zones(tmp_path / "nope")
    assert zones == {} and "does not exist" in why
    (tmp_path / "intel-rapl:0").mkdir()
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("123\n")
    (tmp_path / "intel-rapl:0:0").mkdir()  # a sub-zone: not counted
    zones, why = rapl_zones(tmp_path)
    assert list(zones) == ["intel-rapl:0"] and why is None


# ---------------------------------------------------------------- a small run, re-computed
def onnx_logits(path: Path, x_uint8: np.ndarray, batch: int) -> np.ndarray:
    """The file's logits straight from onnxruntime (no pqd code)."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    x = x_uint8.astype(np.float32) / 255.0
    return np.concatenate(
        [sess.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    )


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, Path]:
    from pqd.pipeline import run as pipeline_run
    from pqd.recipe import recipe_from_dict

    tmp = tmp_path_factory.mktemp("audit")
    write_npz(tmp / "data.npz")
    recipe = recipe_from_dict(
        {
            "name": "audit-test",
            "model": {"name": "tiny_cnn"},
            "data": {"dataset": "npz", "root": str(tmp), "val_size": 40, "download": False},
            "train": {"batch_size": 64, "lr": 0.05},
            "baseline": {"epochs": 1},
            "stages": [{"stage": "prune", "sparsity": 0.7, "epochs": 1}],  # (int8 export: +40 s)
            "measure": {
                "batch_sizes": [1, 4],
                "warmup": 2,
                "repeats": 20,
                "runtimes": ["onnxruntime"],
                "audit": True,
                "accuracy_batch_size": 16,
            },
        }
    )
    mp = pytest.MonkeyPatch()
    mp.setenv("PQD_CACHE_DIR", str(tmp / "cache"))
    mp.setattr(audit_mod, "PROBE_WINDOW_S", 0.4)
    try:
        record = pipeline_run(recipe, tmp / "run", data_dir=str(tmp), progress=False)
    finally:
        mp.undo()
    return tmp / "run", record, tmp


@pytest.mark.slow
def test_record_matches_an_independent_recomputation(small_run) -> None:
    out, record, tmp = small_run
    with np.load(tmp / "data.npz") as z:
        x, y = z["x_test"], z["y_test"]
    classes = [str(c) for c in range(10)]
    preds = {}
    for key in ("baseline", "final"):
        logits = onnx_logits(out / record[key]["artifact"], x, 16)
        preds[key] = logits.argmax(1)
        a = record[key]["audit"]
        assert a["accuracy"] == record[key]["accuracy"] == float((preds[key] == y).mean())
        for k, name in enumerate(classes):
            m = y == k
            assert a["per_class_accuracy"][name] == float((preds[key][m] == k).mean())
        # ECE over 15 equal bins of the top-1 softmax probability, written out here again
        z_ = logits.astype(np.float64)
        p = np.exp(z_ - z_.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        conf, right = p.max(1), p.argmax(1) == y
        ece = 0.0
        for lo, hi in zip(np.linspace(0, 1, 16)[:-1], np.linspace(0, 1, 16)[1:], strict=True):
            m = (conf > lo) & (conf <= hi)
            if m.any():
                ece += m.mean() * abs(right[m].mean() - conf[m].mean())
        assert a["calibration"]["ece"] == pytest.approx(ece, abs=1e-12)
    diff = preds["baseline"] != preds["final"]
    dis = record["final"]["audit"]["vs_baseline"]["disagreement"]
    assert dis["count"] == int(diff.sum()) and dis["fraction"] == float(diff.mean())
    assert dis["right_before"] == int((diff & (preds["baseline"] == y)).sum())
    assert record["comparison"]["disagreement"] == round(float(diff.mean()), 6)


def test_record_has_tails_corruptions_memory_and_energy(small_run) -> None:
    out, record, _ = small_run
    for key in ("baseline", "final"):
        lat = record[key]["latency_ms"]
        assert lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        a = record[key]["audit"]
        assert a["latency_ms_b1"]["p99"] == lat["batches"]["1"]["p99"]
        assert 0 < a["weight_bytes"] <= record[key]["size_bytes"]
        c = a["corruptions"]
        assert set(c["accuracy"]) == set(audit_mod.CORRUPTIONS)
        assert all(len(v) == 5 and all(0 <= s <= 1 for s in v) for v in c["accuracy"].values())
        assert c["mean_accuracy"] == pytest.approx(np.mean(list(c["accuracy"].values())))
        mem = a["memory"]
        assert mem["peak_rss_bytes"] > mem["rss_after_import_bytes"] > 10e6
        # the child's own peak, not its parent's (pytest + torch: far above 250 MB)
        assert 0 < mem["artifact_bytes"] < mem["peak_rss_bytes"] < 250e6
        assert mem["batches"] == [1, 4]
        e = a["energy"]
        assert e["cpu_s_per_inference"] > 0 and e["batches"]["1"]["calls"] > 0
        if not e["rapl"]["readable"]:  # this VM: null with the reason
            assert e["joules_per_inference"] is None and e["rapl"]["reason"]
    vs = record["final"]["audit"]["vs_baseline"]
    assert "mean_ce" in vs["corruption"]
    report = (out / "report.md").read_text()
    assert "## Audit: beyond top-1" in report and "### Corruptions" in report
    for png in ("audit_per_class.png", "audit_corruptions.png", "audit_reliability.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG" and f"]({png})" in report


def test_pqd_audit_rewrites_the_record(small_run, capsys) -> None:
    from pqd.cli import main

    out, record, tmp = small_run
    before = json.loads((out / "record.json").read_text())
    del before["final"]["audit"], before["baseline"]["audit"]
    for key in ("baseline", "final"):  # a record from before p99 existed
        del before[key]["latency_ms"]["batches"]["1"]["p99"]
    (out / "record.json").write_text(json.dumps(before))
    assert main(["audit", str(out), "--cheap", "--no-progress", "--data-dir", str(tmp)]) == 0
    assert "ECE (15 bins)" in capsys.readouterr().out
    after = json.loads((out / "record.json").read_text())
    for key in ("baseline", "final"):
        a, r = after[key]["audit"], record[key]["audit"]
        assert a["per_class_accuracy"] == r["per_class_accuracy"]
        assert a["calibration"]["ece"] == r["calibration"]["ece"]
        assert "corruptions" not in a  # --cheap
        assert a["latency_ms_b1"]["source"] == "re-timed by pqd audit"
        assert a["latency_ms_b1"]["p50"] <= a["latency_ms_b1"]["p99"] <= a["latency_ms_b1"]["max"]
    assert (
        after["final"]["audit"]["vs_baseline"]["disagreement"]
        == record["final"]["audit"]["vs_baseline"]["disagreement"]
    )


def test_pqd_audit_on_a_folder_without_record(tmp_path: Path, capsys) -> None:
    from pqd.cli import main

    code = main(["audit", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "record.json does not exist" in err[0]
    assert "fix:" in err[0]


def test_benchmark_table_of_an_audited_run(small_run, capsys) -> None:
    out, record, _ = small_run
    bench = load_benchmark("audit")
    text = bench.render(record)
    vs = record["final"]["audit"]["vs_baseline"]
    assert f"{vs['disagreement']['count']}/40" in text
    assert "peak memory, fresh process (MB)" in text and "CPU-ms per inference" in text
    assert record["environment"]["cpu"] in text
    assert bench.main(["--run", str(out / "missing")]) == 2
    assert "record.json does not exist" in capsys.readouterr().err


def test_search_reads_a_trials_audit(small_run) -> None:
    from pqd.search.summary import audit_summary

    _, record, _ = small_run
    s = audit_summary(record)
    vs = record["final"]["audit"]["vs_baseline"]
    assert s["worst_class_drop_points"] == vs["largest_class_drop"]["points"]
    assert s["disagreement"] == vs["disagreement"]["fraction"]
    assert s["corruption_accuracy"] == record["final"]["audit"]["corruptions"]["mean_accuracy"]
    assert audit_summary({"final": {}}) is None  # a record from before the audit


def test_a_per_class_drop_prints_as_a_drop() -> None:
    """A class that lost 4.35 points reads -4.35, never +4.35 (the record keeps drops as
    positive points); a gain reads +, no change 0.00."""
    from pqd.report_audit import audit_section, change_text, class_rows, search_audit_lines

    assert change_text(4.35) == "-4.35" and change_text(-1.2) == "+1.20"
    assert change_text(0.0) == change_text(-0.001) == "0.00"
    per_class = {"cat": 0.8, "dog": 0.9}
    final = {
        "per_class_accuracy": {"cat": 0.7565, "dog": 0.91},
        "vs_baseline": {
            "per_class_drop_points": {"cat": 4.35, "dog": -1.0},
            "largest_class_drop": {"class": "cat", "points": 4.35},
            "disagreement": {
                "count": 3,
                "images": 100,
                "fraction": 0.03,
                "right_before": 2,
                "fixed": 1,
                "by_class": {"cat": 2},
            },
        },
    }
    rec = {"baseline": {"audit": {"per_class_accuracy": per_class}}, "final": {"audit": final}}
    rows = {r[0]: r[3] for r in class_rows(rec)}
    assert rows == {"cat": "-4.35", "dog": "+1.00"}
    text = "\n".join(audit_section(rec))
    assert "**-4.35 points (cat)**" in text and "+4.35" not in text
    assert "change (points)" in text
    search = {
        "groups": [
            {
                "id": "g",
                "kind": "permutation",
                "label": "P -> Q",
                "n": 1,
                "accuracy_mean": 0.8,
                "audit": {
                    "worst_class_drop_points": 4.35,
                    "worst_class": "cat",
                    "disagreement": 0.03,
                    "ece": 0.01,
                    "corruption_accuracy": 0.5,
                },
            }
        ],
        "ranking": ["g"],
    }
    text = "\n".join(search_audit_lines(search))
    assert "-4.35 (cat)" in text and "+4.35" not in text
