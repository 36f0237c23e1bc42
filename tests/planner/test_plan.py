"""pqd plan: refusals in one line, candidates, real training of the best few through the
pipeline, the pick, its reproducible recipe, resume. Latencies come from a MACs-based fake
(helpers.fake_latency) so budgets are exact on a shared machine; the latency model's own
measurements are tested in test_latency_model.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import fake_latency, tiny
from pqd.cli import main
from pqd.latency_model.model import LatencyModel
from pqd.planner import plan
from pqd.planner.candidates import generate, search_levels
from pqd.planner.latency import ratio_steps, recalibrated
from pqd.planner.template import template
from pqd.recipe import load_recipe, recipe_from_dict

TINY = """\
name: tiny-plan
model: {name: tiny_cnn}
data: {dataset: cifar10, val_size: 64, limit_train: 256, limit_test: 64}
train: {batch_size: 32, lr: 0.05, amp: "off"}
baseline: {epochs: 1}
stages:
  - {stage: prune_channels, ratio: 0.5, round_to: 2, epochs: 1}
  - {stage: quantize, mode: qat, epochs: 1}
export: {parity_samples: 32}
measure: {runtimes: [onnxruntime], batch_sizes: [1], warmup: 2, repeats: 10}
"""


@pytest.fixture()
def recipe_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


def test_template_gets_a_prune_channels_stage_and_the_target() -> None:
    r = recipe_from_dict({"model": {"name": "tiny_cnn"}, "stages": [{"stage": "distill"}]})
    data, index, precision = template(r, "onnxruntime", 4)
    assert index == 0 and data["stages"][0]["stage"] == "prune_channels"
    assert precision == "fp32" and data["measure"]["threads"] == 4
    r = recipe_from_dict(
        {
            "model": {"name": "tiny_cnn"},
            "stages": [{"stage": "quantize"}, {"stage": "prune_channels", "ratio": 0.5}],
        }
    )
    data, index, precision = template(r, "onnxruntime", 2)
    assert index == 1 and precision == "int8" and "ratio" not in data["stages"][1]
    with pytest.raises(Exception, match="early-exit"):
        template(
            recipe_from_dict({"model": {"name": "tiny_cnn"}, "stages": [{"stage": "early_exit"}]}),
            "onnxruntime",
            2,
        )


def test_candidates_cover_uniform_greedy_and_random(monkeypatch, tmp_path) -> None:
    fake_latency(monkeypatch)
    lm = LatencyModel(
        tiny("tiny_resnet"), torch.rand(2, 3, 32, 32), round_to=2, cache_dir=tmp_path
    ).build()
    cands = generate(lm, lambda r: sum(r.values()), n_random=20, seed=0)
    keys = [tuple(sorted(c.items())) for c in cands]
    assert len(keys) == len(set(keys))  # deduplicated
    levels = search_levels(lm.levels)
    for v in levels:  # every uniform candidate
        assert lm.uniform(v) in cands
    for r in ratio_steps(0.9):  # and uniform at 0.05 steps, down to the table's lowest level
        assert (lm.uniform(1 - r) in cands) == (1 - r >= levels[0] - 1e-9)
    mixed = [c for c in cands if len(set(c.values())) > 1]
    assert mixed and all(
        1 - r in [pytest.approx(v) for v in levels] for c in mixed for r in c.values()
    )


def error_line(err: str) -> str:
    """The one error line of a refusal: the last line, the only one saying ``error``, and
    every line before it a phase line of the plan."""
    lines = err.strip().splitlines()
    assert lines[-1].startswith("pqd: error: ") and "Traceback" not in err, err
    assert all(line.startswith("pqd plan: ") for line in lines[:-1]), err
    return lines[-1]


def test_refusals_are_one_line_and_write_nothing(monkeypatch, tmp_path, recipe_file, capsys):
    fake_latency(monkeypatch)
    monkeypatch.setenv("PQD_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "plan"
    args = ["plan", str(recipe_file), "--out", str(out), "--validate", "0", "--no-progress"]
    assert main([*args, "--latency-ms", "50"]) == 2
    err = error_line(capsys.readouterr().err)  # after the phase lines (what it measured)
    assert "already met by the dense INT8 model (measured p50" in err and "fix:" in err
    assert main([*args, "--latency-ms", "0.001"]) == 2
    err = error_line(capsys.readouterr().err)
    assert "below every candidate: the fastest measured" in err
    fastest = float(err.split("runs in ")[1].split(" ms")[0])
    assert fastest > 0.001 and f"--latency-ms {fastest:.3f}" in err
    assert not out.exists()


@pytest.mark.integration
def test_plan_trains_the_best_few_picks_within_budget_and_resumes(
    monkeypatch, tmp_path, recipe_file, subset_dir
) -> None:
    calls = fake_latency(monkeypatch)
    out = tmp_path / "plan"
    kwargs = {
        "k": 2,
        "validate": 2,
        "n_random": 40,
        "levels": (0.5, 1.0),
        "data_dir": str(subset_dir),
        "cache_dir": tmp_path / "cache",
        "progress": False,
    }
    budget = 0.095  # fake ms: dense tiny_cnn 0.13, every group at half width about 0.05
    result = plan(load_recipe(recipe_file), budget, out, **kwargs)
    c = result["counts"]
    trained = result["trained"]
    refs = [e for e in trained if e.get("uniform_reference") is not None]
    assert len(refs) == 1 and len(trained) in (2, 3)  # k planned (or fewer) + the reference
    assert set(refs[0]["ratios"].values()) == {refs[0]["uniform_reference"]}
    assert refs[0]["premeasured_ms"] <= budget * 1.05  # measured whole, like a user would
    planned = [e for e in trained if e.get("uniform_reference") is None]
    assert all(e["premeasured_ms"] <= budget * 1.05 for e in planned)
    abn = [e["abn_loss"] for e in planned]  # ranked by their adaptive-BN validation loss
    assert abn == sorted(abn) and all(0 <= e["abn_accuracy"] <= 1 for e in planned)
    sens = json.loads((out / "sensitivity.json").read_text())["value"]
    assert set(sens["groups"]) == set(result["candidates"][0]["ratios"])
    assert all(e["estimated_loss"] >= sens["dense"] for e in trained)
    assert result["latency_model"]["near_budget_scale"] > 0
    assert (
        c["trained"] == c["trained_now"] == len(trained)
        and c["estimated"] > 2
        and 2 <= c["feasible"] <= c["estimated"]
    )
    assert all(
        row["calibrated_ms"] <= budget
        for row in result["candidates"]
        if row["feasible"] and row.get("uniform_reference") is None
    )
    pick = result["pick"]
    assert pick is not None and pick["measured_ms"] <= budget * 1.05
    done = [e for e in result["trained"] if e["status"] == "done"]
    rule = result["pick_rule"]  # a planned pick only beyond noise over the uniform reference
    beyond = {c["dir"] for c in rule["validation_vs_uniform"] if c["beyond_noise"]}
    if beyond:
        assert pick["dir"] in beyond
        assert pick["val_accuracy"] == max(e["val_accuracy"] for e in done if e["dir"] in beyond)
    else:
        assert pick.get("uniform_reference") is not None
        assert rule["rule"].startswith("uniform reference")
    assert len(rule["validation_vs_uniform"]) == len(done) - 1
    assert result["dense_ms"] > budget > result["fastest_ms"]
    assert result["latency_model"]["validation"]["n"] == 2

    # the pick's recipe reproduces it: same ratios, loads as a normal recipe
    rerun = load_recipe(out / "pick.yaml")
    pc = next(s for s in rerun.stages if s.stage == "prune_channels")
    assert pc.ratios == {g: r for g, r in pick["ratios"].items() if r > 0}
    record = json.loads((out / pick["dir"] / "record.json").read_text())
    assert record["final"]["macs"] < record["baseline"]["macs"]
    assert (out / "plots" / "latency.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "report.md").read_text()
    assert "## Pick" in md and f"{pick['measured_ms']:.3f} ms" in md
    page = (out / "report.html").read_text()  # self-contained: the plots inside, no links
    assert page.count("data:image/png;base64,") == 2 and 'plots/latency.png"' not in page
    assert "<table>" in page and f"{pick['measured_ms']:.3f} ms" in page
    assert json.loads((out / "plan.json").read_text())["pick"]["key"] == pick["key"]

    # the same call again: nothing trained, no latency-table piece measured again
    pieces = calls["pieces"]
    again = plan(load_recipe(recipe_file), budget, out, **kwargs)
    assert again["counts"]["reused"] == len(trained) and again["counts"]["trained_now"] == 0
    assert calls["pieces"] == pieces
    assert again["pick"]["key"] == pick["key"]
    assert np.isclose(again["pick"]["accuracy"], pick["accuracy"])


def test_adaptive_bn_accuracy_recalibrates_a_pruned_copy_only(synth) -> None:
    """Unpruned and without calibration images it is the model's own val top-1; pruned, it
    re-estimates BN statistics on a copy and leaves the baseline untouched."""
    from pqd.planner.sensitivity import adaptive_bn_eval
    from pqd.recipe import PruneChannelsSpec

    model = tiny("tiny_cnn").eval()
    x, y = synth.val_x[:96], synth.val_y[:96]
    with torch.no_grad():
        own = float((model(x.float() / 255).argmax(1) == y).float().mean())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = PruneChannelsSpec(ratios={}, round_to=2)
    empty = synth.train_x[:0]
    assert adaptive_bn_eval(model, x[:2].float() / 255, {}, spec, empty, x, y)[0] == own
    groups = LatencyModel(model, x[:2].float() / 255, round_to=2).groups
    half = dict.fromkeys(groups, 0.5)
    est = adaptive_bn_eval(model, x[:2].float() / 255, half, spec, synth.train_x[:64], x, y)[0]
    assert 0.0 <= est <= 1.0
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the baseline is untouched


def test_plan_benchmark_table_names_the_pick_and_the_refusals() -> None:
    from helpers import load_benchmark

    bench = load_benchmark("plan")
    row = {
        "fraction": 0.5,
        "budget_ms": 0.2,
        "counts": {"estimated": 900, "trained": 3},
        "model_error": {"median": 0.1, "worst": 0.2},
        "pick": {"p50_ms": 0.19, "test": 0.75, "uniform_reference": 0.4},
        "hand": {"ratio": 0.4, "p50_ms": 0.195, "test": 0.75},
        "pick_wins": True,
    }
    refused = {"fraction": 0.25, "budget_ms": 0.1, "plan_error": "below every candidate"}
    text = bench.render({"dense_ms": 0.4, "rows": [row, refused], "wall_s": 12.0})
    lines = text.splitlines()
    assert lines[0].count("|") == lines[2].count("|") == lines[3].count("|") == 13
    assert (
        "| uniform 0.4 | 0.190 ms | 75.00% | 0.4 | 0.195 ms | 75.00% | NO | - | yes |" in lines[2]
    )
    assert "below every candidate" in lines[3]
    slower = {  # more accurate within the budget, but slower than the hand-made file
        **row,
        "pick": {**row["pick"], "p50_ms": 0.25, "test": 0.8, "uniform_reference": None},
        "pick_wins": False,
        "more_accurate_within_budget": True,
    }
    iso = {"p50_ms": 0.19, "hand_p50_ms": 0.195, "test": 0.76, "uniform_reference": None}
    both = bench.render(
        {"dense_ms": 0.4, "rows": [slower, {**slower, "iso": {**iso, "wins": True}}], "wall_s": 1}
    ).splitlines()
    assert "| planned | 0.250 ms | 80.00% |" in both[2] and "| yes | - | NO |" in both[2]
    assert "| yes | planned: 0.190 / 0.195 ms, 76.00% | yes |" in both[3]
    # with both runs' test predictions: intervals in the cells, the paired test below
    paired = {
        "n": 10000,
        "difference": 0.004,
        "ci_low": -0.001,
        "ci_high": 0.009,
        "a_only": 140,
        "b_only": 100,
        "p_value": 0.012,
        "verdict": "pick better",
        "pick_ci": [0.742, 0.759],
        "hand_ci": [0.738, 0.755],
    }
    text = bench.render({"dense_ms": 0.4, "rows": [{**row, "paired": paired}], "wall_s": 1})
    assert "| 75.00% [74.2, 75.9] | 0.4 | 0.195 ms | 75.00% [73.8, 75.5] |" in text
    assert (
        "- 0.5x, the budget's pick: pick vs uniform by hand on the same 10000 test images: "
        "+0.40 points (95% CI -0.10 to +0.90), 140 images only pick gets right, 100 only "
        "uniform by hand (McNemar p = 0.012): pick better" in text
    )


def test_plan_benchmark_continues_at_the_budgets_of_its_earlier_run(tmp_path) -> None:
    from helpers import load_benchmark

    bench = load_benchmark("plan")
    inputs = {"recipe": "r", "model": "fastnet_q8", "threads": 2, "quick": False}
    assert bench.earlier_dense_ms(tmp_path, inputs) is None  # nothing ran there
    earlier = {"dense_ms": 0.3125, "dense_inputs": inputs, "rows": []}
    (tmp_path / "bench.json").write_text(json.dumps(earlier))
    assert bench.earlier_dense_ms(tmp_path, inputs) == 0.3125
    assert bench.earlier_dense_ms(tmp_path, {**inputs, "quick": True}) is None  # another run
    (tmp_path / "bench.json").write_text('{"rows": ')  # cut off: measured anew
    assert bench.earlier_dense_ms(tmp_path, inputs) is None


def test_an_under_predicting_model_is_scaled_by_what_the_whole_files_measured() -> None:
    """ResNet-18 here: the 4 best candidates all measured over the budget (the model said
    0.85 ms, the file ran 1.08-1.17 ms), and an over-budget one was trained. The next try
    scales every prediction by the median measured / predicted ratio."""
    rows = [{"predicted_ms": p} for p in (0.9, 0.95, 0.6, 0.75, 0.85)]
    rows[0]["premeasured_ms"], rows[1]["premeasured_ms"] = 1.17, 1.14  # 1.3x, 1.2x
    more = recalibrated(rows, latency_ms=1.0)
    assert [r["predicted_ms"] for r in more] == [0.6, 0.75]  # x 1.25 <= 1.0; 0.85 x 1.25 > 1
    assert all(r["scale"] == 1.25 for r in more)
    # a model that over-predicts, or nothing measured: nothing new to try
    rows[0]["premeasured_ms"], rows[1]["premeasured_ms"] = 0.8, 0.9
    assert recalibrated(rows, latency_ms=1.0) == []
    assert recalibrated([{"predicted_ms": 0.5}], latency_ms=1.0) == []


def test_whole_files_faster_than_predicted_widen_the_pool_to_what_the_budget_admits() -> None:
    """ResNet-18 on an AVX-512 Xeon: the chosen planned files ran 6-8% under the budget their
    calibrated prediction filled, while the uniform answer used it. Scaled by what the timed
    files measured, slower candidates the budget admits compete too, best estimate first."""
    from pqd.planner.latency import widened

    rows = [
        {"predicted_ms": p, "estimated_loss": e}
        for p, e in ((1.0, 0.5), (0.95, 0.6), (1.1, 0.2), (1.15, 0.1), (1.3, 0.0))
    ]
    rows[0]["premeasured_ms"], rows[1]["premeasured_ms"] = 0.9, 0.855  # both 0.9x
    more = widened(rows, latency_ms=1.05, scale=1.0, tolerance=0.05)
    # 1.15 x 0.9 and 1.1 x 0.9 <= 1.05, best estimate first; 1.3 x 0.9 > 1.05
    assert [r["predicted_ms"] for r in more] == [1.15, 1.1]
    assert all(r["scale"] == 0.9 for r in more)
    # files within the tolerance of the calibration, or nothing timed: nothing new
    assert widened(rows, latency_ms=1.05, scale=0.93, tolerance=0.05) == []
    assert widened([{"predicted_ms": 0.5, "estimated_loss": 0.0}], 1.0, 1.0, 0.05) == []


def test_sensitivity_adds_each_groups_own_loss_increase() -> None:
    from pqd.planner.sensitivity import sensitivity_loss

    curves = {
        "dense": 1.0,
        "levels": [0.25, 0.5, 1.0],
        "groups": {"a": [3.0, 2.0, 1.0], "b": [1.5, 0.9, 1.0]},  # b at 0.5: noise below dense
    }
    assert sensitivity_loss(curves, {}) == 1.0
    assert sensitivity_loss(curves, {"a": 0.5}) == pytest.approx(2.0)
    assert sensitivity_loss(curves, {"a": 0.25}) == pytest.approx(1.5)  # linear in between
    assert sensitivity_loss(curves, {"a": 0.5, "b": 0.75}) == pytest.approx(2.5)
    assert sensitivity_loss(curves, {"b": 0.5}) == 1.0  # a loss below dense adds nothing


def test_whole_files_are_scaled_to_the_dense_time_the_budget_was_set_against() -> None:
    """A VM that runs 10% slower in a later panel slows the dense file alike: the scaled
    times stay on the budget's scale, and the uniform pick does not move."""
    from pqd.planner.latency import DENSE, first_within, measure_against_dense

    class Slower:
        def measure(self, cands: dict) -> dict:
            return {n: 1.1 * (2.0 if n == DENSE else 2.0 * (1 - float(n))) for n in cands}

    times = measure_against_dense(Slower(), {"0.4": {}, "0.5": {}}, dense_ms=2.0)  # type: ignore[arg-type]
    assert times == pytest.approx({"0.4": 1.2, "0.5": 1.0})
    assert first_within([0.4, 0.5], times, 1.0, 0.05) == (0.5, pytest.approx(1.0))
    assert first_within([0.4, 0.5], times, 0.5, 0.05)[0] == 0.5  # none: the largest
    raw = Slower().measure({"0.5": {}})
    assert first_within([0.5], raw, 1.0, 0.05)[1] > 1.05  # unscaled it would miss


