"""``pqd run``: baseline -> stages in recipe order -> export -> measure the artifacts.

    record = run(load_recipe("recipes/quickstart.yaml"), Path("runs/quick"))

Writes into the run folder: ``recipe.yaml`` (resolved), ``baseline.safetensors``,
``baseline.onnx`` (FP32), ``final.onnx`` (INT8 when a quantize stage ran),
``record.json`` (the contract other tools read) and ``report.md``; while it runs,
``progress.json`` and ``checkpoints/`` let a killed run continue (:mod:`pqd.resume`).

``run(..., measure=False)`` stops after export and writes ``pending.json`` (+ the torch
logits for the parity check); :func:`measure_run` measures that folder later and completes
its record.json (``pqd search`` trains trials anywhere and measures them on its driver).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from pqd._version import __version__
from pqd.checkpoint import atomic_write_text, save_checkpoint
from pqd.context import Context
from pqd.engine import seed_everything
from pqd.errors import PqdError
from pqd.models.multi_exit import MultiExitNet
from pqd.progress import phase, plural
from pqd.quant.sensitivity import layer_sensitivity
from pqd.recipe import MeasureSpec, QuantizeSpec, Recipe, dump_recipe
from pqd.record import (
    RECORD_VERSION,
    VAL_PREDICTIONS_FILE,
    finish_record,
    json_default,
    machine,
    save_predictions,
    write_record,
)
from pqd.resume import RunFolder, load_state, note, save_state, step_name
from pqd.state import State
from pqd.target import resolve as resolve_target
from pqd.train import evaluate, predict


def recipe_root(recipe: Recipe, data_dir: str | Path | None = None) -> Any:
    """The recipe's data folder (``pqd.data.DataRoot``): ``data_dir`` (``--data-dir``), else
    ``data.root`` (from the command line or the recipe), else ``PQD_DATA_DIR``, else ``./data``.
    """
    from pqd.data import data_root

    return data_root(data_dir, recipe.data.root, recipe.data._root_from)


def check_recipe_data(recipe: Recipe, data_dir: str | Path | None = None) -> Any:
    """Check the recipe's data without loading it (files present and readable, or a
    download allowed) before work is handed out; returns its ``pqd.data.DataRoot``. An error
    names where the folder was named, as :func:`recipe_data`'s do."""
    from pqd.data import check_data
    from pqd.errors import DataRootError

    root = recipe_root(recipe, data_dir)
    try:
        check_data(
            recipe.data.dataset,
            root.path,
            download=root.download(recipe.data.download),
            explicit=False,
            on_bad_image=recipe.data.on_bad_image,
        )
    except DataRootError as exc:
        raise root.explain(exc) from None
    return root


def recipe_data(recipe: Recipe, data_dir: str | None = None, progress: bool = False) -> Any:
    """The recipe's data set (``pqd.data.Dataset``), from the folder :func:`recipe_root`
    picks, split and limited as the recipe says. An error about the folder names where it
    was named (flag, command line, recipe, environment) and the fix that fits there.

    Args:
        recipe: the job (its ``data`` section; ``data.split_seed`` carves the splits).
        data_dir: a folder given on the command line, or None.
        progress: show a progress bar while an image folder is decoded (on a terminal).

    Returns:
        The loaded data set.
    """
    from pqd.data import load_dataset
    from pqd.errors import DataRootError

    root = recipe_root(recipe, data_dir)
    try:
        return load_dataset(
            recipe.data.dataset,
            root.path,
            val_size=recipe.data.val_size,
            seed=recipe.data.split_seed,
            download=root.download(recipe.data.download),
            limit_train=recipe.data.limit_train,
            limit_test=recipe.data.limit_test,
            image_size=recipe.data.image_size,
            test_size=recipe.data.test_size,
            on_bad_image=recipe.data.on_bad_image,
            progress=progress,
        )
    except DataRootError as exc:
        raise root.explain(exc) from None


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise PqdError(
            "device 'cuda' was asked for but no CUDA GPU is visible", "set device: auto or cpu"
        )
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_runtimes(recipe: Recipe) -> list[str]:
    """The runtimes to measure on (``auto``: every installed one); fails before any training
    if a requested runtime is not installed."""
    from pqd.measurement.runtime import resolve_runtimes

    return resolve_runtimes(recipe.measure.runtimes)


