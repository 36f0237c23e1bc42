"""Runs that survive faults and hostile input: resume after SIGKILL (exactly the same
result), training divergence, disk full, another recipe's run folder, malformed input
(one line each, fuzzed with hypothesis) and determinism."""

from __future__ import annotations

import contextlib
import copy
import errno
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pqd.checkpoint
import pqd.resume
import pqd.stages  # (registers the stages)
import pqd.step_state
from conftest import tiny_recipe
from helpers import Job
from pqd.cli import main
from pqd.data import Dataset
from pqd.engine import baseline, frozen
from pqd.models import build_model
from pqd.pipeline import deterministic
from pqd.prune.masks import prunable_parameters
from pqd.quant.prepare import prepare_qat
from pqd.resume import RunFolder
from pqd.state import State
from pqd.step_state import load_state, save_state
from pqd.train import TrainingDiverged, eval_mode, evaluate, fit, is_graph

CPU = torch.device("cpu")


def one_error_line(capsys: pytest.CaptureFixture[str], code: int) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("pqd: error: ")]
    assert code == 2 and len(lines) == 1, err
    assert "fix:" in lines[0] and "Traceback" not in err, err
    return lines[0]


def real_recipe(
    root: Path | str, stages: list[dict[str, Any]], limit_train: int = 200, **extra: Any
) -> dict[str, Any]:
    """tiny_cnn on a few subset images; measuring kept minimal."""
    data = {
        "name": "faults",
        "seed": 0,
        "model": {"name": "tiny_cnn"},
        "data": {
            "dataset": "cifar10",
            "root": str(root),
            "val_size": 50,
            "download": False,
            "limit_train": limit_train,
            "limit_test": 100,
        },
        "train": {"batch_size": 64, "lr": 0.05},
        "baseline": {"epochs": 1},
        "stages": stages,
        "measure": {"warmup": 1, "repeats": 5, "batch_sizes": [1], "runtimes": ["onnxruntime"]},
    }
    data.update(extra)
    return data


def write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def progress(out: Path) -> dict[str, Any]:
    return json.loads((out / "progress.json").read_text())


# ---------------------------------------------------------------------------- resume pieces


def test_qat_graph_state_survives_a_file(tmp_path: Path, synth: Dataset) -> None:
    """A QAT graph comes back from (fresh eager model -> same prepare_qat -> saved tensors)
    with every buffer intact (observer eps included) and the same outputs."""
    torch.manual_seed(0)
    graph = prepare_qat(build_model("tiny_cnn", 4, synth.mean, synth.std), torch.rand(2, 3, 32, 32))
    graph(torch.rand(8, 3, 32, 32))  # observers and BN statistics move
    names = list(prunable_parameters(graph))
    masks = {n: torch.rand_like(p) > 0.5 for n, p in prunable_parameters(graph).items()}
    save_state(tmp_path / "s.safetensors", "fp", State(model=graph, masks=masks, quantized=True))

    torch.manual_seed(123)  # a differently initialised fresh model
    state = load_state(
        tmp_path / "s.safetensors",
        lambda: build_model("tiny_cnn", 4, synth.mean, synth.std),
        lambda: torch.rand(2, 3, 32, 32),
    )
    back, back_masks = state.model, state.masks
    assert state.quantized and is_graph(back) and sorted(back_masks) == sorted(names)
    assert all(torch.equal(back_masks[n], masks[n]) for n in names)
    want, got = graph.state_dict(), back.state_dict()
    assert set(want) == set(got) and any(k.endswith(".eps") for k in want)
    for k in want:
        assert torch.equal(want[k], got[k]), k
    x = torch.rand(4, 3, 32, 32)
    with eval_mode(graph), eval_mode(back):
        assert torch.equal(graph(x), back(x))


def test_a_channel_pruned_then_quantized_state_survives_a_file(
    tmp_path: Path, synth: Dataset
) -> None:
    """Structured surgery changes the architecture: the state comes back by replaying the
    recorded channel structure on a fresh model, then prepare_qat, then the tensors."""
    recipe = tiny_recipe(
        [
            {"stage": "prune_channels", "ratio": 0.5, "round_to": None, "epochs": 0},
            {"stage": "quantize", "mode": "ptq", "epochs": 0, "calibration_batches": 1},
        ]
    )
    torch.manual_seed(0)
    model = build_model("tiny_cnn", synth.num_classes, synth.mean, synth.std)
    job = Job(recipe=recipe, data=synth, teacher=model)
    state = job.run_stages(State(model=copy.deepcopy(model)))
    assert state.structure and state.quantized
    save_state(tmp_path / "s.safetensors", "fp", state)
    back = load_state(tmp_path / "s.safetensors", job.fresh_model, job.example_input)
    assert back.structure == state.structure and back.quantized
    want, got = state.model.state_dict(), back.model.state_dict()
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)
    x = torch.rand(4, 3, 32, 32)
    with eval_mode(state.model), eval_mode(back.model):
        assert torch.equal(state.model(x), back.model(x))