def test_whole_files_take_the_median_of_panels_each_scaled_by_its_own_dense_file(
    tmp_path,
) -> None:
    """Panels where the whole VM slows (dense too) change nothing; one panel where only the
    pick ran 20% slow (noise) moves neither the median nor the decision, and the spread
    names it."""
    from pqd.planner.latency import DENSE, files_against_dense

    class Panels:
        def __init__(self) -> None:
            self.calls = 0

        def time_paths(self, paths: dict) -> dict:
            slow = [1.0, 1.3, 1.0, 0.9, 1.0][self.calls]  # the VM's speed in this panel
            noise = 1.2 if self.calls == 1 else 1.0  # the pick alone, in one panel
            self.calls += 1
            assert next(iter(paths)) == DENSE
            times = {DENSE: 4.0 * slow, "pick": 1.0 * slow * noise, "hand": 0.9 * slow}
            return {n: times[n] for n in paths}

    lm = Panels()
    timed = files_against_dense(lm, {"pick": tmp_path, "hand": tmp_path}, tmp_path, 2.0)  # type: ignore[arg-type]
    assert lm.calls == 5
    assert timed.ms == pytest.approx({"pick": 0.5, "hand": 0.45})
    assert timed.dense_raw_ms == pytest.approx(4.0)
    assert timed.spread["pick"] == pytest.approx(0.2) and timed.spread["hand"] == pytest.approx(0)
    one = files_against_dense(Panels(), {"pick": tmp_path}, tmp_path, 2.0, panels=1)  # type: ignore[arg-type]
    assert one.ms == pytest.approx({"pick": 0.5}) and one.spread == {"pick": 0.0}