def preflight(recipe: Recipe, data_dir: str | None = None) -> tuple[list[str], list[PqdError]]:
    """What ``pqd validate`` checks beyond the schema, without training: the data (present
    and readable, or allowed to download), the model (imports, builds, gives one logit per
    class), the baseline checkpoint (present, and loads into that model) and the runtimes.

    Args:
        recipe: the validated recipe.
        data_dir: ``--data-dir`` (else the recipe's ``data.root``, else ``$PQD_DATA_DIR``).

    Returns:
        One line per check that passed, and the errors of those that failed.
    """
    from pqd.data import NUM_CLASSES, check_data
    from pqd.errors import DataRootError
    from pqd.folder import DEFAULT_IMAGE_SIZE
    from pqd.models import build_model, check_output_shape

    passed: list[str] = []
    failed: list[PqdError] = []
    root = recipe_root(recipe, data_dir)
    classes = NUM_CLASSES.get(recipe.data.dataset)
    try:
        classes, found = check_data(
            recipe.data.dataset,
            root.path,
            download=root.download(recipe.data.download),
            # a named folder that does not exist is created for a download only when one was
            # asked for (else download is off there anyway)
            explicit=False,
            on_bad_image=recipe.data.on_bad_image,
        )
        passed.append(f"data: {found}")
    except DataRootError as exc:
        failed.append(root.explain(exc))
    except PqdError as exc:
        failed.append(exc)
    model = None
    if classes is not None:
        try:
            model = build_model(
                recipe.model.name, classes, (0.5,) * 3, (0.25,) * 3, **recipe.model.kwargs
            )
            size = recipe.data.image_size or (
                DEFAULT_IMAGE_SIZE if recipe.data.dataset == "folder" else 32
            )
            check_output_shape(model, classes, size)
            params = sum(p.numel() for p in model.parameters())
            passed.append(
                f"model: {recipe.model.name} builds ({params:,} parameters) and "
                f"gives {classes} logits per image"
            )
        except PqdError as exc:
            failed.append(exc)
            model = None
    ckpt = recipe.baseline.checkpoint
    if ckpt:
        from pqd.checkpoint import load_checkpoint, read_state_dict

        try:
            if model is not None:
                load_checkpoint(model, ckpt)
                passed.append(f"checkpoint: {ckpt} loads into the model")
            else:
                read_state_dict(ckpt)
                passed.append(f"checkpoint: {ckpt} is readable (not matched: no model)")
        except PqdError as exc:
            failed.append(exc)
    try:
        passed.append(f"runtimes: {', '.join(check_runtimes(recipe))}")
    except PqdError as exc:
        failed.append(exc)
    return passed, failed


