"""Measure a deployed multi-exit network: calibrate its thresholds on the validation split
with the deployed files, then accuracy per exit and with exits, exit fractions, expected
MACs / BitOps, parity with the torch model, and batch-1 latency over every test image next
to the same weights with exits disabled.

Kept apart from the files (:mod:`pqd.exits.export`) and their runtime
(:mod:`pqd.exits.runtime`): this is the pipeline's measuring step for an early-exit run,
the one place that opens several runtimes of the same files and times them side by side
(with the shared timer, :func:`pqd.measurement.latency.interleaved_ms`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn

from pqd.exits.export import json_threshold, write_graph, write_manifest
from pqd.exits.graph import GRAPH_FILE
from pqd.exits.runtime import ExitRuntime, all_exit_outputs
from pqd.measurement.latency import interleaved_ms
from pqd.measurement.runtime import open_runner, static_batch

if TYPE_CHECKING:
    from pqd.dataset import Dataset

REFERENCE_PREFIX = "exit_"

_Entries = dict[str, list[dict[str, Any]]]


def exit_references(
    deploy: nn.Module, data: Dataset, parity_samples: int | None
) -> dict[str, np.ndarray]:
    """Logits of every exit (``exit_0``...; the last is the final head) of the deployable
    torch MultiExitNet on the first ``parity_samples`` test images, for the parity check."""
    n_par = len(data.test_y) if parity_samples is None else min(parity_samples, len(data.test_y))
    batches = []
    with torch.no_grad():
        for i in range(0, n_par, 256):
            x = data.test_x[i : min(i + 256, n_par)].float().div_(255.0)
            batches.append([o.float().numpy() for o in deploy.forward_all(x)])
    if not batches:
        return {}
    return {
        f"{REFERENCE_PREFIX}{k}": np.concatenate([b[k] for b in batches])
        for k in range(len(batches[0]))
    }


def references_of(references: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The per-exit logits of :func:`exit_references` from a dict holding other keys too."""
    keys = sorted(
        (k for k in references if k.startswith(REFERENCE_PREFIX)),
        key=lambda k: int(k[len(REFERENCE_PREFIX) :]),
    )
    return [references[k] for k in keys]


def latency_over_split(
    runs: dict[str, Callable[[np.ndarray], Any]],
    x_uint8: torch.Tensor,
    *,
    rounds: int = 3,
    warmup: int = 50,
    progress: bool = True,
    desc: str = "exit latency",
    switch_pause_ms: float = 100.0,
) -> dict[str, dict[str, float]]:
    """Batch-1 wall time (ms) of every ``runs[name](x)`` over every image of ``x_uint8``.

    The runs take turns: each round times every run over the whole split, one image per
    call, in the same order, with ``switch_pause_ms`` of idle time after each (onnxruntime
    workers spin on after a session's last call); mean, p50, p90, min over all samples.
    Unlike :func:`~pqd.measurement.latency.compare_latency` (one random input), every image
    is timed: which exit an input takes, and so its time, depends on the image.
    """
    xs = [x_uint8[i : i + 1].float().div_(255.0).numpy() for i in range(len(x_uint8))]
    samples = interleaved_ms(
        runs,
        [xs[i] for i in range(min(warmup, len(xs)))],
        [xs] * rounds,
        switch_pause_ms=switch_pause_ms,
        progress=progress,
        desc=desc,
    )
    out = {}
    for name, ms in samples.items():
        out[name] = {
            "mean": round(float(ms.mean()), 4),
            "p50": round(float(np.percentile(ms, 50)), 4),
            "p90": round(float(np.percentile(ms, 90)), 4),
            "min": round(float(ms.min()), 4),
            "samples": len(ms),
            "rounds": rounds,
        }
    return out


@dataclass
class _Setup:
    """What the measurement on every runtime shares."""

    manifest_path: Path
    final_path: str | Path
    thresholds: list[float]
    entries: _Entries
    data: Dataset
    spec: Any
    rounds: int
    progress: bool