STAGE_CASES = {
    # masks and the schedule's own state change every step
    "prune": {"stage": "prune", "sparsity": 0.6, "schedule": "gradual", "epochs": 2},
    # adapters train beside the student; the per-step feature losses go into the record
    "distill": {"stage": "distill", "epochs": 2, "features": {"loss": "fitnet"}},
}


def _one_stage(out: Path, synth: Dataset, stage: dict[str, Any]) -> tuple[State, RunFolder]:
    recipe = tiny_recipe([stage])
    torch.manual_seed(0)
    model = build_model("tiny_cnn", synth.num_classes, synth.mean, synth.std)
    folder = RunFolder.open(out, recipe)
    folder.start(fresh=False)
    job = Job(recipe=recipe, data=synth, teacher=copy.deepcopy(model).eval(), run=folder)
    return job.run_stages(State(model=copy.deepcopy(model))), folder


@pytest.mark.parametrize("case", list(STAGE_CASES))
def test_a_stage_killed_after_an_epoch_continues_exactly(
    tmp_path: Path, synth: Dataset, monkeypatch, case: str
) -> None:
    """A stage crashes after epoch 1 of 2 and continues from its epoch checkpoint: weights,
    masks and the stage's record info equal an uninterrupted stage's bit for bit."""
    stage = STAGE_CASES[case]
    whole, _ = _one_stage(tmp_path / "whole", synth, stage)

    def crash(step: int, epoch: int, path: Path) -> None:
        assert path.is_file()
        if (step, epoch) == (1, 1):
            raise KeyboardInterrupt  # the process dies here

    monkeypatch.setattr(pqd.resume, "_test_pause", crash)
    with pytest.raises(KeyboardInterrupt):
        _one_stage(tmp_path / "cut", synth, stage)
    monkeypatch.undo()
    resumed, folder = _one_stage(tmp_path / "cut", synth, stage)
    assert folder.continued == {f"01-{case}": 1}
    assert resumed.info == whole.info
    assert sorted(resumed.masks) == sorted(whole.masks)
    for n, m in whole.masks.items():
        assert torch.equal(m, resumed.masks[n]), n
    want, got = whole.model.state_dict(), resumed.model.state_dict()
    assert set(want) == set(got)
    for k in want:
        assert torch.equal(want[k], got[k]), k


@pytest.mark.parametrize("steps", ["abc", [1, {"fingerprint": "x"}], None])
def test_a_malformed_progress_file_keeps_no_steps_and_shares_none(
    tmp_path: Path, subset_dir: Path, steps: Any
) -> None:
    """A progress.json whose steps are not a list of entries (edited by hand, written by
    something else): resuming redoes them instead of failing, and no search trial takes
    them over."""
    from pqd.recipe import recipe_from_dict
    from pqd.resume import PROGRESS, shared_steps

    recipe = recipe_from_dict(
        real_recipe(subset_dir, [{"stage": "prune", "sparsity": 0.5, "epochs": 1}])
    )
    (tmp_path / PROGRESS).write_text(json.dumps({"steps": steps, "recipe_sha256": "x"}))
    assert RunFolder.open(tmp_path, recipe, resume=True).steps == []
    assert shared_steps(tmp_path, recipe) == []


def test_an_unreadable_progress_file_is_named_with_the_fix(
    tmp_path: Path, subset_dir: Path
) -> None:
    """A progress.json that is not JSON: continuing the run names the file and --fresh; a
    search trial takes nothing over from it."""
    from pqd.recipe import recipe_from_dict
    from pqd.resume import PROGRESS, RunFolderError, shared_steps

    recipe = recipe_from_dict(real_recipe(subset_dir, [{"stage": "distill", "epochs": 1}]))
    (tmp_path / PROGRESS).write_bytes(b'{"steps": [\xff')
    with pytest.raises(RunFolderError, match=r"progress\.json is unreadable") as err:
        RunFolder.open(tmp_path, recipe, resume=True)
    assert "--fresh" in str(err.value)
    assert shared_steps(tmp_path, recipe) == []
    assert RunFolder.open(tmp_path, recipe, fresh=True).steps == []