def measure_spec(recipe: Recipe) -> MeasureSpec:
    """The recipe's measure settings with ``runtimes`` resolved (``auto``: every installed
    runtime, onnxruntime first); fails if a requested runtime is missing."""
    return recipe.measure.model_copy(update={"runtimes": check_runtimes(recipe)})


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
    data: Any,
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
    from pqd.engine import apply_stages, baseline, frozen
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

        # ---- baseline: train it or load it (or take it from an earlier, killed run)
        t0 = time.perf_counter()
        done = folder.entry(0)
        if done is None and not recipe.baseline.checkpoint and recipe.baseline.epochs:
            phase(f"baseline: {plural(recipe.baseline.epochs, 'epoch')} of training")
        baseline(
            model,
            data,
            train=recipe.baseline_train(),
            epochs=recipe.baseline.epochs,
            checkpoint=(
                out / "baseline.safetensors" if done is not None else recipe.baseline.checkpoint
            ),
            seed=recipe.seed,
            augment=recipe.data.augment,
            device=device,
            progress=progress,
            run=folder,
        )
        val_loader = ctx.loader("val", 256)
        if done is None:
            save_checkpoint(model, out / "baseline.safetensors", {"recipe": recipe.name})
            source = source or (
                {"checkpoint": recipe.baseline.checkpoint}
                if recipe.baseline.checkpoint
                else {"trained_epochs": recipe.baseline.epochs}
            )
            done = {
                "source": source,
                "seconds": round(time.perf_counter() - t0, 2),
                "val_accuracy": evaluate(
                    model, val_loader, device=device, progress=progress, desc="baseline val"
                ),
            }
            folder.finish(0, "baseline.safetensors", done)
        source, baseline_seconds, baseline_val = (
            done["source"],
            done["seconds"],
            done["val_accuracy"],
        )

        # ---- stages, in the recipe's order (finished ones come back from their checkpoints)
        finished = max(0, min(len(folder.steps) - 1, len(recipe.stages)))
        state = None
        if finished > 0:
            state = load_state(
                out / folder.steps[finished]["checkpoint"], fresh_model, ctx.example_input
            )
            state.model.to(device)
        stage_records = [folder.entry(i + 1) for i in range(finished)]

        def record_stage(i: int, spec: Any, state: State, seconds: float) -> None:
            val = evaluate(
                state.model,
                val_loader,
                device=device,
                progress=progress,
                desc=f"[{i + 1}/{len(recipe.stages)}] {spec.stage} val",
            )
            entry = json.loads(
                json.dumps(
                    {
                        "index": i,
                        "name": spec.stage,
                        "config": spec.model_dump(mode="json"),
                        "seconds": round(seconds, 2),
                        "val_accuracy": val,
                        "info": state.info,
                    },
                    default=json_default,
                )
            )
            name = step_name(recipe, i + 1)
            save_state(out / "checkpoints" / f"{name}.safetensors", folder.prints[i + 1], state)
            folder.finish(i + 1, f"checkpoints/{name}.safetensors", entry)
            stage_records.append(entry)

        state = apply_stages(
            model,
            recipe.stages,
            data,
            frozen(model),
            train=recipe.train,
            seed=recipe.seed,
            augment=recipe.data.augment,
            device=device,
            target=target,
            threads=recipe.measure.threads,
            progress=progress,
            fresh_model=fresh_model,
            state=state,
            start=finished,
            run=folder,
            on_stage=record_stage,
            forward_loop=forward_loop,
        )

    # the final model's answer on every validation image: the planner's pick rule compares
    # candidates image by image on the validation split (pqd.stats), never on the test split
    val_logits, val_y = predict(
        state.model, val_loader, device=device, progress=progress, desc="final val"
    )
    if len(val_y):
        np.savez_compressed(
            out / VAL_PREDICTIONS_FILE,
            labels=val_y.numpy().astype(np.int16),
            final=val_logits.argmax(1).numpy().astype(np.int16),
        )

    # ---- export both artifacts, then measure them side by side
    target = target if state.quantized else "any"  # a float file runs alike everywhere
    final_path, references, export_seconds, reference_seconds = export_files(
        out, model, state, ctx.example_input().cpu(), data, recipe.export, target
    )

    pending = {
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
            "val_accuracy": baseline_val,
            "source": source,
        },
        "final": {
            "precision": _precision(state),
            "target": target,
            "val_accuracy": (stage_records[-1]["val_accuracy"] if stage_records else baseline_val),
            "masked_sparsity": _masked_sparsity(state),
            **_sparsity_extras(state, final_path, recipe),
        },
        "stages": stage_records,
        "determinism": determinism,
        "resume": {"reused_steps": reused, "continued_after_epoch": folder.continued},
        "timing_s": {
            "baseline": round(baseline_seconds, 2),
            "stages": round(sum(s["seconds"] for s in stage_records), 2),
            "export": round(export_seconds, 2),
            "reference": round(reference_seconds, 2),
            "total": round(time.perf_counter() - t_start, 2),
        },
        "trained_on": {**machine(), "torch_threads": torch.get_num_threads()},
    }
    if not measure:
        np.savez(out / REFERENCE_FILE, **references)
        atomic_write_text(out / PENDING_FILE, json.dumps(pending, indent=2, default=json_default))
        return pending

    record = measure_and_record(
        out, recipe, data, references, pending, progress, "in-process, right after training"
    )
    folder.mark_complete()
    return record