def measure_exits(
    manifest_path: str | Path,
    final_path: str | Path,
    ref_logits: Sequence[np.ndarray],
    data: Dataset,
    spec: Any,
    target: Any,
    *,
    rounds: int = 3,
    progress: bool = True,
) -> dict[str, Any]:
    """Calibrate the manifest's thresholds on the validation split with the deployed files,
    then measure on the test split.

    Args:
        manifest_path: the exits' ``manifest.json`` (rewritten with the thresholds found,
            and ``exits.onnx`` with it).
        final_path: the same weights with exits disabled (one graph), timed alongside.
        ref_logits: the torch model's logits per exit on the first test images
            (:func:`exit_references`), for parity.
        data: the data set (``val_x``/``val_y``, ``test_x``/``test_y``: uint8 images).
        spec: the recipe's MeasureSpec with runtimes resolved (the first calibrates).
        target: the ExitTarget the thresholds are calibrated for.
        rounds: latency rounds over the test split.
        progress: show progress bars.

    Returns:
        Accuracy per exit and with exits, exit fractions, expected MACs / BitOps, and
        batch-1 latency over every test image next to the same weights with exits disabled
        (``final_path``; and the segments run back to back without heads), per runtime under
        ``runtimes`` and the first runtime's at the top level.
    """
    manifest_path = Path(manifest_path)
    manifest = json.loads(manifest_path.read_text())
    primary = spec.runtimes[0]
    entries = {"segments": manifest["segments"], "heads": manifest["heads"]}
    thresholds, found, val_correct = _calibrate(
        manifest_path, manifest, entries, data, spec, target, progress
    )
    result = _summary(manifest_path, manifest, entries, found, val_correct)
    setup = _Setup(manifest_path, final_path, thresholds, entries, data, spec, rounds, progress)
    for name in spec.runtimes:
        result["runtimes"][name] = _measure_runtime(setup, name, ref_logits)
    result.update({k: v for k, v in result["runtimes"][primary].items() if k != "parity"})
    result["parity"] = result["runtimes"][primary]["parity"]
    result["runtime"] = primary
    result["no_exit_reference"] = (
        "final.onnx: the same segments chained into one graph "
        "without heads, one runtime call per image"
    )
    return result


def _calibrate(
    manifest_path: Path,
    manifest: dict[str, Any],
    entries: _Entries,
    data: Dataset,
    spec: Any,
    target: Any,
    progress: bool,
) -> tuple[list[float], dict[str, Any], np.ndarray]:
    """Thresholds calibrated on the validation split with the first runtime's outputs,
    written into the manifest (and ``exits.onnx``): (thresholds, what calibration found,
    correct [exits + 1, N] on the validation split)."""
    from pqd.exits.heads import calibrate_thresholds

    primary = spec.runtimes[0]
    y_val = data.val_y.numpy()
    costs_macs = _cumulative(entries, "macs")
    full_macs = sum(e["macs"] for e in manifest["segments"])
    rt = ExitRuntime(
        manifest_path, primary, spec.threads, thresholds=[math.inf] * len(manifest["heads"])
    )
    val_logits, val_conf = all_exit_outputs(
        rt, data.val_x, spec.accuracy_batch_size, "exits val", progress
    )
    val_correct = val_logits.argmax(2) == y_val[None, :]
    found = calibrate_thresholds(val_conf, val_correct, costs_macs, target, full_macs)
    thresholds = [float(t) for t in found["thresholds"]]
    manifest["thresholds"] = [json_threshold(t) for t in thresholds]
    manifest["calibration"] = {
        "split": "val",
        "images": len(y_val),
        "runtime": primary,
        "target": {k: v for k, v in target.model_dump().items() if v is not None},
        "target_met": found["target_met"],
        "accuracy_with_exits": found["accuracy"],
        "reference_accuracy": found["reference_accuracy"],
        "exit_fractions": found["exit_fractions"],
    }
    write_graph(manifest, manifest_path.parent)
    write_manifest(manifest, manifest_path.parent)
    return thresholds, found, val_correct


