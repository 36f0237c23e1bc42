"""pqd search: epoch budgets, trial keys, pairwise decisions, topological order and cycles,
the Pareto set, reports from a stored search.json, and (integration) the CLI, resuming,
and the process and Ray executors against the sequential one on a tiny search."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from helpers import load_benchmark
from pqd.cli import main
from pqd.errors import PqdError, RecipeError
from pqd.executors import check_executor
from pqd.recipe import recipe_from_dict
from pqd.runs import Trial, folder_status, trial_key
from pqd.search.decide import decide_pair, pareto_front, topological_order
from pqd.search.summary import analyse
from pqd.search.trials import allocate_epochs, plan_trials

STAGES = [{"stage": "prune", "sparsity": 0.5}, {"stage": "quantize"}, {"stage": "distill"}]


def search_recipe(stages: list[dict[str, Any]] | None = None, **search: Any):
    return recipe_from_dict(
        {"name": "s", "model": {"name": "tiny_cnn"}, "stages": stages or STAGES, "search": search}
    )


# ---------------------------------------------------------------------------- budgets, plans


def test_allocate_epochs_by_position():
    assert allocate_epochs(5, [20, 40, 40]) == [1, 2, 2]
    assert allocate_epochs(10, [20, 40, 40]) == [2, 4, 4]
    assert allocate_epochs(6, [20, 40, 40]) == [1, 3, 2]  # remainders .2/.4/.4: earlier wins
    assert allocate_epochs(3, [100 / 3] * 3) == [1, 1, 1]
    assert allocate_epochs(0, [50, 50]) == [0, 0]


@given(st.integers(0, 500), st.lists(st.floats(0.5, 100), min_size=1, max_size=5))
def test_allocate_epochs_sums_to_total_and_stays_close(total, budget):
    epochs = allocate_epochs(total, budget)
    assert sum(epochs) == total
    for e, b in zip(epochs, budget, strict=True):
        assert abs(e - total * b / sum(budget)) < 1.0


def test_plan_gives_each_position_its_budget_whatever_the_stage():
    recipe = search_recipe(total_epochs=5, budget=[20, 40, 40])
    trials = plan_trials(recipe, "/ckpt.safetensors", "digest", "/data")
    kinds = [t.kind for t in trials]
    assert kinds.count("permutation") == 6 and kinds.count("pairwise") == 6
    assert kinds.count("reference") == 3 and len({t.key for t in trials}) == 15
    for t in trials:
        assert [s.stage for s in t.recipe.stages] == list(t.order)
        assert [s.epochs for s in t.recipe.stages] == list(t.epochs)
        assert t.recipe.baseline.checkpoint == "/ckpt.safetensors" and t.recipe.search is None
        want = {"permutation": [1, 2, 2], "pairwise": [1, 2], "reference": [5]}[t.kind]
        assert list(t.epochs) == want
    qpd = next(t for t in trials if t.order == ("quantize", "prune", "distill"))
    assert [s.epochs for s in qpd.recipe.stages] == [1, 2, 2]
    assert qpd.recipe.stages[1].sparsity == 0.5  # the stage keeps its own settings


def test_two_stage_pairwise_runs_are_the_permutation_runs_and_seeds_repeat():
    recipe = search_recipe(STAGES[:2], total_epochs=4, seeds=[0, 1])
    trials = plan_trials(recipe, "/c", "d", "/data")
    perm = {(t.order, t.seed): t.key for t in trials if t.kind == "permutation"}
    pair = {(t.order, t.seed): t.key for t in trials if t.kind == "pairwise"}
    assert perm == pair and len(perm) == 4
    assert {t.recipe.seed for t in trials} == {0, 1}


def test_ptq_keeps_zero_epochs_and_impossible_allocations_say_so():
    stages = [
        {"stage": "prune", "sparsity": 0.5},
        {"stage": "quantize", "mode": "ptq", "epochs": 0},
    ]
    trials = plan_trials(search_recipe(stages, total_epochs=4), "/c", "d", "/data")
    assert all(s.epochs == 0 for t in trials for s in t.recipe.stages if s.stage == "quantize")
    gradual = [{"stage": "prune", "sparsity": 0.5, "schedule": "gradual"}, {"stage": "distill"}]
    with pytest.raises(RecipeError, match=r"raise search\.total_epochs"):
        plan_trials(search_recipe(gradual, total_epochs=1), "/c", "d", "/data")


def test_trial_key_ignores_names_and_paths_but_not_what_changes_results():
    recipe = search_recipe(total_epochs=5)
    a = plan_trials(recipe, "/one/ckpt", "digest", "/data")[0]
    b = plan_trials(recipe, "/moved/ckpt", "digest", "/data")[0]
    assert a.key == b.key == trial_key(a.recipe.model_copy(update={"name": "x"}), "digest", "/data")
    assert plan_trials(recipe, "/one/ckpt", "other", "/data")[0].key != a.key
    assert plan_trials(recipe, "/one/ckpt", "digest", "/other")[0].key != a.key
    changed = search_recipe([{**STAGES[0], "sparsity": 0.6}, *STAGES[1:]], total_epochs=5)
    assert plan_trials(changed, "/one/ckpt", "digest", "/data")[0].key != a.key
    fetched = recipe.model_copy(update={"data": recipe.data.model_copy(update={"download": True})})
    assert plan_trials(fetched, "/one/ckpt", "digest", "/data")[0].key == a.key  # not a result


def test_folder_status_done_trained_partial_missing(tmp_path):
    recipe = search_recipe(total_epochs=5)
    t = plan_trials(recipe, "/c", "d", "/data")[0]
    folder = tmp_path / "t"
    assert folder_status(folder, t.key) == "missing"
    folder.mkdir()
    (folder / "trial.json").write_text(json.dumps({"key": t.key}))
    for f in ("pending.json", "reference_logits.npz", "baseline.onnx"):
        (folder / f).write_text("x")
    assert folder_status(folder, t.key) == "missing"  # nothing trained: no progress file
    (folder / "progress.json").write_text("{}")
    assert folder_status(folder, t.key) == "partial"  # stopped while training: continues
    (folder / "final.onnx").write_text("x")
    assert folder_status(folder, t.key) == "trained"
    (folder / "record.json").write_text(
        json.dumps({"final": {"accuracy": 0.5, "latency_ms": {"p50": 1.0}}})
    )
    assert folder_status(folder, t.key) == "done"
    assert folder_status(folder, "another-key") == "missing"


def test_a_latency_targets_step_is_shared_only_by_runs_that_measure_it_alike() -> None:
    """prune_channels to a latency budget measures INT8 files when a later stage quantizes
    (precision auto), at measure.threads: runs that differ there do not share that step,
    while a MACs target, or a stated precision without the threads changing, still does."""
    from pqd.fingerprint import fingerprints

    def prints(first: dict[str, Any], later: list[dict[str, Any]], threads: int = 2) -> list[str]:
        stages = [first, {"stage": "prune", "sparsity": 0.5}, *later]
        return fingerprints(
            recipe_from_dict(
                {"model": {"name": "tiny_cnn"}, "stages": stages, "measure": {"threads": threads}}
            )
        )

    quantize = [{"stage": "quantize"}]
    latency = {"stage": "prune_channels", "target": {"latency_ms": 0.5}}
    assert prints(latency, quantize)[:3] != prints(latency, [])[:3]
    assert prints(latency, quantize)[0] == prints(latency, [])[0]  # the baseline is shared
    assert prints(latency, quantize, threads=4)[1] != prints(latency, quantize)[1]
    fp32 = {"stage": "prune_channels", "target": {"latency_ms": 0.5, "precision": "fp32"}}
    assert prints(fp32, quantize)[:3] == prints(fp32, [])[:3]
    macs = {"stage": "prune_channels", "target": {"macs": 0.5}}
    assert prints(macs, quantize)[:3] == prints(macs, [])[:3]
    assert prints(macs, quantize, threads=4)[:3] == prints(macs, quantize)[:3]


ONE_EPOCH_STAGES = (
    {"stage": "prune", "sparsity": 0.5, "epochs": 1},
    {"stage": "distill", "epochs": 1},
    {"stage": "quantize", "epochs": 1},
)


def _one_epoch_trial(root: Path, *stages: dict[str, Any]) -> Trial:
    """A permutation trial of ``stages`` (keyed by their names) on a tiny recipe."""
    recipe = recipe_from_dict(_run_recipe(str(root), list(stages)))
    order = tuple(s["stage"] for s in stages)
    return Trial("permutation", order, 0, (1,) * len(stages), recipe, "-".join(order))


def test_a_baseline_checkpoint_counts_by_its_bytes_not_its_path(tmp_path) -> None:
    """The steps of a run that loads its baseline keep their fingerprints when the file
    moves (a Ray task holds it elsewhere) and change when the file at the same path does."""
    import os

    from pqd.fingerprint import fingerprints

    def prints(path: Path) -> list[str]:
        stages = [{"stage": "prune", "sparsity": 0.5}]
        base = {"checkpoint": str(path), "epochs": 0}
        return fingerprints(
            recipe_from_dict({"model": {"name": "tiny_cnn"}, "baseline": base, "stages": stages})
        )

    here, there = tmp_path / "a.safetensors", tmp_path / "moved" / "b.safetensors"
    here.write_bytes(b"weights one")
    there.parent.mkdir()
    there.write_bytes(b"weights one")
    assert prints(here) == prints(there)
    there.write_bytes(b"weights two")
    os.utime(there, ns=(1, 1))  # (a new time: the cached digest is not reused)
    assert prints(there)[0] != prints(here)[0] and prints(there)[1] != prints(here)[1]
    assert prints(tmp_path / "missing") != prints(here)  # (named by its path: the run says so)


def _run_recipe(data_dir: str, stages: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": "prefix",
        "model": {"name": "tiny_cnn"},
        "data": {
            "dataset": "cifar10",
            "root": data_dir,
            "val_size": 50,
            "limit_train": 200,
            "limit_test": 100,
        },
        "train": {"batch_size": 64, "lr": 0.05, "amp": "off"},
        "baseline": {"epochs": 1},
        "stages": stages,
        "measure": {"runtimes": ["onnxruntime"], "batch_sizes": [1], "warmup": 1, "repeats": 5},
    }


@pytest.mark.integration
def test_a_pairwise_run_takes_over_the_first_two_stages_of_its_permutation(tmp_path, data_dir):
    """A->B is the first two stages of A->B->C: started from them, it trains nothing, and
    its model is the one an A->B run trained on its own gets, tensor for tensor."""
    from safetensors.torch import load_file

    from pqd.executors import train_trial
    from pqd.resume import PROGRESS
    from pqd.runs import start_from_siblings

    prune = {"stage": "prune", "sparsity": 0.5, "epochs": 1}
    distill = {"stage": "distill", "epochs": 1}
    quantize = {"stage": "quantize", "epochs": 1}
    three = _run_recipe(data_dir, [prune, distill, quantize])
    two = _run_recipe(data_dir, [prune, distill])
    assert train_trial(three, str(tmp_path / "abc"), None)["ok"]

    def trial(stages: list[dict[str, Any]]) -> Trial:
        recipe = recipe_from_dict(_run_recipe(data_dir, stages))
        order = tuple(s["stage"] for s in stages)
        return Trial("pairwise", order, 0, (1,) * len(stages), recipe, "k")

    siblings = [tmp_path / "abc", tmp_path / "nowhere"]
    (tmp_path / "ab").mkdir()
    taken = start_from_siblings(tmp_path / "ab", trial([prune, distill]), siblings)
    assert taken == ["00-baseline", "01-prune", "02-distill"]
    assert start_from_siblings(tmp_path / "ab", trial([prune, distill]), siblings) == []  # begun
    for other in ([distill, prune], [{**prune, "sparsity": 0.6}, distill]):
        (tmp_path / "other").mkdir(exist_ok=True)
        assert start_from_siblings(tmp_path / "other", trial(other), siblings) == []
    assert not (tmp_path / "other" / PROGRESS).exists()

    assert train_trial(two, str(tmp_path / "ab"), None)["ok"]
    assert train_trial(two, str(tmp_path / "alone"), None)["ok"]
    pending = json.loads((tmp_path / "ab" / "pending.json").read_text())
    assert pending["resume"]["reused_steps"] == taken
    assert pending["timing_s"]["earlier_processes"] == 0.0  # the donor's seconds, not its own
    got = load_file(tmp_path / "ab" / "checkpoints" / "02-distill.safetensors")
    want = load_file(tmp_path / "alone" / "checkpoints" / "02-distill.safetensors")
    assert set(got) == set(want) and any(k.startswith("mask.") for k in got)
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.integration
def test_a_ray_task_keeps_the_stages_it_receives_with_the_checkpoint_moved(
    monkeypatch, tmp_path, data_dir
):
    """A->B started from A->B->C's stages on the driver, trained by a Ray task on a node
    that holds the baseline checkpoint at another path: the task trains nothing again."""
    import sys
    import types

    import pqd.executors as executors
    from helpers import tiny
    from pqd.checkpoint import save_checkpoint
    from pqd.runs import start_from_siblings

    ckpt = tmp_path / "baseline.safetensors"
    save_checkpoint(tiny(), ckpt)
    prune = {"stage": "prune", "sparsity": 0.5, "epochs": 1}
    distill = {"stage": "distill", "epochs": 1}

    def recipe(*stages: dict[str, Any]) -> dict[str, Any]:
        data = _run_recipe(data_dir, list(stages))
        return {**data, "baseline": {"checkpoint": str(ckpt), "epochs": 0}}

    assert executors.train_trial(
        recipe(prune, distill, {"stage": "quantize"}), str(tmp_path / "abc"), None
    )["ok"]
    two = recipe(prune, distill)
    trial = Trial("pairwise", ("prune", "distill"), 0, (1, 1), recipe_from_dict(two), "k")
    (tmp_path / "ab").mkdir()
    taken = start_from_siblings(tmp_path / "ab", trial, [tmp_path / "abc"])
    assert taken == ["00-baseline", "01-prune", "02-distill"]
    context = types.SimpleNamespace(get_assigned_resources=lambda: {"CPU": 1.0})
    ray = types.SimpleNamespace(get_runtime_context=lambda: context)
    monkeypatch.setitem(sys.modules, "ray", ray)
    driver_only = {**two, "baseline": {**two["baseline"], "checkpoint": "/driver/only/b.st"}}
    result = executors._ray_train_trial(
        driver_only, None, ckpt.read_bytes(), executors._pack(tmp_path / "ab")
    )
    assert result["ok"], result
    executors._safe_extract(result.pop("files"), tmp_path / "ab")
    pending = json.loads((tmp_path / "ab" / "pending.json").read_text())
    assert pending["resume"]["reused_steps"] == taken  # the fingerprints matched


def test_a_free_worker_takes_trials_in_the_order_that_shares_stages(tmp_path) -> None:
    """The process executor's order: a trial whose every step a running trial trains waits
    for it; one that shares only some stages with a running trial starts after the trials
    that share nothing (never leaving a worker idle); a trial begun before starts."""
    from pqd.resume import PROGRESS
    from pqd.runs import Sharing

    prune, distill, quantize = ONE_EPOCH_STAGES

    def trial(*stages: dict[str, Any]) -> Trial:
        return _one_epoch_trial(tmp_path, *stages)

    pdq, pqd_, pd, dp, p = (
        trial(prune, distill, quantize),
        trial(prune, quantize, distill),
        trial(prune, distill),
        trial(distill, prune),
        trial(prune),
    )
    sharing = Sharing([])
    assert sharing.shared(pdq, pd) == 3 and sharing.shared(pdq, dp) == 1
    assert sharing.shared(p, pd) == 2 and sharing.shared(pdq, pqd_) == 2
    fresh = tmp_path / "fresh"
    assert sharing.level(pd, fresh, [pdq]) == Sharing.WAIT  # P->D->Q trains both its stages
    assert sharing.level(pqd_, fresh, [pdq]) == Sharing.LATER  # it trains the prune only
    assert sharing.level(dp, fresh, [pdq]) == Sharing.START  # only the baseline in common
    assert Sharing([pd]).level(p, fresh, [pdq]) == Sharing.START  # P->D offers the prune
    assert Sharing([p]).level(pd, fresh, [pdq]) == Sharing.WAIT  # more than P offers
    begun = tmp_path / "begun"
    begun.mkdir()
    (begun / PROGRESS).write_text("{}")
    assert sharing.level(pd, begun, [pdq]) == Sharing.START


@pytest.mark.integration
def test_worker_processes_hold_a_pairwise_run_until_its_permutation_trained_its_stages(
    tmp_path, data_dir
):
    """With two free workers, A->B waits for A->B->C instead of training A and B beside it,
    then takes them over (the baseline comes from the recipe's checkpoint, as in a search)."""
    from pqd.executors import Executor, train_trial
    from pqd.runs import Sharing, start_from_siblings

    prune = {"stage": "prune", "sparsity": 0.5, "epochs": 1}
    distill = {"stage": "distill", "epochs": 1}
    quantize = {"stage": "quantize", "epochs": 1}
    base = _run_recipe(data_dir, [])
    assert train_trial(base, str(tmp_path / "baseline"), None)["ok"]
    checkpoint = str(tmp_path / "baseline" / "baseline.safetensors")

    def trial(*stages: dict[str, Any]) -> Trial:
        data = _run_recipe(data_dir, list(stages))
        data["baseline"] = {"checkpoint": checkpoint}
        order = tuple(s["stage"] for s in stages)
        key = "-".join(order)  # (a trial's key names its recipe)
        return Trial("permutation", order, 0, (1,) * len(stages), recipe_from_dict(data), key)

    jobs = [
        (trial(prune, distill, quantize), tmp_path / "pdq"),
        (trial(prune, distill), tmp_path / "pd"),
    ]
    events: list[str] = []
    sharing = Sharing([])

    def starting(t: Trial, folder: Path) -> None:
        taken = start_from_siblings(folder, t, [f for _, f in jobs if f != folder])
        events.append(f"start {folder.name} {len(taken)}")

    def done(t: Trial, folder: Path, result: dict[str, Any]) -> None:
        assert result["ok"], result
        sharing.finished.append(t)
        events.append(f"done {folder.name}")

    for _, folder in jobs:
        folder.mkdir()
    with Executor("processes", 2, None, data_dir, False) as ex:
        ex.run(jobs, done, starting=starting, order=sharing.level)
    assert events == ["start pdq 0", "done pdq", "start pd 3", "done pd"]
    pending = json.loads((tmp_path / "pd" / "pending.json").read_text())
    assert pending["resume"]["reused_steps"] == ["00-baseline", "01-prune", "02-distill"]


# ---------------------------------------------------------------------------- decisions


def test_decide_pair_accuracy_then_latency_then_tie():
    from types import SimpleNamespace

    from pqd.stats import compare_over_seeds

    spec = SimpleNamespace(alpha=0.05, min_effect_points=0.0, tie_latency=0.1)
    n = 1000
    a = np.arange(n) < 800
    b_far = np.arange(n) < 760  # a alone right on 40 images: p ~ 1e-12
    b_near = np.arange(n) < 798  # 2 images apart: no evidence
    far, near = compare_over_seeds([(a, b_far)]), compare_over_seeds([(a, b_near)])
    assert decide_pair(True, True, far, far["p_value"], 1.0, 0.5, spec) == ("ab", "accuracy")
    back = compare_over_seeds([(b_far, a)])
    assert decide_pair(True, True, back, back["p_value"], 0.5, 1.0, spec) == ("ba", "accuracy")
    assert decide_pair(True, True, near, near["p_value"], 1.0, 0.5, spec) == ("ba", "latency")
    assert decide_pair(True, True, near, near["p_value"], 1.0, 0.95, spec) == (None, "tie")
    # significant alone, not after a correction that lifts p over alpha
    assert decide_pair(True, True, far, 0.06, 1.0, 0.95, spec) == (None, "tie")
    # the smallest effect worth reporting
    big = SimpleNamespace(alpha=0.05, min_effect_points=5.0, tie_latency=0.1)
    assert decide_pair(True, True, far, far["p_value"], 1.0, 0.95, big) == (None, "tie")
    assert decide_pair(False, True, None, None, 1.0, 1.0, spec) == ("ba", "the other run failed")
    assert decide_pair(False, False, None, None, None, None, spec) == (None, "both runs failed")


def test_pair_that_flips_between_seeds_ties():
    """Seed 0 favours A->B by 4 points, seed 1 favours B->A by 4: pooled the images cancel,
    and no seed-level interval excludes 0."""
    from pqd.stats import compare_over_seeds, decide

    n = 2000
    hi, lo = np.arange(n) < 1640, np.arange(n) < 1560
    c = compare_over_seeds([(hi, lo), (lo, hi)])
    assert c["dominant"] == "seed spread" and c["seed_ci"][0] < 0 < c["seed_ci"][1]
    assert c["heterogeneity_p"] < 1e-6
    assert decide(c, c["p_value"]) == "tie"
    # two seeds agreeing at +4 and +3 points: within what the images explain (Cochran's Q),
    # so the 4,000 pooled paired images decide: a clear win
    mid = np.arange(n) < 1580
    c2 = compare_over_seeds([(hi, lo), (hi, mid)])
    assert c2["heterogeneity_p"] > 0.05
    assert decide(c2, c2["p_value"]) == "a"


def test_topological_order_of_a_known_win_table():
    edges = [("quantize", "distill"), ("prune", "distill"), ("prune", "quantize")]
    got = topological_order(["quantize", "distill", "prune"], edges)
    assert got == {"order": ["prune", "quantize", "distill"], "unique": True, "cycle": None}


def test_topological_order_reports_a_cycle_and_forces_no_order():
    edges = [
        ("prune", "quantize"),
        ("quantize", "distill"),
        ("distill", "prune"),
        ("prune", "exit"),
        ("quantize", "exit"),
        ("distill", "exit"),
    ]
    got = topological_order(["prune", "quantize", "distill", "exit"], edges)
    assert got["order"] is None and not got["unique"]
    cycle = got["cycle"]
    assert {tuple(e) for e in cycle} == {
        ("prune", "quantize"),
        ("quantize", "distill"),
        ("distill", "prune"),
    }
    assert all(a[1] == b[0] for a, b in zip(cycle, cycle[1:] + cycle[:1], strict=True))


def test_topological_order_with_a_tie_is_not_unique():
    got = topological_order(["a", "b", "c"], [("a", "c"), ("b", "c")])
    assert got["order"] == ["a", "b", "c"] and got["unique"] is False and got["cycle"] is None


def test_pareto_front_of_known_points():
    points = [
        (0.80, 4.0, 1.0),  # 0 baseline: most accurate
        (0.79, 1.0, 0.4),  # 1 compressed: small and fast
        (0.78, 1.0, 0.4),  # 2 dominated by 1
        (0.79, 1.0, 0.5),  # 3 dominated by 1 (slower)
        (0.70, 0.9, 0.6),  # 4 smallest
        (0.60, 2.0, 2.0),
    ]  # 5 dominated by everything
    assert pareto_front(points) == [0, 1, 4]
    # latencies within 30% count as equal: 3 is no longer beaten by 1
    assert pareto_front(points, latency_tolerance=0.3) == [0, 1, 3, 4]
    assert pareto_front([(0.5, 1.0, 1.0), (0.5, 1.0, 1.0)]) == [0, 1]  # equal points both stay
    # a few bytes smaller is not smaller with a 1% size tolerance
    close = [(0.80, 1000.0, 1.0), (0.79, 999.0, 1.0)]
    assert pareto_front(close) == [0, 1] and pareto_front(close, size_tolerance=0.01) == [0]


# ---------------------------------------------------------------------------- errors


def test_search_section_errors_are_one_line():
    bad = [
        ({"budget": [50, 50]}, "search.budget has 2 entries for 3 stages"),
        ({"budget": [20, 40, 50]}, "search.budget sums to 110"),
        ({"seeds": [1, 1]}, "lists a seed twice"),
        ({"mode": "all"}, "search.mode"),
        ({"executor": "ray"}, "search.executor: Extra inputs"),
    ]
    for search, text in bad:
        with pytest.raises(RecipeError, match=text) as err:
            search_recipe(**search)
        assert "fix:" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(RecipeError, match="at least 2 stages"):
        search_recipe(STAGES[:1])
    with pytest.raises(RecipeError, match="repeats one"):
        search_recipe([STAGES[0], STAGES[0]])


def test_executor_errors(monkeypatch):
    with pytest.raises(PqdError, match="unknown executor 'dask'"):
        check_executor("dask", None, None)
    with pytest.raises(PqdError, match="--address is for the Ray executor"):
        check_executor("sequential", None, "host:6379")
    assert check_executor("sequential", 2, None) == "processes"
    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(PqdError, match=r"pip install -e '\.\[ray\]'"):
        check_executor("ray", None, None)


def test_cli_bad_search_exits_2_with_one_line(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: {name: tiny_cnn}\nstages: [{stage: prune, sparsity: 0.5}, "
        "{stage: distill}]\nsearch: {budget: [20, 40, 40]}\n"
    )
    assert main(["search", str(recipe), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pqd: error:") and "budget has 3 entries for 2 stages" in err
    assert len(err.splitlines()) == 1
    recipe.write_text(
        "model: {name: tiny_cnn}\nstages: [{stage: prune, sparsity: 0.5}, "
        "{stage: distill}]\nsearch: {}\n"
    )
    assert main(["search", str(recipe), "--out", str(tmp_path / "o"), "--executor", "x"]) == 2
    assert "unknown executor 'x'" in capsys.readouterr().err
    pytest.importorskip("ray")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    assert (
        main(
            [
                "search",
                str(recipe),
                "--out",
                str(tmp_path / "o"),
                "--executor",
                "ray",
                "--address",
                f"127.0.0.1:{port}",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert f"cannot reach the Ray cluster at 127.0.0.1:{port}" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "o" / "baseline").exists()


# ---------------------------------------------------------------------------- reports


def fake_search(
    accuracy: dict[str, float],
    seeds: tuple[int, ...] = (0,),
    failed: tuple[str, ...] = (),
    drops: dict[str, float] | None = None,
    latency: dict[str, float] | None = None,
    graphs: bool = False,
    **search: Any,
) -> dict[str, Any]:
    """A search analysed from made-up results: accuracy by order 'p>q>d' (INT8 when q in it,
    '' is the baseline), the orders in ``failed`` failed; ``drops``: each order's audit
    (largest per-class drop in points, default 1); ``latency``: p50 (ms) by order (default
    0.4 INT8, 1.3 FP32); ``graphs``: every INT8 file one graph and every FP32 file
    another (else no graph is known)."""
    recipe = search_recipe(total_epochs=5, budget=[20, 40, 40], seeds=list(seeds), **search)
    trials = plan_trials(recipe, "/c", "d", "/data")

    def entry(t: Trial, seed: int) -> dict[str, Any]:
        name = ">".join(s[0] for s in t.order)
        int8 = "quantize" in t.order
        base = {
            "group": t.group,
            "kind": t.kind,
            "order": list(t.order),
            "label": " -> ".join(t.order) or "baseline",
            "seed": seed,
            "epochs": list(t.epochs),
            "key": t.key,
            "dir": t.folder,
        }
        if name in failed:
            return {**base, "status": "failed", "error": "loss became nan"}
        return {
            **base,
            "status": "done",
            "accuracy": accuracy.get(name, 0.78) + 0.002 * seed,
            "size_bytes": 1_200_000 if int8 else 4_500_000,
            "latency_ms": {
                "p50": (latency or {}).get(name, 0.4 if int8 else 1.3),
                "p90": 0.5 if int8 else 1.5,
            },
            "precision": "int8" if int8 else "fp32",
            "graph": ("int8" if int8 else "fp32") if graphs else None,
            "sparsity": 0.5 if "prune" in t.order else 0.0,
            "audit": None
            if drops is None
            else {
                "worst_class_drop_points": drops.get(name, 1.0) + seed,
                "worst_class": "cat",
                "disagreement": 0.05,
                "ece": 0.02,
                "corruption_accuracy": None,
            },
        }

    base = Trial("baseline", (), 0, (30,), recipe, "basekey")
    entries = [entry(t, t.seed) for t in trials]
    # per-image correctness consistent with each accuracy: the first round(acc * n) images
    # (nested sets, so two orders differ on exactly the images between their counts)
    n_test = 1017
    correct = {
        e["key"]: np.arange(n_test) < round(e["accuracy"] * n_test)
        for e in [entry(base, 0), *entries]
        if e["status"] == "done"
    }
    data = {
        "name": "cifar10",
        "train": 4670,
        "val": 500,
        "test": 1017,
        "subset_note": "the test split holds 1017 of the official 10000 test images",
    }
    panel: dict[str, Any] = {
        "runtime": "onnxruntime",
        "threads": 2,
        "host": "vm",
        "cpu": "AMD EPYC",
    }
    search = analyse(
        recipe,
        entry(base, 0),
        entries,
        executor={"kind": "sequential"},
        panel=panel,
        data=data,
        unique_runs=16,
        correct=correct,
    )
    search["runs"].update(trained_now=16, reused=0, failed=0)
    search["timing_s"] = {"train": 100.0, "measure": 20.0, "panel": 5.0, "total": 130.0}
    return search


def test_analysis_ranks_derives_the_order_and_finds_the_frontier():
    acc = {
        "p>q>d": 0.79,
        "p>d>q": 0.785,
        "q>p>d": 0.77,
        "q>d>p": 0.76,
        "d>p>q": 0.775,
        "d>q>p": 0.765,
        "p>q": 0.78,
        "q>p": 0.77,
        "p>d": 0.75,
        "d>p": 0.74,
        "q>d": 0.76,
        "d>q": 0.75,
        "p": 0.76,
        "q": 0.77,
        "d": 0.795,
        "": 0.78,
    }
    search = fake_search(acc)
    pw = search["pairwise"]
    assert pw["order"] == ["prune", "quantize", "distill"] and pw["unique"]
    assert pw["cycle"] is None and sorted(map(tuple, pw["edges"])) == [
        ("prune", "distill"),
        ("prune", "quantize"),
        ("quantize", "distill"),
    ]
    assert search["ranking"][0] == search["best"] == "permutation:prune>quantize>distill"
    # frontier: distill-only (FP32, most accurate) and the best INT8 order
    assert set(search["pareto"]) == {"reference:distill", "permutation:prune>quantize>distill"}
    runs = search["runs"]
    assert runs["pairwise_method"] == {"runs": 6, "epochs": 18}
    assert runs["permutation_search"] == {"runs": 6, "epochs": 30}
    versus = {v["reference"]: v for v in search["best_vs_references"]}
    assert versus["reference:quantize"]["best_dominates"]
    assert not versus["reference:distill"]["best_dominates"]


def test_a_latency_difference_within_the_panels_noise_floor_decides_nothing():
    from pqd.report import render_search_markdown

    # 11% apart, every accuracy the same; without graphs latency decides prune/quantize
    lat = {"p>q": 0.40, "q>p": 0.45, "q": 0.44}

    def prune_quantize(search: dict[str, Any]) -> dict[str, Any]:
        return next(
            r for r in search["pairwise"]["table"] if {r["a"], r["b"]} == {"prune", "quantize"}
        )

    plain = fake_search({}, latency=lat)
    assert plain["criterion"]["latency_tolerance"] == 0.1
    assert prune_quantize(plain)["first"] == "prune"
    assert prune_quantize(plain)["decided_by"] == "latency"
    # the same INT8 graph for both: their 11% is the panel's own spread, so it decides nothing
    noisy = fake_search({}, latency=lat, graphs=True)
    floor, c = noisy["latency_panel"]["identical_graphs"], noisy["criterion"]
    assert floor["spread"] == (0.45 - 0.40) / 0.45 and floor["graphs"] == 2
    assert floor["names"][1] == "pairwise:quantize>prune"  # the slowest INT8 result
    assert c["tie_latency"] == 0.1 and c["latency_tolerance"] == floor["spread"]
    assert "raised to the spread between results whose files share one graph" in c["text"]
    assert prune_quantize(noisy)["first"] is None and noisy["pairwise"]["edges"] == []
    page = render_search_markdown(noisy)
    assert "in 2 graphs) differed by up to 11.1% in this panel (" in page
    assert "against quantize -> prune): the panel's noise floor." in page
    assert "latencies within 11.1% and sizes within 1%" in page
    assert "differed by up to" not in render_search_markdown(plain)


def test_analysis_reports_a_cycle_and_aggregates_seeds():
    acc = {"p>q": 0.80, "q>p": 0.75, "q>d": 0.80, "d>q": 0.75, "d>p": 0.80, "p>d": 0.75}
    search = fake_search(acc, seeds=(0, 1))
    pw = search["pairwise"]
    assert pw["order"] is None and len(pw["cycle"]) == 3
    assert {tuple(e) for e in pw["cycle"]} == {
        ("prune", "quantize"),
        ("quantize", "distill"),
        ("distill", "prune"),
    }
    group = next(g for g in search["groups"] if g["id"] == "pairwise:prune>quantize")
    assert group["n"] == 2 and group["seeds"] == [0, 1]
    assert group["accuracy_mean"] == pytest.approx(0.801)
    assert group["accuracy_std"] == pytest.approx(0.002 / 2**0.5)


def test_frontier_points_losing_a_class_are_flagged():
    from pqd.report import render_search_markdown

    acc = {"p>q>d": 0.79, "d": 0.795, "": 0.78}
    search = fake_search(acc, seeds=(0, 1), drops={"p>q>d": 2.5, "d": 0.5}, flag_class_drop=3.0)
    assert set(search["pareto"]) == {"reference:distill", "permutation:prune>quantize>distill"}
    # worst case over the seeds: 2.5 + 1 > 3 points; distill-only 0.5 + 1 is not
    assert search["class_drop_flag"] == {
        "threshold_points": 3.0,
        "flagged": ["permutation:prune>quantize>distill"],
    }
    group = next(g for g in search["groups"] if g["id"] == "permutation:prune>quantize>distill")
    assert group["audit"]["worst_class_drop_points"] == 3.5 and group["class_drop_flag"]
    text = render_search_markdown(search)
    assert "## Audit per order" in text and "FLAGGED" in text
    assert "Flagged: Pareto-front point(s) prune -> quantize -> distill" in text
    # off by default; no audit, no section
    plain = fake_search(acc)
    assert plain["class_drop_flag"] is None and "Audit per order" not in (
        render_search_markdown(plain)
    )


def test_derived_order_text_for_ties_and_partial_orders():
    from pqd.report import derived_order_text

    tied = fake_search({})  # every order equally accurate, equal latencies
    assert tied["pairwise"]["edges"] == [] and tied["pairwise"]["order"] is not None
    assert "prefer no order" in derived_order_text(tied)
    partial = fake_search({"p>q": 0.80, "q>p": 0.70})
    text = derived_order_text(partial)
    assert "partial order (prune before quantize" in text and "(not unique)" in text
    assert "tied: prune / distill, quantize / distill" in text


def test_report_renders_from_a_stored_search_json(tmp_path, capsys):
    acc = {"p>q": 0.80, "q>p": 0.75, "q>d": 0.80, "d>q": 0.75, "d>p": 0.80, "p>d": 0.75}
    search = fake_search(acc)
    (tmp_path / "search.json").write_text(json.dumps(search))
    assert main(["report", str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "| 1 | permutation |" in md and "| - | reference | distill | 5 |" in md
    assert "| prune, quantize | 80.00% | 75.00% | +5.00 pts |" in md
    assert "form a cycle" in md and "no order is derived" in md
    assert md in capsys.readouterr().out
    html = (tmp_path / "report.html").read_text()
    assert html.count('src="data:image/png;base64,iVBOR') == 4  # embedded PNGs
    assert (
        html.count("<table>") == 3 and "no order is derived" in html
    )  # results, every pair of orders, pairwise
    for name in ("accuracy_latency", "accuracy_size", "orders", "pairwise_graph"):
        assert (tmp_path / "plots" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_failed_trials_lose_their_pair_and_are_listed(tmp_path):
    search = fake_search({"p>q": 0.70, "q>p": 0.80}, failed=("q>p",))
    row = next(r for r in search["pairwise"]["table"] if {r["a"], r["b"]} == {"prune", "quantize"})
    assert row["first"] == "prune" and row["decided_by"] == "the other run failed"
    from pqd.report import write_search_report

    write_search_report(search, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "## Failed trials" in md and "pairwise quantize -> prune seed 0: loss became nan" in md
    assert "| - | pairwise | quantize -> prune | 1/2 | failed |" in md


def test_report_of_a_folder_without_records_fails(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "record.json does not exist" in err and "pqd search" in err


# ---------------------------------------------------------------------------- integration

TINY = """\
name: tiny-search
model: {name: tiny_cnn}
data: {dataset: cifar10, val_size: 64, limit_train: 448, limit_test: 128}
train: {batch_size: 32, lr: 0.05, amp: "off"}
baseline: {epochs: 2}
stages:
  - {stage: prune, sparsity: 0.5}
  - {stage: distill}
export: {parity_samples: 32}
measure: {runtimes: [onnxruntime], batch_sizes: [1], warmup: 5, repeats: 20}
search: {total_epochs: 2, budget: [50, 50]}
"""


@pytest.fixture(scope="module")
def data_dir(subset_dir: Path) -> str:
    return str(subset_dir)


@pytest.fixture(scope="module")
def sequential(tmp_path_factory, data_dir) -> tuple[Path, Path, dict[str, Any]]:
    """The tiny search run once through the CLI, sequentially (shared by the tests below)."""
    root = tmp_path_factory.mktemp("search")
    recipe = root / "tiny.yaml"
    recipe.write_text(TINY)
    out = root / "seq"
    assert (
        main(["search", str(recipe), "--out", str(out), "--data-dir", data_dir, "--no-progress"])
        == 0
    )
    return recipe, out, json.loads((out / "search.json").read_text())


def _accuracies(search: dict[str, Any]) -> dict[str, float]:
    return {t["key"]: t["accuracy"] for t in search["trials"] if t["status"] == "done"}


@pytest.mark.integration
def test_cli_search_writes_every_order_frontier_pairwise_and_reports(sequential):
    _, out, search = sequential
    assert search["executor"] == {"kind": "sequential"}
    groups = {g["id"]: g for g in search["groups"]}
    assert set(groups) == {
        "baseline",
        "permutation:prune>distill",
        "permutation:distill>prune",
        "pairwise:prune>distill",
        "pairwise:distill>prune",
        "reference:prune",
        "reference:distill",
    }
    for g in groups.values():
        assert 0.0 <= g["accuracy_mean"] <= 1.0 and g["size_bytes"] > 0
        assert g["latency_p50_ms"] > 0 and g["latency_p90_ms"] >= g["latency_p50_ms"]
    assert groups["reference:prune"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert groups["baseline"]["sparsity"] < 0.05
    assert search["runs"]["unique_runs"] == 5 and search["runs"]["trained_now"] == 5
    assert search["pareto"] and set(search["pareto"]) <= set(groups)
    assert len(search["ranking"]) == 2 and search["pairwise"]["runs"] == 2
    pw = search["pairwise"]
    assert (pw["order"] is None) == (pw["cycle"] is not None) or pw["ties"]
    # every file is one FP32 graph (unstructured masks keep the shapes): the panel's floor
    same, c = search["latency_panel"]["identical_graphs"], search["criterion"]
    assert {t["graph"] for t in search["trials"]} == {search["baseline"]["graph"]}
    assert same["graphs"] == 1 and same["count"] == len(groups) and 0.0 <= same["spread"] < 1.0
    p50 = sorted(groups[n]["latency_p50_ms"] for n in groups)
    assert same["spread"] == pytest.approx(1 - p50[0] / p50[-1], abs=1e-4)
    assert c["latency_tolerance"] == max(c["tie_latency"], same["spread"])
    # every trial is an ordinary run folder whose record says where latency was measured
    for t in search["trials"]:
        record = json.loads((out / t["record"]).read_text())
        assert record["order"] == t["order"] and record["seed"] == t["seed"]
        assert "driver" in record["measurement"]["where"]
        assert record["baseline"]["source"]["checkpoint"].endswith("baseline.safetensors")
        assert record["final"]["accuracy"] == t["accuracy"]
    assert (out / "report.html").stat().st_size > 10_000 and (out / "report.md").is_file()
    assert main(["report", str(out / "baseline")]) == 0  # a run folder still reports as a run
    steps = search["timing_s"]["steps"]  # training over every invocation
    assert 0 < steps["once"] <= steps["every"]
    listed = json.loads((out / "trials.json").read_text())  # (pqd report while it runs)
    assert {t["folder"] for t in listed} == {t["dir"] for t in search["trials"]}


@pytest.mark.integration
def test_rerun_reuses_finished_trials_and_redoes_half_finished_ones(sequential, tmp_path, data_dir):
    recipe, seq, first = sequential
    out = tmp_path / "resume"
    shutil.copytree(seq, out)
    victim = next(t for t in first["trials"] if t["kind"] == "reference")
    (out / victim["dir"] / "record.json").unlink()  # half-finished: exported, never measured
    kept = next(t for t in first["trials"] if t["kind"] == "permutation")
    before = (out / kept["record"]).stat().st_mtime_ns
    from pqd.recipe import load_recipe
    from pqd.search import run_search

    search = run_search(load_recipe(recipe), out, data_dir=data_dir, progress=False)
    assert search["runs"]["trained_now"] == 1 and search["runs"]["reused"] == 4
    assert (out / victim["dir"] / "record.json").is_file()
    assert (out / kept["record"]).stat().st_mtime_ns == before
    again = _accuracies(search)
    assert again == pytest.approx(_accuracies(first), abs=0.025)


@pytest.mark.integration
def test_another_recipes_finished_baseline_is_refused_unless_fresh(
    sequential, tmp_path, data_dir, capsys
):
    """A re-run with a changed baseline (here: another epoch count) would delete the finished
    baseline and orphan its trials: refused in one line with nothing written; --fresh
    retrains it, and the first recipe's trial folders stay."""
    recipe, seq, _ = sequential
    out = tmp_path / "other"
    shutil.copytree(seq, out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    argv = ["search", str(recipe), "--out", str(out), "--data-dir", data_dir, "--no-progress"]
    changed = [*argv, "baseline.epochs=1", "search.mode=permutations", "search.references=false"]
    assert main(changed) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds the finished baseline of another" in err
    assert "--fresh" in err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    assert main([*changed, "--fresh"]) == 0
    search = json.loads((out / "search.json").read_text())
    assert search["runs"]["trained_now"] == 3  # the baseline and the two orders
    assert {p.name for p in (seq / "trials").iterdir()} <= {
        p.name for p in (out / "trials").iterdir()
    }


@pytest.mark.integration
def test_process_executor_matches_sequential(sequential, tmp_path, data_dir):
    recipe, seq, first = sequential
    out = tmp_path / "proc"
    out.mkdir()
    shutil.copytree(seq / "baseline", out / "baseline")  # the same shared baseline
    assert (
        main(
            [
                "search",
                str(recipe),
                "--out",
                str(out),
                "--data-dir",
                data_dir,
                "--no-progress",
                "--workers",
                "2",
                "search.mode=permutations",
                "search.references=false",
            ]
        )
        == 0
    )
    search = json.loads((out / "search.json").read_text())
    assert search["executor"] == {"kind": "processes", "workers": 2}
    got, want = _accuracies(search), _accuracies(first)
    assert len(got) == 2 and got == pytest.approx({k: want[k] for k in got}, abs=0.025)


@pytest.mark.integration
def test_ray_executor_matches_sequential(sequential, tmp_path, data_dir):
    ray = pytest.importorskip("ray")
    recipe, seq, first = sequential
    out = tmp_path / "ray"
    out.mkdir()
    shutil.copytree(seq / "baseline", out / "baseline")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert (
            main(
                [
                    "search",
                    str(recipe),
                    "--out",
                    str(out),
                    "--data-dir",
                    data_dir,
                    "--no-progress",
                    "--executor",
                    "ray",
                    "search.mode=permutations",
                    "search.references=false",
                ]
            )
            == 0
        )
    finally:
        ray.shutdown()
    search = json.loads((out / "search.json").read_text())
    assert search["executor"]["kind"] == "ray"
    got, want = _accuracies(search), _accuracies(first)
    assert len(got) == 2 and got == pytest.approx({k: want[k] for k in got}, abs=0.025)
    for t in search["trials"]:
        record = json.loads((out / t["record"]).read_text())
        assert record["measurement"]["trained_on"]["torch_threads"] == 1  # one CPU per task


def test_benchmark_prints_the_table_of_a_stored_search(tmp_path, capsys):
    bench = load_benchmark("search")
    search = fake_search({"p>q>d": 0.79, "p": 0.70})
    (tmp_path / "search.json").write_text(json.dumps(search))
    assert bench.main(["--from", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    row = "| 1 | permutation | prune -> quantize -> distill | 1/2/2 | 79.00% [76.3, 81.4] | 1.200 |"
    assert row in out  # Wilson on 1017 images: 803 right
    assert (
        "| - | reference | prune | 5 | 70.00% [67.1, 72.7] | 4.500 | 1.300 | 1.00x | 50% |" in out
    )
    assert "pairwise method: 6 two-stage runs (18 epochs)" in out
    assert bench.main(["--from", str(tmp_path / "nothing")]) == 2


class _FakeRay:
    """Just enough of the ray API for Executor: records task options and arguments."""

    def __init__(self, gpus: float) -> None:
        self.gpus, self.options, self.calls = gpus, {}, []

    def is_initialized(self) -> bool:
        return True

    def cluster_resources(self) -> dict[str, float]:
        return {"CPU": 8.0, "GPU": self.gpus} if self.gpus else {"CPU": 8.0}

    def put(self, value: bytes) -> tuple[str, int]:
        return ("blob", len(value))

    def remote(self, fn):
        fake = self

        class Task:
            def options(self, **kw):
                fake.options = kw
                return self

            def remote(self, *args):
                fake.calls.append(args)
                return len(fake.calls) - 1

        return Task()

    def wait(self, refs, num_returns=1):
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref):
        import io
        import tarfile

        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            data = json.dumps({"ref": ref}).encode()
            info = tarfile.TarInfo("./pending.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        return {"ok": True, "seconds": 1.0, "host": "node", "threads": 1, "files": buf.getvalue()}


@pytest.mark.parametrize("gpus", [0, 2])
def test_ray_executor_asks_for_a_gpu_when_the_cluster_has_them(monkeypatch, tmp_path, gpus):
    import sys

    from pqd.executors import Executor

    fake = _FakeRay(gpus)
    monkeypatch.setitem(sys.modules, "ray", fake)
    ckpt = tmp_path / "base.safetensors"
    ckpt.write_bytes(b"12345")
    trials = plan_trials(search_recipe(total_epochs=5), str(ckpt), "d", "/data")[:2]
    done = []
    with Executor("ray", None, None, "/data", False) as ex:
        ex.run(
            [(t, tmp_path / t.folder) for t in trials], lambda t, f, r: done.append((t.key, f, r))
        )
        assert ex.describe() == {
            "kind": "ray",
            "address": "auto",
            "gpus_per_trial": 1 if gpus else 0,
        }
    assert fake.options["num_gpus"] == (1 if gpus else 0) and fake.options["num_cpus"] == 1
    assert [c[1] for c in fake.calls] == ["/data", "/data"]
    assert all(c[2] == ("blob", 5) for c in fake.calls)  # the checkpoint travels as bytes
    assert [k for k, _, _ in done] == [t.key for t in trials]
    for _, folder, result in done:  # each run folder came back and was unpacked
        assert json.loads((folder / "pending.json").read_text())["ref"] in (0, 1)
        assert "files" not in result


def test_ray_task_ships_the_checkpoint_and_returns_the_folder_with_driver_paths(
    monkeypatch, tmp_path
):
    import sys
    import types

    import pqd.executors as search

    ray = types.SimpleNamespace(
        get_runtime_context=lambda: types.SimpleNamespace(
            get_assigned_resources=lambda: {"CPU": 2.0}
        )
    )
    monkeypatch.setitem(sys.modules, "ray", ray)
    seen = {}

    def fake_train(recipe_data, out_dir, data_dir, progress, threads):
        ckpt = recipe_data["baseline"]["checkpoint"]
        shared = Path(out_dir, "checkpoints", "01-prune.safetensors")  # the folder it received
        seen.update(ckpt=ckpt, bytes=Path(ckpt).read_bytes(), threads=threads)
        seen.update(shared=shared.read_bytes() if shared.is_file() else None)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        Path(out_dir, "pending.json").write_text(json.dumps({"source": ckpt}))
        Path(out_dir, "recipe.yaml").write_text(f"checkpoint: {ckpt}\n")
        Path(out_dir, "progress.json").write_text(json.dumps({"recipe": {"checkpoint": ckpt}}))
        return {"ok": True, "seconds": 1.0, "host": "node", "threads": threads}

    monkeypatch.setattr(search, "train_trial", fake_train)
    driver_path = "/driver/only/baseline.safetensors"  # not on this "node"
    recipe = {"baseline": {"checkpoint": driver_path}}
    begun = tmp_path / "begun"
    (begun / "checkpoints").mkdir(parents=True)
    (begun / "checkpoints" / "01-prune.safetensors").write_bytes(b"pruned")
    result = search._ray_train_trial(recipe, "/data", b"weights", search._pack(begun))
    assert seen["bytes"] == b"weights" and seen["ckpt"] != driver_path and seen["threads"] == 2
    assert seen["shared"] == b"pruned"
    search._safe_extract(result.pop("files"), tmp_path)
    assert json.loads((tmp_path / "pending.json").read_text()) == {"source": driver_path}
    assert (tmp_path / "recipe.yaml").read_text() == f"checkpoint: {driver_path}\n"
    from pqd.fingerprint import sha

    progress = json.loads((tmp_path / "progress.json").read_text())
    assert progress["recipe"] == {"checkpoint": driver_path}  # and hashed as the driver's
    assert progress["recipe_sha256"] == sha({"checkpoint": driver_path})
    assert (tmp_path / "checkpoints" / "01-prune.safetensors").read_bytes() == b"pruned"
    assert not Path(seen["ckpt"]).exists()  # the task's temporary folder is gone


def test_ray_trials_share_stages_and_receive_their_folders(monkeypatch, tmp_path) -> None:
    """Ray schedules as the worker processes do: a pairwise run whose stages the running
    permutation trains waits for it, then its task receives the folder that ``starting``
    filled (the stages it takes over)."""
    import io
    import sys
    import tarfile

    from pqd.executors import Executor
    from pqd.runs import Sharing

    fake = _FakeRay(0)
    monkeypatch.setitem(sys.modules, "ray", fake)
    prune, distill, quantize = ONE_EPOCH_STAGES

    def trial(*stages: dict[str, Any]) -> Trial:
        return _one_epoch_trial(tmp_path, *stages)

    pdq, pd = trial(prune, distill, quantize), trial(prune, distill)
    sharing, events = Sharing([]), []

    def starting(t: Trial, folder: Path) -> None:
        events.append(("start", t.key, len(fake.calls)))
        if t is pd:  # (as start_from_siblings copies P->D->Q's stages)
            (folder / "checkpoints").mkdir(parents=True)
            (folder / "checkpoints" / "02-distill.safetensors").write_bytes(b"shared")

    def done(t: Trial, folder: Path, result: dict[str, Any]) -> None:
        events.append(("done", t.key, len(fake.calls)))
        sharing.finished.append(t)

    jobs = [(pdq, tmp_path / "pdq"), (pd, tmp_path / "pd")]
    with Executor("ray", None, None, "/data", False) as ex:
        ex.run(jobs, done, starting=starting, order=sharing.level)
    assert events == [  # 8 CPUs free, yet P->D waits for P->D->Q
        ("start", "prune-distill-quantize", 0),
        ("done", "prune-distill-quantize", 1),
        ("start", "prune-distill", 1),
        ("done", "prune-distill", 2),
    ]
    assert fake.calls[0][3] is None  # nothing begun: no folder travels
    with tarfile.open(fileobj=io.BytesIO(fake.calls[1][3]), mode="r:gz") as tar:
        shipped = tar.extractfile("./checkpoints/02-distill.safetensors")
        assert shipped is not None and shipped.read() == b"shared"
    assert (tmp_path / "pd" / "pending.json").is_file()  # the folder came back in its place:
    assert not (tmp_path / "pd" / "checkpoints").exists()  # what the task removed is gone


def _listener(reply: bytes) -> tuple[socket.socket, int]:
    """A TCP port that accepts, reads the client's first bytes, answers ``reply`` and closes:
    something that listens but is not Ray."""
    import contextlib
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = srv.accept()
                with conn:
                    conn.recv(64)
                    conn.sendall(reply)

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1]


def _search_recipe(tmp_path: Path) -> Path:
    recipe = tmp_path / "s.yaml"
    recipe.write_text(
        "model: {name: tiny_cnn}\nstages: [{stage: prune, sparsity: 0.5}, "
        "{stage: distill}]\nsearch: {}\n"
    )
    return recipe


@pytest.mark.parametrize("reply", [b"", b"SSH-2.0-OpenSSH_9.6\r\n", b"HTTP/1.1 400 Bad\r\n\r\n"])
def test_a_port_that_is_not_ray_is_one_line_and_leaves_no_folder(tmp_path, capfd, reply):
    pytest.importorskip("ray")
    srv, port = _listener(reply)
    try:
        out = tmp_path / "o"
        assert (
            main(
                [
                    "search",
                    str(_search_recipe(tmp_path)),
                    "--out",
                    str(out),
                    "--executor",
                    "ray",
                    "--address",
                    f"127.0.0.1:{port}",
                ]
            )
            == 2
        )
    finally:
        srv.close()
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"127.0.0.1:{port} answers, but not as a Ray cluster" in err
    assert not out.exists()


def test_an_unreachable_ray_leaves_no_folder(tmp_path, capfd):
    pytest.importorskip("ray")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    out = tmp_path / "deep" / "o"
    assert (
        main(
            [
                "search",
                str(_search_recipe(tmp_path)),
                "--out",
                str(out),
                "--executor",
                "ray",
                "--address",
                f"127.0.0.1:{port}",
            ]
        )
        == 2
    )
    assert len(capfd.readouterr().err.strip().splitlines()) == 1
    assert not out.exists()


def test_rays_own_logs_while_connecting_stay_off_the_terminal(tmp_path, capfd, monkeypatch):
    """A cluster that answers gRPC but where ray.init fails (Ray's C++ core logs to fd 2)."""
    import os
    import sys
    import types

    import pqd.executors as search

    def init(**_: object) -> None:
        os.write(2, b"[2026-12-01 01:01:28 W 3646] rpc_client.h:153: Failed to connect\n")
        print("INFO worker.py:1841 -- Connecting to existing Ray cluster", file=sys.stderr)
        raise ConnectionError("GCS did not answer")

    fake = types.SimpleNamespace(is_initialized=lambda: False, init=init)
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setattr(search, "_check_reachable", lambda address: None)
    out = tmp_path / "o"
    assert (
        main(
            [
                "search",
                str(_search_recipe(tmp_path)),
                "--out",
                str(out),
                "--executor",
                "ray",
                "--address",
                "10.0.0.5:6379",
            ]
        )
        == 2
    )
    err = capfd.readouterr().err.strip()
    assert err.splitlines() == [err] and err.startswith("pqd: error: cannot connect to Ray")
    assert "GCS did not answer" in err and not out.exists()


def test_a_permutations_only_report_does_not_contradict_itself():
    from pqd.report import render_search_markdown

    search = fake_search({"p>q>d": 0.79})
    search["pairwise"] = None  # search.mode: permutations
    md = render_search_markdown(search, [])
    assert "Pairwise search not run" in md and "Pairwise method:" not in md
    assert "the pairwise method (not run) would need 6 two-stage runs" in md
    both = render_search_markdown(fake_search({"p>q>d": 0.79}), [])
    assert "Pairwise method: 6 two-stage runs" in both


def test_benchmark_judges_the_published_claims_by_the_paired_tests():
    bench = load_benchmark("search")
    # P->Q->D clearly best; pairwise: prune before quantize by 5 points, distill before
    # prune by 5, quantize / distill tied
    acc = {
        "p>q>d": 0.80,
        "p>d>q": 0.74,
        "q>p>d": 0.74,
        "q>d>p": 0.74,
        "d>p>q": 0.74,
        "d>q>p": 0.74,
        "p>q": 0.80,
        "q>p": 0.75,
        "d>p": 0.80,
        "p>d": 0.75,
    }
    verdicts = {c["source"].split(" (")[0]: c for c in bench.claims(fake_search(acc))}
    assert verdicts["Prune-Quantize-Distill"]["verdict"] == "supported"
    assert verdicts["Harma et al."]["verdict"] == "supported"
    assert verdicts["Kim et al."]["verdict"] == "contradicted"
    assert verdicts["Kim et al."]["statistics"][0].startswith(
        "quantize before prune: -5.01 points (95% CI -6.39 to -3.74, McNemar p (Holm) < 1e-6"
    )
    # D->P and P->Q hold, D->Q is a tie: Order of Compression's full order is undecided
    assert verdicts["Order of Compression"]["verdict"] == "undecided"
    # every order equal: nothing decided
    flat = {c["source"]: c["verdict"] for c in bench.claims(fake_search({}))}
    assert set(flat.values()) == {"undecided"}
    # an accuracy tie that latency broke says nothing about the claims
    tied = fake_search({})
    row = next(r for r in tied["pairwise"]["table"] if {r["a"], r["b"]} == {"prune", "quantize"})
    row.update(first="quantize", decided_by="latency")
    tied["pairwise"]["edges"] = [["quantize", "prune"]]
    kim = {c["source"].split(" (")[0]: c["verdict"] for c in bench.claims(tied)}
    assert kim["Kim et al."] == kim["Harma et al."] == "undecided"
    from pqd.report.search import derived_order_text

    assert "(quantize before prune: by latency, the accuracies tie)" in derived_order_text(tied)


def test_benchmark_verdict_paragraph_follows_the_tests_and_lands_in_the_readme(tmp_path):
    """The one-paragraph verdict names the top order, the orders the paired tests cannot tell
    from it, the worse ones with the largest gap, the pairwise order and every claim; the
    README's block between its markers is replaced by it, a README without one is left."""
    bench = load_benchmark("search")
    acc = {"p>q>d": 0.80, "p>d>q": 0.797, "q>p>d": 0.74, "q>d>p": 0.74, "d>p>q": 0.74}
    acc.update({"d>q>p": 0.74, "p>q": 0.80, "q>p": 0.75, "d>p": 0.80, "p>d": 0.75})
    text = bench.verdict(fake_search(acc))
    assert text.startswith(
        "Top full order by test top-1: **prune -> quantize -> distill**, 80.00% [77.5, 82.4] "
        "(1 seed x 1,017 test images; the FP32 baseline 78.00% [75.3, 80.4])."
    )
    assert "cannot tell it from 1 of the other 5: prune -> distill -> quantize;" in text
    assert "4 are worse, down to quantize -> prune -> distill at -6.00 points (95% CI" in text
    assert "Pairwise order: distill -> prune -> quantize." in text
    assert "Harma et al., supported; Kim et al., contradicted." in text
    (pqd_claim,) = [c for c in bench.claims(fake_search(acc)) if "Zhou" in c["source"]]
    assert pqd_claim["verdict"] == "undecided" and pqd_claim["statistics"] == [
        "rank 1 of 6, 80.00%; the paired tests cannot tell it from 1 of the other 5: "
        "prune -> distill -> quantize"
    ]
    flat = bench.verdict(fake_search({}))
    assert "cannot tell it from 5 of the other 5" in flat and "worse" not in flat
    assert "the pairwise results prefer no order" in flat

    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{bench.README_START}\nold\n{bench.README_END}\n\nend\n")
    results = bench.results_json(fake_search(acc), "python benchmarks/search.py", "2026-12-07")
    assert bench.write_readme(results, readme, "docs/results/s.md")
    body = readme.read_text()
    assert "old" not in body and text in body and body.endswith("\n\nend\n")
    assert (
        "The order question: `tiny_cnn` on 4,670 training and 1,017 test images, every order "
        "of prune 50% / INT8 QAT / distill, 5 epochs per order split 20/40/40 % by position, "
        "1 seed.\n" in body
    )
    assert "pqd 0.1.0, 2026-12-07, " in body and ": `python benchmarks/search.py` ([the" in body
    assert "([the page](docs/results/s.md): every interval and paired test)" in body
    shipped = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert shipped.count(bench.README_START) == 1 and shipped.count(bench.README_END) == 1
    plain = tmp_path / "PLAIN.md"
    plain.write_text("# no block\n")
    assert not bench.write_readme(results, plain, "p.md")
    assert plain.read_text() == "# no block\n"


def test_the_readme_order_paragraph_is_the_one_the_benchmark_writes_from_its_json() -> None:
    """README's order verdict is generated (benchmarks/search.py --results docs/results
    --readme) from the shipped search's results JSON, never typed."""
    bench = load_benchmark("search")
    root = Path(__file__).resolve().parents[2]
    results = json.loads((root / "docs" / "results" / "search-cifar10.json").read_text())
    readme = (root / "README.md").read_text(encoding="utf-8")
    block = bench.readme_block(results, "docs/results/search-cifar10.md")
    assert block in readme, "redo: benchmarks/search.py --from DIR --results docs/results --readme"
    assert results["verdict"] in (root / "docs" / "results" / "search-cifar10.md").read_text()


def test_report_of_an_unfinished_search_counts_its_trials(tmp_path, capsys) -> None:
    """Before search.json exists, ``pqd report`` says how far the search has come: its
    trials by state and where a stopped one continues, in one line."""
    from helpers import stopped_run

    out = tmp_path / "search"
    done = {"final": {"latency_ms": {"p50": 0.2}, "accuracy": 0.8}}
    stopped_run(out / "baseline", ["00-baseline"], None, {"00-baseline": 3}, key="b")

    def report() -> str:
        code = main(["report", str(out)])
        err = capsys.readouterr().err
        lines = [x for x in err.splitlines() if x.startswith("pqd: error: ")]
        assert code == 2 and len(lines) == 1, err
        return lines[0]

    assert f"{out} holds an unfinished search: the baseline is not finished" in report()
    (out / "baseline" / "record.json").write_text(json.dumps(done))
    stopped_run(
        out / "trials" / "a",
        ["00-baseline", "01-prune"],
        None,
        {"00-baseline": 3, "01-prune": 2},
        key="a",
    )
    (out / "trials" / "a" / "record.json").write_text(json.dumps(done))
    epochs = {"00-baseline": 3, "01-distill": 10}
    stopped_run(out / "trials" / "b", ["00-baseline"], ("01-distill", 5), epochs, key="b2")
    (out / "trials" / "c").mkdir()
    (out / "trials" / "c" / "trial.json").write_text('{"key": "c"}')
    stopped_run(out / "trials" / "d", [], None, epochs, key="d")
    (out / "trials" / "d" / "failed.json").write_text('{"error": "diverged"}')
    assert (
        "holds an unfinished search: 1 of 4 trials done (1 done, 1 begun, 1 not begun, "
        "1 failed); b: finished 00-baseline; 01-distill stopped after epoch 5 of 10; fix: "
        "run the same 'pqd search' command again" in report()
    )
    # a trial that failed once and succeeded when re-run is done; the search lists its own
    # trials, so another recipe's folder beside them is not counted
    (out / "trials" / "a" / "failed.json").write_text('{"error": "diverged"}')
    (out / "trials" / "old").mkdir()
    (out / "trials" / "old" / "trial.json").write_text('{"key": "old"}')
    listed = [{"key": k, "folder": f"trials/{k}"} for k in "abcd"]
    (out / "trials.json").write_text(json.dumps(listed))
    assert "1 of 4 trials done (1 done, 1 begun, 1 not begun, 1 failed)" in report()
    (out / "trials" / "b" / "checkpoints" / "01-distill.epoch.safetensors").write_bytes(b"")
    assert "1 begun, 1 not begun, 1 failed); fix:" in report()  # (an unreadable checkpoint)
    (out / "trials" / "b" / "progress.json").write_text("{")  # (an unreadable progress file)
    assert "1 begun, 1 not begun, 1 failed); fix:" in report()


def test_every_pair_of_full_orders_is_compared_with_holm_over_the_pairs():
    from pqd.report import render_search_markdown
    from pqd.report.search import order_pair_rows

    acc = {"p>q>d": 0.80, "p>d>q": 0.74, "q>p>d": 0.74, "q>d>p": 0.74, "d>p>q": 0.74}
    search = fake_search({**acc, "d>q>p": 0.742}, seeds=(0, 1))
    pairs = search["order_pairs"]
    assert len(pairs) == 15  # 6 orders
    best = "permutation:prune>quantize>distill"
    for r in pairs:
        assert r["seeds"] == 2 and r["ci_low"] <= r["difference"] <= r["ci_high"]
        assert r["p_holm"] >= round(r["p_value"], 6)  # (Holm: never below the raw p)
        assert r["verdict"] == ("a" if r["a"] == best else "tie"), r  # 6 points vs 0.2 or 0
    ranked = search["ranking"]
    assert all(ranked.index(r["a"]) < ranked.index(r["b"]) for r in pairs)  # a: ranked higher
    # the ranking's "tied with the best" is the table's verdict: one family, one answer
    groups = {g["id"]: g for g in search["groups"]}
    for r in pairs:
        if r["a"] == best:
            assert groups[r["b"]]["tied_with_best"] == (r["verdict"] != "a")
            assert groups[r["b"]]["vs_best"]["p_holm"] == r["p_holm"]
    rows = order_pair_rows(search)
    assert rows[0][:3] == [
        "prune -> quantize -> distill",
        "distill -> quantize -> prune",
        "+5.80 points",
    ]
    assert rows[0][-1] == "prune -> quantize -> distill better" and rows[-1][-1] == "tie"
    md = render_search_markdown(search, [])
    assert "## Every pair of full orders" in md and "Holm-adjusted over the 15 pairs" in md


def test_search_time_counts_a_shared_stage_once(tmp_path) -> None:
    """A stage that trials share is trained once: the training over every invocation counts
    it once, beside what it would have cost had every trial trained its own."""
    from pqd.search.summary import step_seconds

    def folder(name: str, steps: list[tuple[str, float]]) -> Path:
        entries = [{"fingerprint": f, "record": {"seconds": sec}} for f, sec in steps]
        (tmp_path / name).mkdir()
        (tmp_path / name / "progress.json").write_text(json.dumps({"steps": entries}))
        return tmp_path / name

    base = folder("baseline", [("b", 100.0)])
    pdq = folder("pdq", [("b0", 0.5), ("p", 20.0), ("pd", 30.0), ("pdq", 10.0)])
    pd = folder("pd", [("b0", 0.5), ("p", 20.0), ("pd", 30.0)])  # taken over from P->D->Q
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "progress.json").write_text("{")
    got = step_seconds([base, pdq, pd, broken, tmp_path / "missing"])
    assert got == {"once": 160.5, "every": 211.0}


def test_a_pair_whose_accuracies_tie_says_what_would_resolve_it():
    """Tied on accuracy: the page says how many images or seeds would resolve the observed
    difference, also where latency then decided the pair; not where accuracy decided it."""
    from pqd.report.search import unresolved_text

    search = fake_search({"p>d": 0.753, "d>p": 0.75}, seeds=(0, 1))
    row = next(r for r in search["pairwise"]["table"] if {r["a"], r["b"]} == {"prune", "distill"})
    assert row["first"] is None
    (line,) = [t for t in unresolved_text(search) if t.startswith(f"{row['a']} / {row['b']}")]
    assert "would need about" in line and "test images per seed" in line
    row.update(first=row["a"], decided_by="latency")
    assert line in unresolved_text(search)
    row["decided_by"] = "accuracy"
    assert line not in unresolved_text(search)


def test_a_pair_significant_over_pooled_images_but_not_across_seeds_says_why_it_ties():
    """The pooled McNemar test is significant, but the seeds disagree beyond their images
    and the per-seed interval holds 0: the page says so, and that only seeds resolve it;
    the claim's statistic says it from the claim's side."""
    from pqd.report.search import seed_disagreement_text, unresolved_text

    bench = load_benchmark("search")
    paired = {
        "n": 10000,
        "seeds": 3,
        "difference": 0.0032,
        "ci_low": 0.0011,
        "ci_high": 0.0053,
        "p_holm": 0.0065,
        "per_seed": [0.0048, 0.0053, -0.0006],
        "seed_ci": [-0.005, 0.0113],
        "heterogeneity_p": 0.046,
        "images_to_resolve": 26689,
        "seeds_to_resolve": 11,
    }
    text = seed_disagreement_text(paired, 0.05)
    assert text is not None and "per seed +0.48, +0.53, -0.06 points" in text
    assert "Cochran's Q p 0.046" in text and "-0.50 to +1.13 points, holds 0" in text
    assert seed_disagreement_text({**paired, "heterogeneity_p": 0.2}, 0.05) is None
    assert seed_disagreement_text({**paired, "p_holm": 0.2}, 0.05) is None
    assert seed_disagreement_text({**paired, "seed_ci": [0.001, 0.01]}, 0.05) is None
    search = fake_search({"p>d": 0.753, "d>p": 0.75}, seeds=(0, 1, 2))
    row = next(r for r in search["pairwise"]["table"] if {r["a"], r["b"]} == {"prune", "distill"})
    row.update(a="prune", b="distill", first=None, decided_by="tie", paired=paired)
    (line,) = [t for t in unresolved_text(search) if t.startswith("prune / distill")]
    assert "ties although significant" in line and "about 11 seeds would resolve it" in line
    assert "test images per seed" not in line  # more images would not
    stat = bench._pair_stat(search, "distill", "prune")  # the claim's side: distill first
    assert stat.startswith("distill before prune: -0.32 points (95% CI -0.53 to -0.11")
    assert "a tie: " in stat and "per seed -0.48, -0.53, +0.06 points" in stat
    assert "-1.13 to +0.50 points" in stat


def test_benchmark_page_says_what_carries_over_from_another_search(tmp_path, monkeypatch):
    """--compare: the best order, the pairwise order and each claim's verdict beside another
    search's results JSON, and which verdicts hold in both; the README changes only with
    --readme."""
    bench = load_benchmark("search")
    cnn = {"p>q>d": 0.80, "p>d>q": 0.74, "q>p>d": 0.74, "q>d>p": 0.74, "d>p>q": 0.74}
    cnn.update({"d>q>p": 0.74, "p>q": 0.80, "q>p": 0.75, "d>p": 0.80, "p>d": 0.75})
    other = bench.results_json(fake_search(cnn))
    assert other["best"] == "prune -> quantize -> distill" and other["tied_with_best"] == []
    vit = bench.results_json(fake_search({}))  # every order equal
    assert vit["best"] is not None and len(vit["tied_with_best"]) == 5
    lines = bench.carries_over(fake_search({}), {**other, "name": "cnn", "model": "fastnet"})
    text = "\n".join(lines)
    assert lines[0] == "## What carries over from cnn (fastnet)"
    assert "| best full order | " in text and "; tied with it: " in text
    assert "| prune -> quantize -> distill |" in text  # the CNN's best, nothing tied
    assert "| Harma et al. (ICLR 2025) | undecided | supported |" in text
    assert lines[-1].startswith("Same verdict in both: ") and (
        "Harma et al. (undecided here, supported there)" in lines[-1]
    )

    search = fake_search({})
    source = tmp_path / "search.json"
    source.write_text(json.dumps(search))
    theirs = tmp_path / "cnn.json"
    theirs.write_text(json.dumps({**other, "name": "cnn", "model": "fastnet"}))
    readme = tmp_path / "README.md"
    readme.write_text(f"{bench.README_START}\nold\n{bench.README_END}\n")
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    results = tmp_path / "results"
    argv = ["--from", str(source), "--results", str(results), "--compare", str(theirs)]
    assert bench.main(argv) == 0
    page = (results / f"{search['name']}.md").read_text()
    assert "## What carries over from cnn (fastnet)" in page
    assert "old" in readme.read_text()  # no --readme: the README's block stays
    assert bench.main([*argv, "--readme"]) == 0
    assert "old" not in readme.read_text()
    assert str(tmp_path) not in readme.read_text() + page  # (no path of this machine)
    assert f"([the page](results/{search['name']}.md): every" in readme.read_text()
    assert bench.main([*argv[:4], "--compare", str(tmp_path / "none.json")]) == 2
    assert bench.main([*argv[:4], "--compare", str(source)]) == 2  # a search.json, not results
    with pytest.raises(SystemExit):
        bench.main(["--from", str(source), "--readme"])  # --readme needs --results


def test_baseline_line_counts_epochs_in_words(tmp_path, capsys, monkeypatch, subset_dir):
    """'training 1 epoch', not '1 epochs' (the line before the shared baseline trains)."""
    import pqd.executors
    import pqd.search as search

    class Stop(Exception):
        pass

    def stop(*args: Any, **kwargs: Any) -> None:
        raise Stop

    monkeypatch.setattr(pqd.executors.Executor, "run", stop)
    recipe = recipe_from_dict(
        {
            "model": {"name": "tiny_cnn"},
            "data": {"root": str(subset_dir), "limit_train": 200, "limit_test": 50},
            "baseline": {"epochs": 1},
            "stages": [{"stage": "prune", "sparsity": 0.5}, {"stage": "distill"}],
            "search": {},
        }
    )
    with pytest.raises(Stop):
        search.run_search(recipe, tmp_path / "o", progress=False)
    assert "baseline: training 1 epoch into" in capsys.readouterr().err