def export_files(
    out: Path,
    model: nn.Module,
    state: State,
    example: torch.Tensor,
    data: Any,
    export: Any,
    target: str,
) -> tuple[Path, dict[str, np.ndarray], float, float]:
    """Write ``baseline.onnx`` (the float model) and ``final.onnx`` (the stages' state: INT8
    after a quantize stage; an early-exit net as segment files chained), tag both with
    their classes (and the final one with its target and saturating pairs), and compute the
    torch models' logits on the parity images.

    Args:
        out: the run folder.
        model: the baseline model.
        state: the stages' final state.
        example: an input batch (batch >= 2) on the CPU.
        data: ``pqd.data.Dataset`` (classes; test images for the parity logits).
        export: the recipe's ``export`` section (opset, parity samples).
        target: the resolved deployment target of the final file (``any`` when float).

    Returns:
        ``(final.onnx's path, {"baseline": logits, "final": logits[, exit logits]},
        seconds exporting, seconds computing the logits)``.
    """
    from pqd.measurement.artifacts import torch_reference
    from pqd.measurement.saturation import saturation
    from pqd.onnx_export import export_onnx, set_metadata

    phase("exporting baseline.onnx and final.onnx")
    t0 = time.perf_counter()
    model.cpu()
    state.model.cpu()
    base_path, base_torch = export_onnx(
        model, out / "baseline.onnx", example, quantized=False, opset=export.opset
    )
    exits = isinstance(state.model, MultiExitNet)
    if exits:  # segment files + manifest; final.onnx = the segments chained, no heads
        from pqd.exits.runtime import chain_segments, export_exits

        manifest, final_torch = export_exits(
            state.model, out / "exits", example, quantized=state.quantized, opset=export.opset
        )
        final_path = chain_segments(
            [out / "exits" / s["file"] for s in manifest["segments"]], out / "final.onnx"
        )
    else:
        final_path, final_torch = export_onnx(
            state.model, out / "final.onnx", example, quantized=state.quantized, opset=export.opset
        )
    classes = json.dumps(list(data.classes))
    set_metadata(
        final_path,
        {
            "pqd.target": target,
            "pqd.saturating_weight_pairs": str(saturation(final_path)["pairs_at_risk"]),
            "pqd.classes": classes,
        },
    )
    set_metadata(base_path, {"pqd.classes": classes})
    export_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    references = {
        "baseline": torch_reference(base_torch, data, export.parity_samples),
        "final": torch_reference(final_torch, data, export.parity_samples),
    }
    if exits:
        from pqd.exits.runtime import exit_references

        references.update(exit_references(final_torch, data, export.parity_samples))
    return final_path, references, export_seconds, time.perf_counter() - t0