def _summary(
    manifest_path: Path,
    manifest: dict[str, Any],
    entries: _Entries,
    found: dict[str, Any],
    val_correct: np.ndarray,
) -> dict[str, Any]:
    """The result's fields that do not depend on the runtime (``runtimes`` still empty)."""
    return {
        "positions": manifest["positions"],
        "confidence": manifest["confidence"],
        "thresholds": manifest["thresholds"],
        "target": manifest["calibration"]["target"],
        "target_met": found["target_met"],
        "val": {
            "exit_accuracy": [float(c.mean()) for c in val_correct],
            "accuracy_with_exits": found["accuracy"],
            "accuracy_no_exits": found["reference_accuracy"],
            "exit_fractions": found["exit_fractions"],
        },
        "manifest": str(manifest_path.relative_to(manifest_path.parent.parent)),
        "files": manifest["order"],
        "size_bytes": sum(e["size_bytes"] for e in (*manifest["segments"], *manifest["heads"])),
        "graph": {"file": f"exits/{GRAPH_FILE}", "size_bytes": manifest["graph"]["size_bytes"]},
        "part_macs": {k: [e["macs"] for e in v] for k, v in entries.items()},
        "runtimes": {},
    }


def _measure_runtime(s: _Setup, name: str, ref_logits: Sequence[np.ndarray]) -> dict[str, Any]:
    """Accuracy, exits, expected costs, latency and parity of the files on runtime ``name``
    over the test split."""
    from pqd.exits.heads import exit_assignment
    from pqd.measurement.parity import parity

    y_test = s.data.test_y.numpy()
    n_par = len(ref_logits[0]) if len(ref_logits) else 0
    rt = ExitRuntime(s.manifest_path, name, s.spec.threads, thresholds=s.thresholds)
    logits, conf = all_exit_outputs(
        rt, s.data.test_x, s.spec.accuracy_batch_size, f"exits test ({name})", s.progress
    )
    correct = logits.argmax(2) == y_test[None, :]
    where = exit_assignment(conf, s.thresholds)
    chosen = logits[where, np.arange(len(y_test))]
    runtime_agreement, graph_agreement = _agreement(rt, s.data.test_x, chosen, where)
    fractions = (np.bincount(where, minlength=len(s.thresholds) + 1) / len(y_test)).tolist()
    exp_macs, _ = _expected(s.entries, "macs", fractions, s.thresholds)
    exp_bitops, full_bitops = _expected(s.entries, "bitops", fractions, s.thresholds)
    full_macs = sum(e["macs"] for e in s.entries["segments"])
    res = {
        "per_exit_accuracy": [float(c.mean()) for c in correct],
        "accuracy_with_exits": float((chosen.argmax(1) == y_test).mean()),
        "accuracy_no_exits": float(correct[-1].mean()),
        "runtime_agreement": runtime_agreement,
        "graph_agreement": graph_agreement,
        "exit_fractions": fractions,
        "expected_macs": exp_macs,
        "full_macs": full_macs,
        "expected_macs_fraction": exp_macs / full_macs,
        "expected_bitops": exp_bitops,
        "full_bitops": full_bitops,
        **_latency_fields(_exit_latency(s, name, rt)),
        "parity": [parity(ref_logits[k], logits[k][:n_par]) for k in range(len(ref_logits))],
    }
    res["accuracy_drop_points"] = 100 * (res["accuracy_no_exits"] - res["accuracy_with_exits"])
    return res


def _agreement(
    rt: ExitRuntime, x_uint8: torch.Tensor, chosen: np.ndarray, where: np.ndarray
) -> tuple[float, float | None]:
    """(share of inputs where the runtime's own early-exit path gives the answer of the
    bulk outputs ``chosen``; share where ``exits.onnx``, one image at a time, gives the same
    exit and answer, or None when the runtime does not run it)."""
    n = len(chosen)
    run_pred = np.concatenate(
        [
            rt.run(x_uint8[i : i + 64].float().div_(255.0).numpy())[0].argmax(1)
            for i in range(0, n, 64)
        ]
    )
    graph_agreement = None
    if rt.uses_graph:
        one_by_one = [rt.run_one(x_uint8[i : i + 1].float().div_(255.0).numpy()) for i in range(n)]
        graph_agreement = float(
            np.mean(
                [
                    lg.argmax() == chosen[i].argmax() and k == where[i]
                    for i, (lg, k) in enumerate(one_by_one)
                ]
            )
        )
    return float((run_pred == chosen.argmax(1)).mean()), graph_agreement


