"""A run's record: ``record.json`` (the contract other tools read), its per-image predictions
and the paired comparison of the final file against the baseline, written beside the report.

:func:`finish_record` assembles the record from what training left (``pending.json``) and
what measuring found; :func:`write_record` writes it with ``report.md``;
:func:`save_predictions` / :func:`load_predictions` keep the per-image answers that every
paired comparison (:mod:`pqd.stats`) is made of.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pqd.checkpoint import atomic_write_text
from pqd.stats import compare_paired

RECORD_VERSION = 1


def machine() -> dict[str, Any]:
    """Host name, CPU model and logical CPU count of this machine."""
    import os
    import socket

    from pqd.measurement.env import cpu_model

    return {"host": socket.gethostname(), "cpu": cpu_model(), "logical_cpus": os.cpu_count()}


PREDICTIONS_FILE = "predictions.npz"
"""Per test image: the true class (``labels``) and each artifact's predicted class on the
primary runtime (``baseline``, ``final``), so that runs on the same test images can be
compared image by image (:func:`pqd.stats.compare_paired`) long after they were measured."""


def save_predictions(
    out: Path, logits: dict[str, np.ndarray], labels: np.ndarray, seed: int
) -> dict[str, Any]:
    """Write :data:`PREDICTIONS_FILE` and compare final against baseline image by image.

    Args:
        out: the run folder.
        logits: test-split logits per artifact on the primary runtime.
        labels: the test split's true classes.
        seed: the bootstrap's seed (the run's).

    Returns:
        The paired comparison (final minus baseline, fractions) with its verdict.
    """
    preds = {name: v.argmax(1).astype(np.int16) for name, v in logits.items()}
    np.savez_compressed(out / PREDICTIONS_FILE, labels=labels.astype(np.int16), **preds)
    paired = compare_paired(preds["final"], preds["baseline"], labels, seed=seed)
    return {**paired.as_dict(), "verdict": paired.verdict("final", "baseline")}


VAL_PREDICTIONS_FILE = "val_predictions.npz"
"""Per validation image: the true class (``labels``) and the final torch model's predicted
class (``final``), written after the stages (the planner's pick rule reads it)."""


def load_predictions(run_dir: str | Path, split: str = "test") -> dict[str, np.ndarray] | None:
    """A run folder's per-image predictions, or None when the run has none (measured before
    pqd wrote them, or no validation split).

    Args:
        run_dir: the run folder.
        split: ``"test"`` (:data:`PREDICTIONS_FILE`: ``labels``, ``baseline``, ``final`` on the
            primary runtime) or ``"val"`` (:data:`VAL_PREDICTIONS_FILE`: ``labels``,
            ``final`` of the torch model).

    Returns:
        Arrays by name.
    """
    name = PREDICTIONS_FILE if split == "test" else VAL_PREDICTIONS_FILE
    path = Path(run_dir) / name
    if not path.is_file():
        return None
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def finish_record(
    pending: dict[str, Any],
    measured: dict[str, Any],
    paired: dict[str, Any],
    measure_seconds: float,
    threads: int,
    where: str,
    total_seconds: float,
) -> dict[str, Any]:
    """The record.json of ``pqd run`` from a pending record and the measured artifacts."""
    from pqd.measurement.env import environment
    from pqd.target import assess

    env = environment(threads)
    min_agreement = pending["recipe"]["export"].get("parity_min_agreement", 0.99)
    baseline = {**measured["baseline"], **pending["baseline"]}
    final = {**measured["final"], **pending["final"]}
    for art in (baseline, final):
        art.update(assess(art, art.get("target"), env["cpu_flags"], min_agreement))
    timing = {k: pending["timing_s"][k] for k in ("baseline", "stages", "export")}
    earlier = float(pending["timing_s"].get("earlier_processes", 0.0))
    timing.update(
        measure=round(measure_seconds, 2),
        total=round(total_seconds, 2),  # this process (with a pending record: and measuring)
        earlier_processes=round(earlier, 2),  # a stopped run's steps before this process
        all_processes=round(total_seconds + earlier, 2),
    )
    keys = ("pqd_version", "record_version", "name", "recipe", "order", "seed", "device")
    return {
        **{k: pending[k] for k in keys},
        "environment": env,
        "data": pending["data"],
        "baseline": baseline,
        "final": final,
        "comparison": {**compare(baseline, final), "paired": paired},
        "stages": pending["stages"],
        "timing_s": timing,
        "measurement": {**machine(), "where": where, "trained_on": pending["trained_on"]},
        **{k: pending[k] for k in ("determinism", "resume") if k in pending},
    }


def compare(baseline: dict[str, Any], final: dict[str, Any]) -> dict[str, Any]:
    """Headline ratios of final vs baseline on the primary runtime."""
    lat_b, lat_f = baseline["latency_ms"], final["latency_ms"]
    out = {
        "accuracy_drop_points": round(100 * (baseline["accuracy"] - final["accuracy"]), 2),
        "size_ratio": round(baseline["size_bytes"] / final["size_bytes"], 3),
        "speedup_batch1_p50": round(lat_b["p50"] / lat_f["p50"], 3),
    }
    for b, stats in lat_b.get("batches", {}).items():
        if b != "1" and b in lat_f.get("batches", {}):
            out[f"speedup_batch{b}_p50"] = round(stats["p50"] / lat_f["batches"][b]["p50"], 3)
    if final.get("audit"):
        from pqd.measurement.audit import audit_comparison

        out.update(audit_comparison(final["audit"]))
    ee = final.get("early_exit")
    if ee is not None:  # exits on vs off, same weights, timed over the whole test split
        out["early_exit_speedup_mean"] = round(ee["speedup_mean"], 3)
        out["early_exit_accuracy_drop_points"] = round(ee["accuracy_drop_points"], 2)
    return out


def write_record(record: dict[str, Any], out: Path) -> None:
    """Write record.json, report.md and report.html atomically (the reports are rendered
    from the record)."""
    atomic_write_text(out / "record.json", json.dumps(record, indent=2, default=json_default))
    write_report(record, out)


def write_report(record: dict[str, Any], out: Path) -> str:
    """Render a run's ``report.md`` from its record and the same as a self-contained
    ``report.html`` (the audit's plots embedded), as ``pqd search`` and ``pqd plan`` do.

    Args:
        record: the run's record.
        out: the run folder.

    Returns:
        The Markdown text.
    """
    from pqd.markdown import linked_images, markdown_html
    from pqd.report import render_markdown

    if record.get("final", {}).get("audit"):
        from pqd.report_audit import write_audit_plots

        write_audit_plots(record, out)
    text = render_markdown(record)
    atomic_write_text(out / "report.md", text)
    atomic_write_text(out / "report.html", markdown_html(text, linked_images(text, out)))
    return text


def json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    warnings.warn(f"record: {type(obj).__name__} written as text", stacklevel=2)
    return str(obj)