def test_a_missing_baseline_checkpoint_is_refused_and_the_run_folder_kept(
    tmp_path: Path, subset_dir: Path
) -> None:
    """A run that loads its baseline from a checkpoint that is gone: one line naming it,
    before the run folder's progress is rewritten (its steps stay for when the file is
    back)."""
    from pqd.errors import CheckpointError
    from pqd.recipe import recipe_from_dict

    data = real_recipe(subset_dir, [{"stage": "distill", "epochs": 1}])
    gone = str(tmp_path / "gone.safetensors")
    recipe = recipe_from_dict({**data, "baseline": {"checkpoint": gone, "epochs": 0}})
    (tmp_path / "run").mkdir()
    before = json.dumps({"steps": [{"step": "00-baseline", "fingerprint": "x"}]})
    (tmp_path / "run" / "progress.json").write_text(before)
    for kw in ({}, {"resume": True}, {"fresh": True}):
        with pytest.raises(CheckpointError, match=r"gone\.safetensors' does not exist"):
            RunFolder.open(tmp_path / "run", recipe, **kw)
    assert (tmp_path / "run" / "progress.json").read_text() == before


def test_another_recipes_folder_is_refused(tmp_path: Path, capsys, subset_dir: Path) -> None:
    """--out holding a different recipe's run: one line naming what differs and the ways out;
    --resume keeps exactly the finished steps the change does not touch."""
    stages = [{"stage": "prune", "sparsity": 0.5, "epochs": 1}, {"stage": "distill", "epochs": 1}]
    a = real_recipe(subset_dir, stages)
    out = tmp_path / "run"
    from pqd.recipe import recipe_from_dict

    ra = recipe_from_dict(a)
    folder = RunFolder.open(out, ra)
    folder.start(fresh=False)
    for step in range(3):
        folder.finish(step, f"x{step}", {"step": step})
    b = copy.deepcopy(a)
    b["stages"][1]["train"] = {"lr": 0.001}
    line = one_error_line(
        capsys, main(["run", str(write(tmp_path / "b.yaml", b)), "--out", str(out)])
    )
    assert f"--out {out} holds the run of a different recipe" in line
    assert "stages.1.train.lr" in line and "--resume" in line and "--fresh" in line
    kept = RunFolder.open(out, recipe_from_dict(b), resume=True)
    assert [e["step"] for e in kept.steps] == ["00-baseline", "01-prune"]
    assert RunFolder.open(out, recipe_from_dict(b), fresh=True).steps == []
    assert len(RunFolder.open(out, ra).steps) == 3  # the same recipe: everything kept


# ---------------------------------------------------------------------------- training faults


def test_nan_loss_and_exploding_gradients_stop_with_one_line(synth: Dataset) -> None:
    from pqd.data import Loader

    recipe = tiny_recipe([])
    train = Loader(synth.train_x, synth.train_y, 32, shuffle=True)
    model = build_model("tiny_cnn", synth.num_classes, synth.mean, synth.std)
    calls = {"n": 0}

    def nan_on_second_step(logits, y, x):
        calls["n"] += 1
        loss = torch.nn.functional.cross_entropy(logits, y)
        return loss * float("nan") if calls["n"] == 2 else loss

    with pytest.raises(TrainingDiverged) as exc:
        fit(
            model,
            train,
            recipe.train,
            2,
            device=CPU,
            loss_fn=nan_on_second_step,
            desc="[1/2] distill",
            progress=False,
        )
    line = exc.value.line()
    assert "[1/2] distill: training diverged at epoch 1/2, step 2/6: the loss is nan" in line
    assert "fix: lower the learning rate" in line and "--resume" in line

    cfg = recipe.train.model_copy(update={"max_grad_norm": 1e-6})
    with pytest.raises(TrainingDiverged, match=r"gradient norm .* exceeds train.max_grad_norm"):
        fit(model, train, cfg, 1, device=CPU, progress=False)


