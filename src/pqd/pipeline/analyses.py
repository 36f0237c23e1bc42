"""Analyses beside ``pqd run``: per-layer quantization sensitivity of a recipe's baseline
(``pqd sensitivity``) and the audit of a finished run folder (``pqd audit``)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pqd.checkpoint import save_checkpoint
from pqd.context import Context
from pqd.engine import seed_everything
from pqd.errors import PqdError
from pqd.pipeline.finish import exit_calibration_of
from pqd.pipeline.inputs import measure_spec, recipe_data, resolve_device
from pqd.quant.sensitivity import layer_sensitivity
from pqd.recipe import QuantizeSpec, Recipe
from pqd.record import (
    write_record,
)
from pqd.target import resolve as resolve_target


def run_sensitivity(
    recipe: Recipe,
    out: str | Path | None = None,
    *,
    data_dir: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Baseline (trained or loaded) -> PTQ graph with the recipe's first quantize options ->
    per-layer sensitivity on the val split; writes ``sensitivity.json`` into ``out``."""
    from pqd.engine import recipe_baseline
    from pqd.models import build_model
    from pqd.quant.calibration import calibrate
    from pqd.quant.prepare import prepare_qat
    from pqd.quant.scheme import scheme_of
    from pqd.target import reduces_range

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
    recipe_baseline(model, data, recipe, device=device, progress=progress)
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
    audits = audit_artifacts(
        paths,
        logits,
        data,
        spec,
        latency,
        full=full,
        seed=recipe.seed,
        exit_calibration=exit_calibration_of(out, spec, data, progress)
        if record["final"].get("early_exit")
        else None,
        progress=progress,
        cache=cache,
    )
    attach(record, audits)
    write_record(record, out)
    return record