def measure_and_record(
    out: Path,
    recipe: Recipe,
    data: Any,
    references: dict[str, np.ndarray],
    pending: dict[str, Any],
    progress: bool,
    where: str,
) -> dict[str, Any]:
    """The measure tail of ``pqd run`` (right after training, or later by
    :func:`measure_run`): ``baseline.onnx`` and ``final.onnx`` measured side by side, the
    exits and the audit where the recipe has them, the per-image predictions and the paired
    comparison; writes ``record.json`` and the reports.

    Args:
        out: the run folder.
        recipe: the run's recipe.
        data: ``pqd.data.Dataset`` (its test split is measured).
        references: the torch models' logits on the parity images, per file.
        pending: the pending record (everything but the measurements).
        progress: show progress bars.
        where: where the measurement ran, for ``record["measurement"]``.

    Returns:
        The record.
    """
    from pqd.measurement.artifacts import measure_onnx

    t0 = time.perf_counter()
    spec = measure_spec(recipe)
    logits: dict[str, np.ndarray] = {}
    phase(
        f"measuring baseline.onnx and final.onnx on {len(data.test_y)} test images "
        f"({', '.join(spec.runtimes)}; batch sizes {', '.join(map(str, spec.batch_sizes))})"
    )
    measured = measure_onnx(
        {"baseline": out / "baseline.onnx", "final": out / "final.onnx"},
        references,
        data,
        spec,
        progress=progress,
        logits_out=logits,
    )
    _measure_exits(out, recipe, spec, data, references, measured, progress)
    _audit(out, recipe, spec, data, measured, logits, progress)
    paired = save_predictions(out, logits, data.test_y.numpy(), recipe.seed)
    seconds = time.perf_counter() - t0
    record = finish_record(
        pending,
        measured,
        paired,
        seconds + pending["timing_s"]["reference"],
        recipe.measure.threads,
        where,
        pending["timing_s"]["total"] + seconds,
    )
    write_record(record, out)
    return record


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


PENDING_FILE = "pending.json"
"""A trained and exported run that still awaits measurement (``run(..., measure=False)``)."""

REFERENCE_FILE = "reference_logits.npz"
"""Logits of the exported torch models on the parity images, for :func:`measure_run`."""


def measure_run(
    run_dir: str | Path,
    *,
    data_dir: str | None = None,
    progress: bool = True,
    where: str = "driver, sequential",
) -> dict[str, Any]:
    """Measure a run that ``run(..., measure=False)`` trained and exported; completes it.

    Reads ``pending.json`` and the stored torch logits, measures ``baseline.onnx`` and
    ``final.onnx`` side by side as ``pqd run`` does, writes ``record.json`` + ``report.md``
    and removes ``pending.json``. ``where`` is recorded in ``record["measurement"]``.
    """
    from pqd.recipe import recipe_from_dict

    out = Path(run_dir)
    pending_path = out / PENDING_FILE
    if not pending_path.is_file():
        raise PqdError(
            f"{pending_path} does not exist", "give a run folder written by run(..., measure=False)"
        )
    pending = json.loads(pending_path.read_text(encoding="utf-8"))
    recipe = recipe_from_dict(pending["recipe"], str(pending_path))
    check_runtimes(recipe)  # a missing runtime fails before the data are loaded
    data = recipe_data(recipe, data_dir)
    with np.load(out / REFERENCE_FILE) as refs:
        references = {k: refs[k] for k in refs.files}
    record = measure_and_record(out, recipe, data, references, pending, progress, where)
    pending_path.unlink(missing_ok=True)
    return record


def _measure_exits(
    out: Path,
    recipe: Recipe,
    spec: MeasureSpec,
    data: Any,
    references: dict[str, np.ndarray],
    measured: dict[str, Any],
    progress: bool,
) -> None:
    """With an early_exit stage: calibrate and measure the exits (``exits/manifest.json``)
    next to ``final.onnx`` (the same weights, exits disabled); into ``measured["final"]``."""
    exit_spec = recipe.early_exit()
    if exit_spec is None:
        return
    from pqd.exits.runtime import MANIFEST, measure_exits, references_of

    measured["final"]["early_exit"] = measure_exits(
        out / "exits" / MANIFEST,
        out / "final.onnx",
        references_of(references),
        data,
        spec,
        exit_spec.target,
        rounds=spec.exit_latency_rounds,
        progress=progress,
    )