@pytest.mark.integration
def test_a_diverging_stage_keeps_finished_steps(tmp_path: Path, capsys, subset_dir: Path) -> None:
    """A stage that diverges stops the run with one line; the finished steps and their
    checkpoints stay, no record.json appears; the fixed recipe continues with --resume."""
    stages = [
        {"stage": "prune", "sparsity": 0.5, "epochs": 1},
        {"stage": "quantize", "epochs": 1, "train": {"max_grad_norm": 1e-9}},
    ]
    path = write(tmp_path / "r.yaml", real_recipe(subset_dir, stages))
    out = tmp_path / "run"
    line = one_error_line(capsys, main(["run", str(path), "--out", str(out), "--no-progress"]))
    assert "[2/2] quantize: training diverged at epoch 1/1, step 1/" in line
    assert not (out / "record.json").exists()
    p = progress(out)
    assert not p["complete"] and [s["step"] for s in p["steps"]] == ["00-baseline", "01-prune"]
    assert (out / "checkpoints" / "01-prune.safetensors").is_file()
    prune_written = (out / "checkpoints" / "01-prune.safetensors").stat().st_mtime_ns

    fixed = [str(path), "--out", str(out), "--no-progress", "stages.1.train.max_grad_norm=1000"]
    line = one_error_line(capsys, main(["run", *fixed]))  # a changed recipe needs --resume
    assert "stages.1.train.max_grad_norm" in line
    assert main(["run", *fixed, "--resume"]) == 0
    assert "finished 00-baseline, 01-prune (not recomputed)" in capsys.readouterr().err
    record = json.loads((out / "record.json").read_text())
    assert record["resume"]["reused_steps"] == ["00-baseline", "01-prune"]
    steps = progress(out)["steps"]
    before = steps[0]["record"]["seconds"] + steps[1]["record"]["seconds"]
    assert record["timing_s"]["earlier_processes"] == pytest.approx(before, abs=0.02)
    assert record["final"]["precision"] == "int8" and progress(out)["complete"]
    assert (out / "checkpoints" / "01-prune.safetensors").stat().st_mtime_ns == prune_written


@pytest.mark.integration
def test_a_stage_that_leaves_the_model_at_chance_stops_the_run(
    tmp_path: Path, capsys, subset_dir: Path
) -> None:
    """A stage that turns a model above chance into a one-class guesser (pruning 99.9% of
    tiny_cnn's weights) stops the run with one line before its checkpoint is written;
    ``train.stop_at_chance: false`` with --resume keeps that model and finishes."""
    data = real_recipe(subset_dir, [{"stage": "prune", "sparsity": 0.999, "epochs": 0}], 1500)
    data["data"]["val_size"] = 300
    data["baseline"]["epochs"] = 3
    path = write(tmp_path / "r.yaml", data)
    out = tmp_path / "run"
    line = one_error_line(capsys, main(["run", str(path), "--out", str(out), "--no-progress"]))
    assert re.search(
        r"\[1/1\] prune: the stage left the model at chance: [\d.]+% validation "
        r"top-1 on 300 images \([\d.]+% before it",
        line,
    ), line
    assert "train.stop_at_chance: false" in line
    assert not (out / "record.json").exists()
    assert [s["step"] for s in progress(out)["steps"]] == ["00-baseline"]
    assert not (out / "checkpoints" / "01-prune.safetensors").exists()

    keep = [str(path), "--out", str(out), "--no-progress", "stages.0.train.stop_at_chance=false"]
    assert main(["run", *keep, "--resume"]) == 0
    record = json.loads((out / "record.json").read_text())
    assert record["resume"]["reused_steps"] == ["00-baseline"]
    assert record["stages"][0]["val_accuracy"] == pytest.approx(0.1, abs=0.02)


# ---------------------------------------------------------------------------- bad input


def test_atomic_writer_on_a_full_disk_leaves_the_old_file(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "record.json"
    target.write_text("old")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pqd.checkpoint.os, "fsync", full)
    with pytest.raises(OSError) as exc:
        pqd.checkpoint.atomic_write_text(target, "new")
    assert exc.value.errno == errno.ENOSPC and exc.value.filename == str(target)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_disk_full_mid_run_is_one_line_and_nothing_looks_complete(
    tmp_path: Path, capsys, subset_dir: Path, monkeypatch
) -> None:
    real = pqd.checkpoint.atomic_write_bytes

    def fills_up(path: Path, data: bytes) -> None:
        if path.name == "01-prune.safetensors":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    monkeypatch.setattr(pqd.checkpoint, "atomic_write_bytes", fills_up)
    monkeypatch.setattr(pqd.step_state, "atomic_write_bytes", fills_up)
    stages = [{"stage": "prune", "sparsity": 0.5, "epochs": 1}]
    path = write(tmp_path / "r.yaml", real_recipe(subset_dir, stages))
    out = tmp_path / "run"
    line = one_error_line(capsys, main(["run", str(path), "--out", str(out), "--no-progress"]))
    assert "No space left on device writing" in line and "01-prune.safetensors" in line
    assert "free space" in line and "run the same command again" in line
    assert not (out / "record.json").exists() and not progress(out)["complete"]
    assert [s["step"] for s in progress(out)["steps"]] == ["00-baseline"]
    assert not list(out.rglob("*.tmp"))


