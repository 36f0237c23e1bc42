"""``pqd run``: baseline -> stages in recipe order -> export -> measure the artifacts.

    record = run(load_recipe("recipes/quickstart.yaml"), Path("runs/quick"))

Writes into the run folder: ``recipe.yaml`` (resolved), ``baseline.safetensors``,
``baseline.onnx`` (FP32), ``final.onnx`` (INT8 when a quantize stage ran),
``record.json`` (the contract other tools read) and ``report.md``; while it runs,
``progress.json`` and ``checkpoints/`` let a killed run continue (:mod:`pqd.resume`).

``run(..., measure=False)`` stops after export and writes ``pending.json`` (+ the torch
logits for the parity check); :func:`measure_run` measures that folder later and completes
its record.json (``pqd search`` trains trials anywhere and measures them on its driver).

The package, in the order a run meets it: :mod:`~pqd.pipeline.inputs` (data, device,
runtimes, preflight), :mod:`~pqd.pipeline.execute` (baseline and stages),
:mod:`~pqd.pipeline.finish` (export, measure, record) and :mod:`~pqd.pipeline.analyses`
(``pqd sensitivity``, ``pqd audit``).
"""

from __future__ import annotations

from pqd.pipeline.analyses import audit_run, run_sensitivity
from pqd.pipeline.execute import deterministic, execute, run
from pqd.pipeline.finish import (
    PENDING_FILE,
    REFERENCE_FILE,
    export_files,
    measure_and_record,
    measure_run,
    sparsity_extras,
)
from pqd.pipeline.inputs import (
    check_recipe_data,
    check_runtimes,
    measure_spec,
    preflight,
    recipe_data,
    recipe_root,
    resolve_device,
)

__all__ = [
    "PENDING_FILE",
    "REFERENCE_FILE",
    "audit_run",
    "check_recipe_data",
    "check_runtimes",
    "deterministic",
    "execute",
    "export_files",
    "measure_and_record",
    "measure_run",
    "measure_spec",
    "preflight",
    "recipe_data",
    "recipe_root",
    "resolve_device",
    "run",
    "run_sensitivity",
    "sparsity_extras",
]