def test_a_file_whose_panels_straddle_the_budget_is_timed_again_and_decided_on_all(
    tmp_path,
) -> None:
    """Only the file whose panels fall on both sides of the limit is timed once more; its
    median and spread come from all its panels (the dense file's too), the others keep
    theirs; with no file on the edge nothing more is timed."""
    from pqd.planner.latency import DENSE, files_against_dense, settle_borderline

    class Noisy:
        def __init__(self) -> None:
            self.calls: list[list[str]] = []

        def time_paths(self, paths: dict) -> dict:
            i = len(self.calls)
            self.calls.append([n for n in paths if n != DENSE])
            # "edge": 1.02 ms in panels 0-2, 0.96 ms after (the VM quietened); "far" 0.5 ms,
            # "over" 2.0 ms; the dense file 4.0 ms throughout (no scaling)
            times = {DENSE: 4.0, "edge": 1.02 if i < 3 else 0.96, "far": 0.5, "over": 2.0}
            return {n: times[n] for n in paths}

    lm = Noisy()
    paths = {"edge": tmp_path, "far": tmp_path, "over": tmp_path}
    timed = files_against_dense(lm, paths, tmp_path, 4.0)  # type: ignore[arg-type]
    assert timed.ms["edge"] == pytest.approx(1.02)  # 3 of 5 panels over a 1.0 ms limit
    settled, again = settle_borderline(lm, timed, paths, tmp_path, 4.0, 1.0)  # type: ignore[arg-type]
    assert again == ["edge"] and lm.calls[5:] == [["edge"]] * 5
    assert len(settled.samples["edge"]) == 10 and len(settled.samples["far"]) == 5
    assert settled.ms["edge"] == pytest.approx(0.96)  # 7 of 10 panels within
    assert settled.spread["edge"] == pytest.approx((1.02 - 0.96) / 0.96)
    assert settled.ms["far"] == timed.ms["far"] and settled.ms["over"] == timed.ms["over"]
    assert len(settled.dense_raw) == 10 and settled.dense_raw_ms == pytest.approx(4.0)
    quiet = Noisy()
    timed = files_against_dense(quiet, {"far": tmp_path}, tmp_path, 4.0)  # type: ignore[arg-type]
    assert settle_borderline(quiet, timed, {"far": tmp_path}, tmp_path, 4.0, 1.0) == (  # type: ignore[arg-type]
        timed,
        [],
    )
    assert len(quiet.calls) == 5