def test_malformed_yaml_and_wrong_model_output_are_one_line(
    tmp_path: Path, capsys, subset_dir: Path, monkeypatch
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: tiny_cnn\nstages: [\n")
    line = one_error_line(capsys, main(["validate", str(bad)]))
    assert "malformed YAML at line" in line
    (tmp_path / "usernet.py").write_text(
        "import torch.nn as nn\n\n"
        "def build(num_classes=10, **kwargs):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 7))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    path = write(tmp_path / "r.yaml", real_recipe(subset_dir, [], model={"name": "usernet:build"}))
    line = one_error_line(capsys, main(["run", str(path), "--out", str(tmp_path / "o")]))
    assert "model output is [2, 7]" in line and "expected [2, 10]" in line
    assert not (tmp_path / "o").exists()


BASE = {
    "model": {"name": "tiny_cnn"},
    "train": {"batch_size": 32, "lr": 0.05},
    "baseline": {"epochs": 1},
    "stages": [
        {"stage": "prune", "sparsity": 0.5},
        {"stage": "quantize", "epochs": 1},
        {"stage": "distill", "alpha": 0.5},
    ],
    "measure": {"batch_sizes": [1, 8]},
}
PATHS = [
    "name",
    "seed",
    "device",
    "model",
    "model.name",
    "model.kwargs",
    "data",
    "data.dataset",
    "data.val_size",
    "data.limit_train",
    "data.augment.crop_padding",
    "data.augment.pad_mode",
    "train",
    "train.lr",
    "train.batch_size",
    "train.optimizer",
    "train.momentum",
    "train.schedule",
    "train.warmup",
    "train.max_grad_norm",
    "train.grad_clip",
    "baseline",
    "baseline.epochs",
    "baseline.checkpoint",
    "stages",
    "stages.0",
    "stages.0.stage",
    "stages.0.sparsity",
    "stages.0.scope",
    "stages.0.epochs",
    "stages.1.mode",
    "stages.1.calibration_batches",
    "stages.2.temperature",
    "stages.2.alpha",
    "stages.2.train",
    "stages.2.train.lr",
    "export.opset",
    "measure.runtimes",
    "measure.batch_sizes",
    "measure.threads",
    "measure.repeats",
]
VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**12), 10**12)
    | st.floats(allow_nan=True)
    | st.text(max_size=12)
    | st.sampled_from(["prune", "quantize", "qat", "onnxruntime", "1e-3", "tiny_cnn", "global"]),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)
MUTATION = st.tuples(
    st.sampled_from(["set", "delete", "add"]),
    st.sampled_from(PATHS) | st.text(min_size=1, max_size=10),
    VALUES,
)


def _mutate(data: Any, op: str, path: str, value: Any) -> Any:
    *parents, last = path.split(".")
    node = data
    for part in parents:
        if isinstance(node, dict) and isinstance(node.get(part), (dict, list)):
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return data
    if isinstance(node, list):
        if last.isdigit() and int(last) < len(node):
            if op == "delete":
                del node[int(last)]
            else:
                node[int(last)] = value
    elif isinstance(node, dict):
        if op == "delete":
            node.pop(last, None)
        elif op == "add":
            node[last + "x"] = value
        else:
            node[last] = value
    return data


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.lists(MUTATION, min_size=1, max_size=4))
def test_fuzzed_recipes_pass_or_fail_in_one_line(mutations: list[tuple[str, str, Any]]) -> None:
    """Random key changes, types and values: ``pqd validate`` accepts (exit 0) or rejects
    with ``pqd: error: ... fix: ...`` lines (exit 2), never a traceback: exactly one for a
    schema error, one per failed check (data, model, checkpoint, runtimes) otherwise."""
    data = copy.deepcopy(BASE)
    for op, path, value in mutations:
        data = _mutate(data, op, path, value)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.yaml"
        path.write_text(yaml.safe_dump(data, allow_unicode=True))
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["validate", str(path), "--quiet"])
    if code == 0:
        assert out.getvalue().startswith("ok: ") and err.getvalue() == ""
    else:
        lines = err.getvalue().splitlines()
        assert code == 2 and 1 <= len(lines) <= 4, err.getvalue()
        for line in lines:
            assert line.startswith("pqd: error: ") and "fix:" in line, line