def _audit(
    out: Path,
    recipe: Recipe,
    spec: MeasureSpec,
    data: Any,
    measured: dict[str, Any],
    logits: dict[str, np.ndarray],
    progress: bool,
) -> None:
    """The audit of both artifacts (:mod:`pqd.measurement.audit`) into ``measured[name]["audit"]``
    from the logits the accuracy came from; ``measure.audit: true`` adds corruptions, memory
    and energy."""
    from pqd.measurement.audit import audit_artifacts

    paths = {name: out / measured[name]["artifact"] for name in ("baseline", "final")}
    audits = audit_artifacts(
        paths,
        logits,
        data,
        spec,
        {n: measured[n]["latency_ms"] for n in paths},
        full=spec.audit,
        seed=recipe.seed,
        exits_manifest=out / "exits" / "manifest.json" if recipe.early_exit() else None,
        progress=progress,
    )
    for name, a in audits.items():
        measured[name]["audit"] = a


def _precision(state: State) -> str:
    """``fp32``, or the quantization scheme's label (``int8`` for the default U8S8)."""
    if not state.quantized:
        return "fp32"
    from pqd.quant.scheme import precision_label, quant_scheme

    return precision_label(quant_scheme(state.model))


def _sparsity_extras(state: State, final_path: Path, recipe: Recipe) -> dict[str, Any]:
    """Keys for record ``final``: the N:M pattern read back from the export
    (``nm_pattern``), the compressed artifact (``compressed_size_bytes``,
    ``compression_ratio``, ...) and the pruned architecture (``structure``)."""
    extras: dict[str, Any] = {}
    if state.nm_layers:
        from pqd.measurement.sparsity import nm_report

        extras["nm_pattern"] = nm_report(final_path, state.nm_layers)
    if recipe.export.compress:
        from pqd.onnx_export import compress_artifact

        extras.update(compress_artifact(final_path))
    if state.structure:
        extras["structure"] = state.structure
    return extras


def _masked_sparsity(state: State) -> float | None:
    from pqd.prune.masks import sparsity_of

    return sparsity_of(state.masks) if state.masks else None