def _exit_latency(s: _Setup, name: str, rt: ExitRuntime) -> dict[str, dict[str, float]]:
    """Batch-1 latency over the test split on runtime ``name``: ``exits`` (``run_one``),
    ``final`` (exits disabled, one graph), ``files`` (part files in turn), ``segments`` (no
    heads) and ``unfused`` (segment and head files as separate calls)."""
    one = 1 if static_batch(name) else None
    threads = s.spec.threads
    lat_rt = (
        rt
        if one is None
        else ExitRuntime(s.manifest_path, name, threads, thresholds=s.thresholds, batch=1)
    )
    unfused = ExitRuntime(
        s.manifest_path,
        name,
        threads,
        thresholds=s.thresholds,
        batch=one,
        fused=False,
        graph=False,
    )
    final_run = open_runner(name, s.final_path, threads, batch=one).run
    return latency_over_split(
        {
            "exits": lat_rt.run_one,
            "final": final_run,
            "files": lat_rt.run_files,
            "segments": lat_rt.run_segments,
            "unfused": unfused.run_files,
        },
        s.data.test_x,
        rounds=s.rounds,
        warmup=s.spec.warmup,
        progress=s.progress,
        desc=f"exit latency ({name})",
    )


def _latency_fields(lat: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The result's latency entries and speedups from :func:`_exit_latency`."""
    return {
        "latency_ms": lat["exits"],
        "no_exit_latency_ms": lat["final"],
        "files_latency_ms": lat["files"],
        "segments_no_heads_latency_ms": lat["segments"],
        "unfused_latency_ms": lat["unfused"],
        "speedup_mean": lat["final"]["mean"] / lat["exits"]["mean"],
        "speedup_p50": lat["final"]["p50"] / lat["exits"]["p50"],
        "speedup_mean_vs_segments": lat["segments"]["mean"] / lat["exits"]["mean"],
        "speedup_mean_files": lat["final"]["mean"] / lat["files"]["mean"],
    }


def _expected(
    entries: _Entries,
    key: str,
    fractions: Sequence[float],
    thresholds: Sequence[float] | None = None,
) -> tuple[float, int]:
    """(expected per-image ``key`` under exit ``fractions``, value without exits); heads
    whose threshold is above 1 are never run (:class:`ExitRuntime` skips them)."""
    costs = _cumulative(entries, key, thresholds)
    return float(np.dot(fractions, costs)), int(sum(e[key] for e in entries["segments"]))


def _cumulative(
    entries: _Entries, key: str, thresholds: Sequence[float] | None = None
) -> list[float]:
    segs = [e[key] for e in entries["segments"]]
    heads = [
        0 if thresholds is not None and thresholds[k] > 1.0 else e[key]
        for k, e in enumerate(entries["heads"])
    ]
    out, run = [], 0.0
    for k, s in enumerate(segs):
        run += s + (heads[k] if k < len(heads) else 0)
        out.append(run)
    return out


def exit_calibration(
    manifest: Path, runtime: str, threads: int, data: Dataset, batch_size: int, progress: bool
) -> list[dict[str, Any]]:
    """Calibration of each exit head's confidence (the value compared with its threshold)
    against the correctness of that head's top-1, on the test split, plus the head's NLL and
    Brier score."""
    from pqd.measurement.audit import calibration, reliability

    heads = json.loads(manifest.read_text())["heads"]
    rt = ExitRuntime(manifest, runtime, threads, thresholds=[float("inf")] * len(heads))
    logits, conf = all_exit_outputs(rt, data.test_x, batch_size, "exit calibration", progress)
    y = data.test_y.numpy()
    out = []
    for k in range(len(conf)):
        cal = calibration(logits[k], y)
        rel = reliability(conf[k], logits[k].argmax(1) == y)
        out.append(
            {
                "exit": k,
                "accuracy": float((logits[k].argmax(1) == y).mean()),
                "confidence_ece": rel["ece"],
                "nll": cal["nll"],
                "brier": cal["brier"],
                "softmax_ece": cal["ece"],
                "bin_count": rel["bin_count"],
                "bin_confidence": rel["bin_confidence"],
                "bin_accuracy": rel["bin_accuracy"],
            }
        )
    return out