# ---------------------------------------------------------------------------- determinism


def _compress(synth: Dataset) -> tuple[State, list[float]]:
    """Baseline epoch + gradual prune + QAT + KD on tiny_cnn, as the pipeline seeds them."""
    recipe = tiny_recipe(
        [
            {"stage": "prune", "sparsity": 0.6, "schedule": "gradual", "epochs": 1},
            {"stage": "quantize", "epochs": 1},
            {"stage": "distill", "epochs": 1},
        ],
        train={"batch_size": 32, "lr": 0.05},
    )  # amp auto: bf16 where fast
    with deterministic(recipe.seed, CPU):
        model = build_model("tiny_cnn", synth.num_classes, synth.mean, synth.std)
        baseline(model, synth, train=recipe.baseline_train(), epochs=1, seed=0)
        job = Job(recipe=recipe, data=synth, teacher=frozen(model))
        accs: list[float] = []

        def val(i: int, spec: Any, state: State, seconds: float) -> None:
            accs.append(evaluate(state.model, job.loader("val", 64), device=CPU, progress=False))

        state = job.run_stages(State(model=model), on_stage=val)
    return state, accs


def test_same_recipe_and_seed_give_identical_masks_and_accuracies(synth: Dataset) -> None:
    a, acc_a = _compress(synth)
    b, acc_b = _compress(synth)
    assert acc_a == acc_b and sorted(a.masks) == sorted(b.masks) and a.masks
    assert all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------- kill and resume


def _comparable(record: dict[str, Any]) -> dict[str, Any]:
    """The record without what legitimately differs between runs: timings, latencies,
    the machine snapshot and the resume note."""
    r = copy.deepcopy(record)
    for key in ("timing_s", "environment", "resume", "comparison"):
        r.pop(key)
    for s in r["stages"]:
        s.pop("seconds")
    for key in ("baseline", "final"):
        r[key].pop("latency_ms")
        for rt in r[key]["runtimes"].values():
            rt.pop("latency_ms", None)
    return _untimed(r)


def _untimed(node: Any) -> Any:
    """``node`` without timings at any depth (latencies, the speedups made of them and the
    fastest runtime they pick)."""
    if isinstance(node, dict):
        return {
            k: _untimed(v)
            for k, v in node.items()
            if "latency" not in k and not k.startswith("speedup") and k != "fastest"
        }
    if isinstance(node, list):
        return [_untimed(v) for v in node]
    return node


