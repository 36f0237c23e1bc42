"""``pqd run``'s body: the baseline, the stages in recipe order (each finished step
checkpointed, a stopped run continued), the final validation predictions, then export and
measure (:mod:`pqd.pipeline.finish`)."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn

from pqd._version import __version__
from pqd.checkpoint import atomic_write_text, save_checkpoint
from pqd.context import Context
from pqd.engine import seed_everything
from pqd.pipeline.collapse import check_above_chance
from pqd.pipeline.finish import (
    PENDING_FILE,
    REFERENCE_FILE,
    export_files,
    masked_sparsity,
    measure_and_record,
    precision_of,
    sparsity_extras,
)
from pqd.pipeline.inputs import check_runtimes, recipe_data, resolve_device
from pqd.progress import phase, plural
from pqd.recipe import Recipe, dump_recipe
from pqd.record import (
    RECORD_VERSION,
    VAL_PREDICTIONS_FILE,
    json_default,
    machine,
)
from pqd.resume import RunFolder, note, step_name
from pqd.state import State
from pqd.stats import ALPHA
from pqd.step_state import load_state, save_state
from pqd.target import resolve as resolve_target
from pqd.train import evaluate, predict, top1

if TYPE_CHECKING:
    from pqd.dataset import Dataset


def run(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    data_dir: str | None = None,
    progress: bool = True,
    measure: bool = True,
    resume: bool = False,
    fresh: bool = False,
) -> dict[str, Any]:
    """Run the whole job; returns the record (also written to ``out_dir/record.json``).

    Every finished step is checkpointed into ``out_dir`` (see :mod:`pqd.resume`): running the
    same recipe into the same folder again continues where it stopped (a complete run is
    returned as it is); ``resume`` also keeps the finished steps of a changed recipe that
    the change does not touch; ``fresh`` starts over.

    With ``measure=False`` the run stops after export (and the torch models' logits for the
    parity check): it writes ``pending.json`` and returns that pending record, and
    :func:`measure_run` measures the artifacts later, e.g. on another machine or after
    other trainings have finished (``pqd search`` measures on its driver, one run at a time).
    """
    from pqd.models import build_model

    t_start = time.perf_counter()
    out = Path(out_dir)
    folder = RunFolder.open(out, recipe, resume=resume, fresh=fresh)
    if folder.complete and measure:
        note(
            f"{out} already holds this recipe's complete run: nothing to do (--fresh runs it again)"
        )
        return json.loads((out / "record.json").read_text(encoding="utf-8"))
    if measure:
        check_runtimes(recipe)
    resolve_device(recipe.device)
    data = recipe_data(recipe, data_dir, progress)

    def build() -> torch.nn.Module:
        return build_model(
            recipe.model.name, data.num_classes, data.mean, data.std, **recipe.model.kwargs
        )

    return execute(
        recipe,
        folder,
        data,
        build,
        build,
        progress=progress,
        measure=measure,
        fresh=fresh,
        t_start=t_start,
    )


def execute(
    recipe: Recipe,
    folder: RunFolder,
    data: Dataset,
    make_model: Callable[[], nn.Module],
    fresh_model: Callable[[], nn.Module],
    *,
    progress: bool = True,
    measure: bool = True,
    fresh: bool = False,
    source: dict[str, Any] | None = None,
    t_start: float | None = None,
    forward_loop: Callable[[nn.Module], None] | None = None,
) -> dict[str, Any]:
    """The body of ``pqd run`` and :func:`pqd.compress`: baseline -> stages -> export ->
    measure into ``folder`` (opened by the caller), on data already loaded.

    Args:
        recipe: the job (a recipe file's, or the one :func:`pqd.compress` builds).
        folder: the opened run folder (what is finished, where to continue).
        data: ``pqd.data.Dataset``.
        make_model: builds the run's starting model (called once, after seeding).
        fresh_model: builds fresh unpruned models like it (channel surgery, resume).
        progress, measure, fresh: as :func:`run`.
        source: the record's ``baseline.source`` when the model is taken as given.
        t_start: when the job started (``time.perf_counter()``; default now).
        forward_loop: the user's calibration loop (:func:`pqd.apply_stages`).

    Returns:
        The record (or, with ``measure=False``, the pending record).
    """
    from pqd.models import check_output_shape

    t_start = time.perf_counter() if t_start is None else t_start
    out = folder.out
    reused = [e["step"] for e in folder.steps]
    device = resolve_device(recipe.device)
    target = resolve_target(recipe.export.target)
    with deterministic(recipe.seed, device) as determinism:
        model = make_model()
        check_output_shape(model, data.num_classes, int(data.train_x.shape[-1]))
        folder.start(fresh)
        atomic_write_text(out / "recipe.yaml", dump_recipe(recipe))
        ctx = Context(data=data, device=device, teacher=model, progress=progress)
        val_loader = ctx.loader("val", 256)
        base = baseline_step(recipe, folder, model, data, val_loader, device, progress, source)
        state, stage_records = run_stages(
            recipe,
            folder,
            model,
            ctx,
            val_loader,
            fresh_model,
            target,
            forward_loop,
            base["val_accuracy"],
        )
    save_val_predictions(state, val_loader, out / VAL_PREDICTIONS_FILE, device, progress)

    # ---- export both artifacts, then measure them side by side
    target = target if state.quantized else "any"  # a float file runs alike everywhere
    final_path, references, export_seconds, reference_seconds = export_files(
        out, model, state, ctx.example_input().cpu(), data, recipe.export, target
    )
    pending = pending_record(recipe, data, device, base, state, target, final_path, stage_records)
    pending.update(
        determinism=determinism,
        resume={
            "reused_steps": reused,
            "continued_after_epoch": folder.continued,
            "carried_seconds": {k: round(v, 2) for k, v in folder.carried.items()},
        },
        timing_s={
            "baseline": round(base["seconds"], 2),
            "stages": round(sum(s["seconds"] for s in stage_records), 2),
            "export": round(export_seconds, 2),
            "reference": round(reference_seconds, 2),
            "total": round(time.perf_counter() - t_start, 2),
            "earlier_processes": round(folder.earlier_seconds(), 2),
        },
        trained_on={**machine(), "torch_threads": torch.get_num_threads()},
    )
    if not measure:
        np.savez(out / REFERENCE_FILE, **references)
        atomic_write_text(out / PENDING_FILE, json.dumps(pending, indent=2, default=json_default))
        return pending

    record = measure_and_record(
        out, recipe, data, references, pending, progress, "in-process, right after training"
    )
    folder.mark_complete()
    return record


def baseline_step(
    recipe: Recipe,
    folder: RunFolder,
    model: nn.Module,
    data: Dataset,
    val_loader: Any,
    device: torch.device,
    progress: bool,
    source: dict[str, Any] | None,
) -> dict[str, Any]:
    """The baseline into ``model``: trained, loaded from the recipe's checkpoint, or taken
    from an earlier, stopped run in ``folder`` (else saved and measured on the validation
    split, and its step finished).

    Returns:
        The baseline step's entry (``source``, ``seconds``, ``val_accuracy``).
    """
    from pqd.engine import recipe_baseline

    out = folder.out
    t0 = time.perf_counter()
    folder.begin(0)
    done = folder.entry(0)
    if done is None and not recipe.baseline.checkpoint and recipe.baseline.epochs:
        phase(f"baseline: {plural(recipe.baseline.epochs, 'epoch')} of training")
    own = out / "baseline.safetensors" if done is not None else None  # finished before
    recipe_baseline(
        model, data, recipe, device=device, checkpoint=own, progress=progress, run=folder
    )
    if done is not None:
        return dict(done)
    save_checkpoint(model, out / "baseline.safetensors", {"recipe": recipe.name})
    source = source or (
        {"checkpoint": recipe.baseline.checkpoint}
        if recipe.baseline.checkpoint
        else {"trained_epochs": recipe.baseline.epochs}
    )
    carried = folder.carried.get(step_name(recipe, 0), 0.0)  # before a stop, if continued
    done = {
        "source": source,
        "seconds": round(time.perf_counter() - t0 + carried, 2),
        "val_accuracy": evaluate(
            model, val_loader, device=device, progress=progress, desc="baseline val"
        ),
    }
    folder.finish(0, "baseline.safetensors", done)
    return done


def run_stages(
    recipe: Recipe,
    folder: RunFolder,
    model: nn.Module,
    ctx: Context,
    val_loader: Any,
    fresh_model: Callable[[], nn.Module],
    target: str,
    forward_loop: Callable[[nn.Module], None] | None,
    baseline_accuracy: float,
) -> tuple[State, list[dict[str, Any]]]:
    """The recipe's stages in order on the baseline ``model`` (those an earlier, stopped run
    finished come back from their checkpoints), each recorded by a :class:`StageRecorder`.

    ``baseline_accuracy`` is the baseline's validation accuracy (fraction): the first stage's
    starting point for the chance check.

    Returns:
        The final state and every stage's entry.
    """
    from pqd.engine import apply_stages, frozen

    state, finished, stage_records = resumed_stages(folder, recipe, fresh_model, ctx)
    state = apply_stages(
        model,
        recipe.stages,
        ctx.data,
        frozen(model),
        train=recipe.train,
        seed=recipe.seed,
        augment=recipe.data.augment,
        device=ctx.device,
        target=target,
        threads=recipe.measure.threads,
        progress=ctx.progress,
        fresh_model=fresh_model,
        state=state,
        start=finished,
        run=folder,
        on_stage=StageRecorder(
            recipe, folder, val_loader, ctx.device, ctx.progress, stage_records, baseline_accuracy
        ),
        forward_loop=forward_loop,
    )
    return state, stage_records


def resumed_stages(
    folder: RunFolder, recipe: Recipe, fresh_model: Callable[[], nn.Module], ctx: Context
) -> tuple[State | None, int, list[dict[str, Any]]]:
    """The stages an earlier, stopped run in ``folder`` finished.

    Returns:
        ``(state after the last finished stage or None, how many finished, their entries)``.
    """
    finished = max(0, min(len(folder.steps) - 1, len(recipe.stages)))
    state = None
    if finished > 0:
        checkpoint = folder.out / folder.steps[finished]["checkpoint"]
        state = load_state(checkpoint, fresh_model, ctx.example_input)
        state.model.to(ctx.device)
    return state, finished, [folder.steps[i + 1]["record"] for i in range(finished)]


class StageRecorder:
    """``apply_stages``'s ``on_stage``: each finished stage measured on the validation
    split, checked against chance (:mod:`pqd.pipeline.collapse`, where the stage's
    ``train.stop_at_chance``), checkpointed into the run folder and appended to the stage
    entries."""

    def __init__(
        self,
        recipe: Recipe,
        folder: RunFolder,
        val_loader: Any,
        device: torch.device,
        progress: bool,
        entries: list[dict[str, Any]],
        baseline_accuracy: float,
    ) -> None:
        self.recipe, self.folder, self.val_loader = recipe, folder, val_loader
        self.device, self.progress, self.entries = device, progress, entries
        self.baseline_accuracy = baseline_accuracy

    def __call__(self, i: int, spec: Any, state: State, seconds: float) -> None:
        desc = f"[{i + 1}/{len(self.recipe.stages)}] {spec.stage}"
        logits, labels = predict(
            state.model,
            self.val_loader,
            device=self.device,
            progress=self.progress,
            desc=f"{desc} val",
        )
        predicted = logits.argmax(1)
        val = top1(predicted, labels)
        if self.recipe.stage_train(i).stop_at_chance:
            before = self.entries[-1]["val_accuracy"] if self.entries else self.baseline_accuracy
            check_above_chance(desc, before, predicted, labels, ALPHA)
        name = step_name(self.recipe, i + 1)
        entry = {
            "index": i,
            "name": spec.stage,
            "config": spec.model_dump(mode="json"),
            # (a continued stage: with its seconds before the stop)
            "seconds": round(seconds + self.folder.carried.get(name, 0.0), 2),
            "val_accuracy": val,
            "info": state.info,
        }
        entry = json.loads(json.dumps(entry, default=json_default))
        checkpoint = self.folder.out / "checkpoints" / f"{name}.safetensors"
        save_state(checkpoint, self.folder.prints[i + 1], state)
        self.folder.finish(i + 1, f"checkpoints/{name}.safetensors", entry)
        self.entries.append(entry)


def save_val_predictions(
    state: State, val_loader: Any, path: Path, device: torch.device, progress: bool
) -> None:
    """The final model's answer on every validation image (labels and predicted classes):
    the planner's pick rule compares candidates image by image on the validation split
    (:mod:`pqd.stats`), never on the test split. Nothing is written without a split."""
    val_logits, val_y = predict(
        state.model, val_loader, device=device, progress=progress, desc="final val"
    )
    if len(val_y):
        np.savez_compressed(
            path,
            labels=val_y.numpy().astype(np.int16),
            final=val_logits.argmax(1).numpy().astype(np.int16),
        )


def pending_record(
    recipe: Recipe,
    data: Dataset,
    device: torch.device,
    base: dict[str, Any],
    state: State,
    target: str,
    final_path: Path,
    stage_records: list[dict[str, Any]],
) -> dict[str, Any]:
    """What ``record.json`` says of a trained, exported run before measurement (the caller
    adds determinism, resume and timing)."""
    return {
        "pqd_version": __version__,
        "record_version": RECORD_VERSION,
        "name": recipe.name,
        "recipe": recipe.model_dump(mode="json"),
        "order": [s.stage for s in recipe.stages],
        "seed": recipe.seed,
        "device": str(device),
        "data": data.summary(),
        "baseline": {
            "precision": "fp32",
            "target": "any",
            "val_accuracy": base["val_accuracy"],
            "source": base["source"],
        },
        "final": {
            "precision": precision_of(state),
            "target": target,
            "val_accuracy": (
                stage_records[-1]["val_accuracy"] if stage_records else base["val_accuracy"]
            ),
            "masked_sparsity": masked_sparsity(state),
            **sparsity_extras(state, final_path, recipe),
        },
        "stages": stage_records,
    }


@contextlib.contextmanager
def deterministic(seed: int, device: torch.device) -> Iterator[dict[str, Any]]:
    """Seed everything and turn on deterministic algorithms for the run; yields the settings
    (for the record) and restores the previous global setting afterwards.

    On CPU the same recipe, seed, thread count and library versions give identical weights,
    masks and accuracies (checked in tests/test_faults.py). ``warn_only``: an op without a
    deterministic kernel warns instead of failing the run.
    """
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    cudnn = torch.backends.cudnn
    cudnn_before = (cudnn.benchmark, cudnn.deterministic)
    cudnn.benchmark, cudnn.deterministic = False, True
    seed_everything(seed)
    try:
        yield {
            "seed": seed,
            "stage_seeds": "seed + 1000 * (stage index + 1); data order and augmentation use "
            "per-loader generators seeded from these",
            "torch_deterministic_algorithms": True,
            "deterministic_warn_only": True,
            "cudnn_benchmark": False,
            "cudnn_deterministic": True,
            "torch_threads": torch.get_num_threads(),
            "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG")
            if device.type == "cuda"
            else None,
            "scope": "identical results for the same recipe, seed, machine, thread count and "
            "library versions",
        }
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        cudnn.benchmark, cudnn.deterministic = cudnn_before