def test_plan_benchmark_refuses_a_user_model_it_cannot_import_in_one_line(
    tmp_path, capsys, subset_dir
) -> None:
    from helpers import load_benchmark

    bench = load_benchmark("plan")
    out = tmp_path / "bench"
    args = ["--quick", "--out", str(out), "--data-dir", str(subset_dir)]
    code = bench.main([*args, "model.name=no_such_pkg.nets:build"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("plan benchmark: error:") and "no_such_pkg" in err
    assert not (out / "bench.json").exists()


def test_later_plans_start_from_the_first_ones_sensitivity_and_trained_runs(tmp_path) -> None:
    """share_work copies the sensitivity file and finished trial folders, never a half-trained
    one, and never over what the later plan folder already holds."""
    from helpers import load_benchmark
    from pqd.planner import SENSITIVITY_FILE

    bench = load_benchmark("plan")
    src, dest = tmp_path / "plan-0.5", tmp_path / "plan-0.25"
    (src / "trials" / "plan-done").mkdir(parents=True)
    (src / "trials" / "plan-half").mkdir(parents=True)
    (src / SENSITIVITY_FILE).write_text('{"key": 1}')
    (src / "trials" / "plan-done" / "record.json").write_text("{}")
    (src / "trials" / "plan-half" / "trial.json").write_text("{}")
    bench.share_work(src, dest)
    assert (dest / SENSITIVITY_FILE).read_text() == '{"key": 1}'
    assert (dest / "trials" / "plan-done" / "record.json").is_file()
    assert not (dest / "trials" / "plan-half").exists()
    # the finished trial's files are shared, not copied (same file system here)
    assert (dest / "trials" / "plan-done" / "record.json").samefile(
        src / "trials" / "plan-done" / "record.json"
    )
    (src / SENSITIVITY_FILE).write_text('{"key": 2}')
    bench.share_work(src, dest)
    assert (dest / SENSITIVITY_FILE).read_text() == '{"key": 1}'


@pytest.mark.parametrize("bias", [0.6, 1.0, 1.6])
def test_the_uniform_reference_is_the_full_scan_answer_when_the_model_is_off(bias) -> None:
    """ResNet-18 at 0.25x here: the model over-predicted small nets 1.6x, the window around
    its guess held only 0.8-0.9, and the reference became 0.8 where 0.75 met the budget.
    The window now moves until the step below the answer has been timed over the budget."""
    from pqd.planner.latency import ratio_steps, uniform_by_measurement, uniform_reference

    class Lm:
        def __init__(self) -> None:
            self.groups = {"a": 64, "b": 128}
            self.timed: list[str] = []

        def uniform(self, keep: float) -> dict:
            return dict.fromkeys(self.groups, round(1.0 - keep, 6))

        def true_ms(self, r: dict) -> float:
            keep = 1.0 - r.get("a", 0.0)
            return 0.02 + keep * keep if keep > 0.22 else 0.5  # a kernel cliff at keep 0.2

        def predict(self, r: dict) -> float:
            return bias * self.true_ms(r)

        def measure(self, cands: dict) -> dict:
            self.timed += list(cands)
            return {n: self.true_ms(r) for n, r in cands.items()}

    steps = ratio_steps(0.9)
    for budget in (0.08, 0.3, 0.6, 0.9, 0.01):
        lm = Lm()
        ratio, ms, measured = uniform_reference(lm, budget, steps, 0.0, None)  # type: ignore[arg-type]
        full = uniform_by_measurement(Lm(), budget, steps, 0.0)  # type: ignore[arg-type]
        assert (ratio, ms) == pytest.approx(full)
        assert set(measured) == set(lm.timed) and len(lm.timed) == len(set(lm.timed))
        if budget == 0.01:  # none meets it: the most pruned step
            assert ratio == steps[-1] and ms > budget


@pytest.mark.integration
def test_plan_benchmark_runs_the_budget_the_hand_made_run_and_equal_latency(
    tmp_path, subset_dir
) -> None:
    """The whole benchmark on the tiny quick recipe with exact (MACs-based) latencies: the
    budget's plan, the hand-made uniform run, the plan at the hand-made file's p50, one table.
    It runs in its own Python process, as a user runs the command: twice the suite run in one
    process ended at this test on an AVX2-only EPYC (once a hang, once a segmentation fault;
    neither repeats here), and a process of its own names such a crash with the faulthandler
    traceback as this test's failure instead of ending the suite."""
    out = tmp_path / "bench"
    args = ["--quick", "--out", str(out), "--data-dir", str(subset_dir), "--no-progress"]
    args += ["--cache-dir", str(tmp_path / "cache"), "--fractions", "0.7", "-k", "1"]
    args += ["--results", str(tmp_path / "results")]
    script = (
        "import faulthandler, sys, pytest\n"
        "faulthandler.dump_traceback_later(480, exit=True)\n"  # a hang prints every stack
        f"sys.path.insert(0, {str(Path(__file__).parents[1])!r})\n"
        "from helpers import fake_latency, load_benchmark\n"
        "fake_latency(pytest.MonkeyPatch())\n"
        f"sys.exit(load_benchmark('plan').main({args!r}))\n"
    )
    cmd = [sys.executable, "-X", "faulthandler", "-c", script]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
    result = json.loads((out / "bench.json").read_text())
    row = result["rows"][0]
    assert "plan_error" not in row, row
    assert row["pick_within_budget"] and row["pick"]["p50_ms"] <= row["budget_ms"] * 1.05
    assert row["hand"]["p50_ms"] <= row["budget_ms"] * 1.05 and 0 < row["hand"]["ratio"] < 1
    iso = row["iso"]
    assert "plan_error" not in iso, iso
    assert iso["budget_ms"] == pytest.approx(row["hand"]["p50_ms"], rel=1e-3)
    assert iso["p50_ms"] <= iso["budget_ms"] * 1.05
    assert iso["wins"] == (
        iso["test"] >= row["hand"]["test"] and iso["p50_ms"] <= iso["hand_p50_ms"] * 1.05
    )
    # its uniform reference is the hand-made ratio the budget's plan trained already
    assert iso["reused"] >= 1
    # exact latencies: the hand-made ratio is the plan's uniform reference, trained once
    assert row["hand"]["planner_reference"]
    assert not list(out.glob("hand-*")), "the hand-made run was trained a second time"
    from helpers import load_benchmark

    for c in load_benchmark("plan").planned_family(row):  # every other one against it
        assert c["paired"]["accuracy_b"] == pytest.approx(row["hand"]["test"])
        assert c["paired"]["accuracy_a"] == pytest.approx(c["test"])
        if c["within"]:  # Holm over those within the budget
            assert c["paired"]["p_value"] <= c["p_holm"] <= 1
    assert (out / "plan-0.7-iso" / "report.html").is_file()
    # pick and hand-made file compared image by image on the test images
    for paired, pick_top1 in ((row["paired"], row["pick"]["test"]), (iso["paired"], iso["test"])):
        assert paired["n"] == 64 and paired["accuracy_b"] == pytest.approx(row["hand"]["test"])
        assert paired["accuracy_a"] == pytest.approx(pick_top1)
        assert paired["ci_low"] <= paired["difference"] <= paired["ci_high"]
        assert paired["hand_ci"][0] <= row["hand"]["test"] <= paired["hand_ci"][1]
    # the results page, redrawn from its JSON alone
    (page,) = (tmp_path / "results").glob("plan-*.md")
    text = page.read_text()
    assert text.startswith("# The planner against uniform pruning by hand")
    assert "python benchmarks/plan.py --quick" in text and "pick vs uniform by hand" in text
    page.unlink()
    assert load_benchmark("plan").main([*args, "--render"]) == 0
    assert page.read_text() == text


def _val_predictions(folder: Path, right: int, n: int = 1000, start: int = 0) -> None:
    """A run folder whose final model gets ``right`` of ``n`` validation images right: the
    images ``start`` to ``start + right``."""
    folder.mkdir(parents=True)
    labels = np.arange(n) % 10
    i = np.arange(n)
    final = np.where((i >= start) & (i < start + right), labels, (labels + 1) % 10)
    np.savez(folder / "val_predictions.npz", labels=labels, final=final)


def test_pick_is_planned_only_beyond_noise(tmp_path: Path) -> None:
    from pqd.planner import choose_pick

    _val_predictions(tmp_path / "u", 800)
    _val_predictions(tmp_path / "near", 806, start=20)  # 26 right, 20 wrong vs u: noise
    _val_predictions(tmp_path / "far", 840)  # 40 images better: beyond noise
    uniform = {"dir": "u", "val_accuracy": 0.800, "measured_ms": 1.0, "uniform_reference": 0.5}
    near = {"dir": "near", "val_accuracy": 0.806, "measured_ms": 0.9}
    far = {"dir": "far", "val_accuracy": 0.840, "measured_ms": 1.0}
    pick, rule = choose_pick([uniform, near], tmp_path)
    assert pick is uniform and rule["rule"].startswith("uniform reference")
    (c,) = rule["validation_vs_uniform"]
    assert (c["a_only"], c["b_only"], c["beyond_noise"]) == (26, 20, False)
    pick, rule = choose_pick([uniform, near, far], tmp_path)
    assert pick is far and rule["rule"].startswith("planned candidate")
    # Holm over the two planned ones: the far one still clears it, the near one does not
    assert [c["beyond_noise"] for c in rule["validation_vs_uniform"]] == [False, True]
    # no uniform reference within the budget: the best by validation
    assert choose_pick([near, far], tmp_path)[0] is far
    assert choose_pick([], tmp_path) == (None, {"rule": "no candidate met the budget"})


@pytest.mark.integration
def test_plan_takes_a_model_in_memory_and_its_data(monkeypatch, tmp_path, subset_dir) -> None:
    """pqd.plan(model, data, latency_ms): a Python model (tiny_cnn's network without pqd's
    normalisation wrapper) and a Dataset in memory get the same plan folder as the CLI."""
    import pqd
    from pqd.data import load_dataset
    from pqd.registry import MODELS

    fake_latency(monkeypatch)
    data = load_dataset(
        "cifar10", subset_dir, val_size=64, limit_train=256, limit_test=64, download=False
    )
    net = tiny().net  # an nn.Module of the user's: no normalisation inside
    before = {k: v.clone() for k, v in net.state_dict().items()}
    kwargs = {"k": 1, "validate": 0, "n_random": 20, "levels": (0.5, 1.0), "progress": False}
    stages = [pqd.PruneChannels(ratio=0.5, round_to=2, epochs=1), pqd.Quantize(epochs=1)]
    kwargs.update(stages=stages, train={"batch_size": 32, "amp": "off"})
    out = tmp_path / "plan"
    result = pqd.plan(net, data, 0.095, out, cache_dir=tmp_path / "cache", **kwargs)
    assert result["pick"]["measured_ms"] <= 0.095 * 1.05
    assert 0.0 <= result["pick"]["accuracy"] <= 1.0
    assert (out / "plan" / "plan.json").is_file() and (out / "inputs" / "data.npz").is_file()
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not [name for name in MODELS if name.startswith("given_")]  # nothing left behind
    # the same call again resumes: nothing is trained twice
    again = pqd.plan(net, data, 0.095, out, cache_dir=tmp_path / "cache", **kwargs)
    assert again["pick"] == result["pick"] and again["counts"]["trained_now"] == 0


def _test_predictions(folder: Path, right: range, n: int = 1000) -> None:
    """A run folder whose final file gets exactly the test images in ``right`` right."""
    folder.mkdir(parents=True)
    labels = np.arange(n) % 10
    hit = np.isin(np.arange(n), np.asarray(right))
    final = np.where(hit, labels, (labels + 1) % 10)
    np.savez(folder / "predictions.npz", labels=labels, baseline=labels, final=final)


def test_plan_benchmark_judges_the_other_candidates_as_one_family(tmp_path: Path) -> None:
    """Each trained candidate against the hand-made run, image by image; Holm over those
    within the budget only; uniform networks named; the page lists them, beside a budget the
    planner refused and a row written before candidates were compared."""
    from helpers import load_benchmark
    from pqd.stats import mcnemar_exact

    bench = load_benchmark("plan")
    _test_predictions(tmp_path / "hand", range(600))
    cands = {  # name: (test images right, ratios, p50 ms)
        "better": (range(680), {"a": 0.2, "b": 0.6}, 0.50),
        "same": ([*range(5, 600), *range(600, 605)], {"a": 0.3, "b": 0.3}, 0.49),
        "worse": (range(520), {"a": 0.5, "b": 0.1}, 0.40),
        "over": (range(900), {"a": 0.1, "b": 0.1}, 0.60),  # over 0.5 ms + 5%
    }
    trained = [{"dir": "hand", "status": "done", "uniform_reference": 0.4, "ratios": {}}]
    for name, (right, ratios, ms) in cands.items():
        _test_predictions(tmp_path / name, right)
        trained.append(
            {"dir": name, "status": "done", "ratios": ratios,
             "accuracy": len(right) / 1000, "val_accuracy": None, "measured_ms": ms}
        )  # fmt: skip
    trained.append({"dir": "failed", "status": "failed", "ratios": {}})
    rows = bench.planned_vs_hand({"trained": trained}, tmp_path, tmp_path / "hand")
    assert [r["dir"] for r in rows] == list(cands)  # not the reference, not the failed one
    assert [r["uniform"] for r in rows] == [False, True, False, True]
    judged = {c["dir"]: c for c in bench.planned_family({"budget_ms": 0.5, "planned": rows})}
    p_better, p_worse = mcnemar_exact(80, 0), mcnemar_exact(0, 80)
    assert judged["better"]["paired"]["p_value"] == pytest.approx(p_better, rel=1e-5)
    assert judged["better"]["p_holm"] == pytest.approx(3 * p_better, rel=1e-5)  # least of 3
    assert judged["worse"]["p_holm"] == pytest.approx(3 * p_worse, rel=1e-5)  # (tied with it)
    assert judged["same"]["p_holm"] == pytest.approx(1.0)
    assert judged["better"]["verdict"] == "candidate better"
    assert judged["worse"]["verdict"] == "uniform by hand better"
    assert judged["same"]["verdict"] == "tie"
    over = judged["over"]
    assert not over["within"] and over["p_holm"] is None and over["verdict"] is None
    # the page: the candidates under their budget; a refused budget; an older row
    row = {
        "fraction": 0.5, "budget_ms": 0.5, "planned": rows,
        "pick": {"test": 0.6, "p50_ms": 0.45, "raw_p50_ms": 0.45, "spread": 0.01,
                 "uniform_reference": 0.4},
        "hand": {"ratio": 0.4, "test": 0.6, "p50_ms": 0.45, "raw_p50_ms": 0.45, "spread": 0.01,
                 "planner_reference": True},
        "model_error": {"median": 0.05, "worst": 0.1}, "counts": {"estimated": 9, "trained": 5},
        "pick_wins": True, "more_accurate_within_budget": True, "final_dense_raw_ms": 1.0,
    }  # fmt: skip
    older = {**row, "fraction": 0.4, "hand": {**row["hand"]}}
    del older["planned"], older["hand"]["planner_reference"]
    refused = {"fraction": 0.1, "budget_ms": 0.1, "plan_error": "budget 0.1 ms is below ..."}
    page = bench.render({"rows": [row, older, refused], "dense_ms": 1.0, "wall_s": 1})
    assert "budget 0.1 ms is below" in page
    lines = [line for line in page.splitlines() if line.startswith("- 0.5x, ")]
    assert len(lines) == 4 and not any(line.startswith("- 0.4x, ") for line in page.splitlines())
    assert "uniform 0.3" in lines[1] and "a tie at the 5% level" in lines[1]
    assert "planned, keeps 0.4-0.8 of each group's channels" in lines[0]
    assert "candidate better" in lines[0] and f"Holm p = {3 * p_better:.3g}" in lines[0]
    assert "outside the family" in lines[3] and "not judged" in lines[3]
    assert "At 0.5x the hand-made ratio is the plan's uniform reference" in page


def test_plan_benchmark_wall_time_covers_every_invocation(tmp_path: Path) -> None:
    """A continued run's page counts the invocations before it, only for the same inputs."""
    from helpers import load_benchmark

    bench = load_benchmark("plan")
    inputs = {"recipe": "r", "model": "m", "runtime": "onnxruntime", "threads": 2}
    assert bench.earlier_wall_s(tmp_path, inputs) == 0.0  # nothing before
    (tmp_path / "bench.json").write_text(json.dumps({"dense_inputs": inputs, "wall_s": 4812.0}))
    assert bench.earlier_wall_s(tmp_path, inputs) == 4812.0
    assert bench.earlier_wall_s(tmp_path, {**inputs, "threads": 1}) == 0.0
    (tmp_path / "bench.json").write_text("{not json")
    assert bench.earlier_wall_s(tmp_path, inputs) == 0.0
