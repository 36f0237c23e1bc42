"""A trained run finished: both files exported with their metadata and parity logits, then
measured side by side (right after training, or later from ``pending.json`` by
:func:`measure_run`), the exits and the audit included, into ``record.json``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn

from pqd.errors import PqdError
from pqd.models.multi_exit import MultiExitNet
from pqd.pipeline.inputs import check_runtimes, measure_spec, recipe_data
from pqd.progress import phase
from pqd.recipe import EarlyExitSpec, MeasureSpec, Recipe
from pqd.record import (
    finish_record,
    save_predictions,
    write_record,
)
from pqd.state import State

if TYPE_CHECKING:
    from pqd.dataset import Dataset


def export_files(
    out: Path,
    model: nn.Module,
    state: State,
    example: torch.Tensor,
    data: Dataset,
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
    final_torch: nn.Module
    # with exits: segment files + manifest; final.onnx = the segments chained, no heads
    if isinstance(state.model, MultiExitNet):
        from pqd.exits.export import chain_segments, export_exits

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
        from pqd.exits.measure import exit_references

        references.update(exit_references(final_torch, data, export.parity_samples))
    return final_path, references, export_seconds, time.perf_counter() - t0


def measure_and_record(
    out: Path,
    recipe: Recipe,
    data: Dataset,
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
    exit_spec = recipe.early_exit()
    if exit_spec is not None:
        measured["final"]["early_exit"] = measure_exits_of(
            out, exit_spec, spec, data, references, progress
        )
    audit_into(out, recipe, spec, data, measured, logits, progress)
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


def measure_exits_of(
    out: Path,
    exit_spec: EarlyExitSpec,
    spec: MeasureSpec,
    data: Dataset,
    references: dict[str, np.ndarray],
    progress: bool,
) -> dict[str, Any]:
    """The exits of the run in ``out`` calibrated and measured (``exits/manifest.json``)
    next to ``final.onnx`` (the same weights, exits disabled): ``record["final"]``'s
    ``early_exit``."""
    from pqd.exits.export import MANIFEST
    from pqd.exits.measure import measure_exits, references_of

    return measure_exits(
        out / "exits" / MANIFEST,
        out / "final.onnx",
        references_of(references),
        data,
        spec,
        exit_spec.target,
        rounds=spec.exit_latency_rounds,
        progress=progress,
    )


def audit_into(
    out: Path,
    recipe: Recipe,
    spec: MeasureSpec,
    data: Dataset,
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
        exit_calibration=exit_calibration_of(out, spec, data, progress)
        if recipe.early_exit()
        else None,
        progress=progress,
    )
    for name, a in audits.items():
        measured[name]["audit"] = a


def exit_calibration_of(
    out: Path, spec: MeasureSpec, data: Dataset, progress: bool
) -> list[dict[str, Any]] | None:
    """The calibration of every exit head of the run in ``out`` on the primary runtime
    (:func:`pqd.exits.measure.exit_calibration`); None without an exit manifest there."""
    from pqd.exits.export import MANIFEST
    from pqd.exits.measure import exit_calibration

    manifest = out / "exits" / MANIFEST
    if not manifest.is_file():
        return None
    return exit_calibration(
        manifest, spec.runtimes[0], spec.threads, data, spec.accuracy_batch_size, progress
    )


def precision_of(state: State) -> str:
    """``fp32``, or the quantization scheme's label (``int8`` for the default U8S8)."""
    if not state.quantized:
        return "fp32"
    from pqd.quant.scheme import precision_label, quant_scheme

    return precision_label(quant_scheme(state.model))


def sparsity_extras(state: State, final_path: Path, recipe: Recipe) -> dict[str, Any]:
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


def masked_sparsity(state: State) -> float | None:
    from pqd.prune.masks import sparsity_of

    return sparsity_of(state.masks) if state.masks else None