def run_sensitivity(
    recipe: Recipe,
    out: str | Path | None = None,
    *,
    data_dir: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Baseline (trained or loaded) -> PTQ graph with the recipe's first quantize options ->
    per-layer sensitivity on the val split; writes ``sensitivity.json`` into ``out``."""
    from pqd.checkpoint import save_checkpoint
    from pqd.context import Context
    from pqd.engine import baseline, seed_everything
    from pqd.models import build_model
    from pqd.pipeline import resolve_device
    from pqd.quant.calibration import calibrate
    from pqd.quant.prepare import prepare_qat
    from pqd.quant.scheme import scheme_of
    from pqd.target import reduces_range
    from pqd.target import resolve as resolve_target

    t0 = time.perf_counter()
    device = resolve_device(recipe.device)
    data = recipe_data(recipe, data_dir)
    if len(data.val_y) == 0:
        from pqd.errors import RecipeError

        raise RecipeError(
            "sensitivity is measured on the validation split, which is empty",
            "set data.val_size > 0",
        )
    seed_everything(recipe.seed)
    model = build_model(
        recipe.model.name, data.num_classes, data.mean, data.std, **recipe.model.kwargs
    ).to(device)
    ctx = Context(
        data=data,
        device=device,
        teacher=model,
        progress=progress,
        target=resolve_target(recipe.export.target),
    )
    baseline(
        model,
        data,
        train=recipe.baseline_train(),
        epochs=recipe.baseline.epochs,
        checkpoint=recipe.baseline.checkpoint,
        seed=recipe.seed,
        augment=recipe.data.augment,
        device=device,
        progress=progress,
    )
    if out is not None and not recipe.baseline.checkpoint:
        Path(out).mkdir(parents=True, exist_ok=True)
        save_checkpoint(model, Path(out) / "baseline.safetensors", {"recipe": recipe.name})
    spec = next(
        (s for s in recipe.stages if isinstance(s, QuantizeSpec)),
        QuantizeSpec(stage="quantize", mode="ptq", epochs=0),
    )
    scheme = {
        **scheme_of(spec, reduces_range(ctx.target)),
        "mode": "ptq" if spec.mode != "dynamic" else "dynamic",
    }
    graph = prepare_qat(model, ctx.example_input(), scheme).to(device)
    val = ctx.loader("val", 256)
    calibrate(
        graph, ctx.loader("val", recipe.train.batch_size), spec.calibration_batches, device, scheme
    )
    result = layer_sensitivity(graph, val, device)
    result.update(
        {
            "model": recipe.model.name,
            "scheme": scheme,
            "val_images": len(data.val_y),
            "baseline": recipe.baseline.checkpoint or "trained",
            "seconds": round(time.perf_counter() - t0, 2),
        }
    )
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "sensitivity.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def audit_run(
    run_dir: str | Path,
    *,
    data_dir: str | None = None,
    full: bool = True,
    progress: bool = True,
    cache: Path | None = None,
) -> dict[str, Any]:
    """Audit the artifacts of a finished ``pqd run`` folder and write the audit into its
    record.json (and re-render report.md with the audit plots).

    Re-reads record.json (recipe, primary runtime), loads the test split, runs
    ``baseline.onnx`` and ``final.onnx`` on the primary runtime and computes
    :func:`audit_artifacts` (``full``: with corruptions, memory and energy). Batch-1 tails
    (p99 / max) are re-timed when the record predates them.

    Args:
        run_dir: the run folder.
        data_dir: folder holding the data sets (else ``PQD_DATA_DIR``, the recipe's root).
        full: corruption suite, memory and energy too.
        progress: progress bars.
        cache: the corruption cache folder (``None``: the default).

    Returns:
        The updated record.
    """
    from pqd.errors import PqdError
    from pqd.measurement.artifacts import runtime_logits
    from pqd.measurement.audit import ARTIFACTS, attach, audit_artifacts, latency_tail
    from pqd.measurement.latency import compare_latency
    from pqd.measurement.runtime import open_runner
    from pqd.recipe import recipe_from_dict

    out = Path(run_dir)
    path = out / "record.json"
    if not path.is_file():
        raise PqdError(f"{path} does not exist", "give a run folder written by 'pqd run'")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        recipe = recipe_from_dict(record["recipe"], str(path))
        primary = record["final"]["runtime"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise PqdError(
            f"{path} is not a complete pqd record ({type(exc).__name__}: {exc})",
            "re-run the recipe into that folder",
        ) from None
    paths = {name: out / record[name]["artifact"] for name in ARTIFACTS}
    for p in paths.values():
        if not p.is_file():
            raise PqdError(f"{p} does not exist", "re-run the recipe into that folder")
    spec = measure_spec(recipe)
    spec = spec.model_copy(
        update={"runtimes": [primary] + [r for r in spec.runtimes if r != primary]}
    )
    data = recipe_data(recipe, data_dir)
    logits = {}
    runners = {}
    for name, p in paths.items():
        runners[name] = open_runner(primary, p, spec.threads)
        logits[name] = runtime_logits(
            runners[name].run,
            data.test_x,
            spec.accuracy_batch_size,
            f"{name} audit ({primary})",
            progress,
        )
    latency = {name: record[name].get("latency_ms", {}) for name in paths}
    if any(latency_tail(v) is None for v in latency.values()):  # a record without p99
        shape = (1, *(int(d) for d in data.test_x.shape[1:]))
        stats = compare_latency(
            {n: r.run for n, r in runners.items()},
            shape,
            warmup=spec.warmup,
            repeats=spec.repeats,
            progress=progress,
            desc="audit latency batch 1",
        )
        latency = {
            n: {"batches": {"1": {**st.as_dict(), "source": "re-timed by pqd audit"}}}
            for n, st in stats.items()
        }
    manifest = out / "exits" / "manifest.json"
    audits = audit_artifacts(
        paths,
        logits,
        data,
        spec,
        latency,
        full=full,
        seed=recipe.seed,
        exits_manifest=manifest if record["final"].get("early_exit") else None,
        progress=progress,
        cache=cache,
    )
    attach(record, audits)
    write_record(record, out)
    return record