def test_report_of_an_unfinished_run_says_where_it_stands(tmp_path, capsys) -> None:
    from helpers import stopped_run

    out = tmp_path / "run"
    epochs = {"00-baseline": 3, "01-prune": 2, "02-quantize": 4}
    stopped_run(out, ["00-baseline", "01-prune"], ("02-quantize", 3), epochs)
    line = one_error_line(capsys, main(["report", str(out)]))
    assert (
        f"{out} holds an unfinished run: finished 00-baseline, 01-prune; 02-quantize stopped "
        "after epoch 3 of 4; fix: run the same 'pqd run' command again" in line
    )
    stopped_run(out := tmp_path / "fresh", [], None, epochs)
    assert "holds an unfinished run: no step finished; fix:" in one_error_line(
        capsys, main(["report", str(out)])
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "record.json does not exist" in one_error_line(capsys, main(["report", str(empty)]))


def test_a_continued_step_carries_its_seconds_from_every_process_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each epoch checkpoint keeps the step's wall seconds so far (from the step's start,
    set-up included), and a run folder opened on it again starts from them."""
    from pqd.train import FitProgress

    clock = [0.0]
    monkeypatch.setattr(pqd.resume.time, "perf_counter", lambda: clock[0])
    recipe = tiny_recipe([{"stage": "distill", "epochs": 3}])
    net = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)

    def one_process(began: float, epoch_at: float, epoch: int) -> float:
        folder = RunFolder.open(tmp_path, recipe)
        clock[0] = began
        folder.begin(1)
        start, on_epoch = folder.epoch_hooks(1, net, {})
        carried = 0.0 if start is None else start.seconds
        clock[0] = epoch_at
        progress = FitProgress(epoch, epoch * 4, opt.state_dict(), None, torch.get_rng_state())
        on_epoch(progress)
        assert folder.carried.get(pqd.resume.step_name(recipe, 1), 0.0) == carried
        return carried

    assert one_process(100.0, 160.0, 1) == 0.0  # 60 s to its first epoch, then killed
    assert one_process(1000.0, 1030.0, 2) == 60.0  # continued: 30 s more
    assert one_process(5000.0, 5010.0, 3) == 90.0


@pytest.mark.integration
def test_sigkill_mid_stage_then_resume_equals_an_uninterrupted_run(
    tmp_path: Path, subset_dir: Path
) -> None:
    stages = [
        {"stage": "prune", "sparsity": 0.5, "epochs": 1},
        {"stage": "quantize", "epochs": 2},
        {"stage": "distill", "epochs": 1},
    ]
    recipe = write(tmp_path / "r.yaml", real_recipe(subset_dir, stages, limit_train=600))
    cmd = [sys.executable, "-m", "pqd.cli", "run", str(recipe), "--no-progress", "--out"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    ref_out, out = tmp_path / "whole", tmp_path / "killed"
    ref = subprocess.Popen(
        [*cmd, str(ref_out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    victim = subprocess.Popen(
        [*cmd, str(out)],
        env={**env, pqd.resume.PAUSE_ENV: "2:1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    paused = out / "checkpoints" / "02-quantize.epoch.safetensors.paused"
    deadline = time.monotonic() + 300
    while not paused.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert paused.exists(), "the run never reached epoch 1 of the quantize stage"
    victim.send_signal(signal.SIGKILL)  # mid-stage: epoch 1 of 2 of QAT is done
    victim.wait(timeout=30)
    assert [s["step"] for s in progress(out)["steps"]] == ["00-baseline", "01-prune"]
    assert not (out / "record.json").exists()
    finished = {
        p.name: p.stat().st_mtime_ns
        for p in (out / "baseline.safetensors", out / "checkpoints" / "01-prune.safetensors")
    }
    from safetensors import safe_open

    with safe_open(out / "checkpoints" / "02-quantize.epoch.safetensors", "pt") as f:
        before_stop = json.loads(f.metadata()["pqd"])["seconds"]  # the stage's first epoch
    assert before_stop > 0  # (what is carried from it: the RunFolder unit test above)

    resumed = subprocess.run([*cmd, str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "finished 00-baseline, 01-prune (not recomputed)" in resumed.stderr
    assert "[2/3] quantize: continuing after epoch 1" in resumed.stderr
    _, ref_err = ref.communicate(timeout=600)
    assert ref.returncode == 0, ref_err[-2000:]
    for path in (out / "baseline.safetensors", out / "checkpoints" / "01-prune.safetensors"):
        assert path.stat().st_mtime_ns == finished[path.name]  # not recomputed

    whole = json.loads((ref_out / "record.json").read_text())
    again = json.loads((out / "record.json").read_text())
    carried = again["resume"].pop("carried_seconds")
    assert again["resume"] == {
        "reused_steps": ["00-baseline", "01-prune"],
        "continued_after_epoch": {"02-quantize": 1},
    }
    assert list(carried) == ["02-quantize"] and carried["02-quantize"] == round(before_stop, 2)
    assert whole["resume"] == {
        "reused_steps": [],
        "continued_after_epoch": {},
        "carried_seconds": {},
    }
    # the run's seconds over both processes: the finished steps' and the continued one's
    t = again["timing_s"]
    steps = progress(out)["steps"]
    earlier = sum(e["record"]["seconds"] for e in steps[:2]) + carried["02-quantize"]
    assert t["earlier_processes"] == pytest.approx(earlier, abs=0.02)
    assert t["all_processes"] == pytest.approx(t["total"] + earlier, abs=0.02)
    assert whole["timing_s"]["all_processes"] == whole["timing_s"]["total"]
    assert _comparable(again) == _comparable(whole)
    assert (
        whole["determinism"]["seed"] == 0 and whole["determinism"]["torch_deterministic_algorithms"]
    )
    from safetensors.torch import load_file

    a = load_file(ref_out / "checkpoints" / "03-distill.safetensors")
    b = load_file(out / "checkpoints" / "03-distill.safetensors")
    assert set(a) == set(b) and any(k.startswith("mask.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)  # weights, masks, quantizer state
    assert not list((out / "checkpoints").glob("*.epoch.*"))
    # a third run of the same recipe has nothing left to do
    assert main(["run", str(recipe), "--out", str(out), "--no-progress"]) == 0


# ------------------------------------------------------------- resume after every stage kind

EVERY_KIND = [
    {"stage": "prune_channels", "ratio": 0.25, "round_to": None, "epochs": 1},
    {"stage": "prune", "sparsity": 0.5, "epochs": 1},
    {"stage": "quantize", "epochs": 1, "calibration_batches": 1},
    {"stage": "early_exit", "epochs": 1, "mode": "joint", "calibration_batches": 1},
    {"stage": "distill", "epochs": 1},
]


@pytest.mark.slow
def test_every_step_state_survives_a_file(tmp_path: Path, synth: Dataset) -> None:
    """After each stage of a recipe with every kind (channel surgery, masks, QAT graph,
    exits cut from that graph, KD on the exits), the state written to a file comes back with
    the same form, tensors, exit settings and outputs."""
    from pqd.models.multi_exit import MultiExitNet

    recipe = tiny_recipe(EVERY_KIND)
    torch.manual_seed(0)
    model = build_model("tiny_cnn", synth.num_classes, synth.mean, synth.std)
    job = Job(recipe=recipe, data=synth, teacher=frozen(model))
    kinds: list[str] = []

    def round_trip(i: int, spec: Any, state: State, seconds: float) -> None:
        path = tmp_path / f"{i}.safetensors"
        save_state(path, "fp", state)
        back = load_state(path, job.fresh_model, job.example_input)
        assert back.quantized == state.quantized and back.structure == state.structure
        assert sorted(back.masks) == sorted(state.masks)
        assert all(torch.equal(back.masks[n], m) for n, m in state.masks.items())
        want, got = state.model.state_dict(), back.model.state_dict()
        assert set(want) == set(got), (spec.stage, set(want) ^ set(got))
        assert all(torch.equal(want[k], got[k]) for k in want), spec.stage
        exits = isinstance(state.model, MultiExitNet)
        assert isinstance(back.model, MultiExitNet) == exits
        if exits:
            for attr in ("positions", "thresholds", "exit_loss", "detach_heads", "confidence"):
                assert getattr(back.model, attr) == getattr(state.model, attr), attr
        x = torch.rand(4, 3, 32, 32)
        with eval_mode(state.model), eval_mode(back.model):  # (memory formats may differ)
            torch.testing.assert_close(back.model(x), state.model(x), rtol=1e-5, atol=1e-6)
        kinds.append(spec.stage)

    job.run_stages(State(model=model), on_stage=round_trip)
    assert kinds == [s["stage"] for s in EVERY_KIND]


@pytest.mark.integration
def test_killed_after_every_step_of_every_stage_kind_resumes_to_the_same_record(
    tmp_path: Path, subset_dir: Path, monkeypatch
) -> None:
    """A five-stage run (every stage kind) dies right after each step boundary in turn (the
    step's checkpoint and progress written); each run of the same command continues after the
    last finished step, and the last one's record equals an uninterrupted run's."""
    from pqd.pipeline import run
    from pqd.recipe import recipe_from_dict

    data = real_recipe(
        subset_dir, EVERY_KIND, limit_train=128, train={"batch_size": 32, "lr": 0.05, "amp": "off"}
    )
    data["data"].update(val_size=32, limit_test=32)
    data["measure"]["exit_latency_rounds"] = 1
    recipe = recipe_from_dict(data)
    whole = run(recipe, tmp_path / "whole", progress=False)

    out = tmp_path / "killed"
    real_finish = RunFolder.finish
    for kill_after in range(len(EVERY_KIND) + 1):  # 0 = baseline, i = stage i

        def finish(
            self: RunFolder, step: int, checkpoint: str, entry: dict[str, Any], _k: int = kill_after
        ) -> None:
            real_finish(self, step, checkpoint, entry)
            if step == _k:
                raise KeyboardInterrupt  # the process dies right after this boundary

        monkeypatch.setattr(RunFolder, "finish", finish)
        with pytest.raises(KeyboardInterrupt):
            run(recipe, out, progress=False)
        steps = [s["step"] for s in progress(out)["steps"]]
        assert len(steps) == kill_after + 1 and not (out / "record.json").exists()
    monkeypatch.setattr(RunFolder, "finish", real_finish)
    again = run(recipe, out, progress=False)
    assert again["resume"]["reused_steps"] == [s["step"] for s in progress(out)["steps"]]
    assert _comparable(again) == _comparable(whole)
    assert again["final"]["early_exit"]["thresholds"] and again["final"]["masked_sparsity"]
