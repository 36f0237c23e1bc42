"""Measure several ONNX artifacts side by side on every requested runtime.

For each artifact: top-1 accuracy of the artifact itself on the test split,
top-1 agreement with the torch model it was exported from (parity), the int8 weight
pairs that can saturate x86 kernels without VNNI (:mod:`pqd.measurement.saturation`), bytes on
disk, latency p50/p90 per batch size (interleaved with the other artifacts),
and params / nonzero params / sparsity / MACs / BitOps read from the file.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch.nn as nn

from pqd.measurement.complexity import onnx_complexity
from pqd.measurement.latency import compare_latency
from pqd.measurement.parity import parity, torch_predict
from pqd.measurement.runtime import (
    float_islands,
    open_runner,
    openvino_ir_paths,
    ort_kernels,
    ort_optimized,
    runtime_versions,
    static_batch,
)
from pqd.measurement.saturation import saturation
from pqd.progress import bar
from pqd.recipe import MeasureSpec
from pqd.stats import wilson_interval

if TYPE_CHECKING:
    from pqd.dataset import Dataset


def size_bytes(path: Path) -> int:
    """Bytes on disk of an ONNX file plus its external-data side file, if any."""
    side = path.with_name(path.name + ".data")
    return path.stat().st_size + (side.stat().st_size if side.exists() else 0)


def repeats_for(batch: int, repeats: int) -> int:
    """Timed calls at ``batch``: ``repeats`` at batch 1, fewer for large batches (>= 20)."""
    return max(20, round(repeats / math.sqrt(batch)))


def warmup_for(batch: int, warmup: int) -> int:
    """Untimed warm-up calls at ``batch``: ``warmup`` at batch 1, scaled like
    :func:`repeats_for` for large batches (at least 5, never more than asked)."""
    return min(warmup, max(5, round(warmup / math.sqrt(batch))))


def runtime_logits(run, x_uint8, batch_size: int, desc: str, progress: bool) -> np.ndarray:
    """Logits of an artifact runner over uint8 images (fed as float32 in [0, 1])."""
    outs = []
    steps = range(0, len(x_uint8), batch_size)
    for i in bar(steps, desc=desc, unit="batch", show=progress, leave=False):
        x = x_uint8[i : i + batch_size].float().div_(255.0).numpy()
        outs.append(np.asarray(run(x), dtype=np.float32))
    return np.concatenate(outs)


def torch_reference(model: nn.Module, data: Dataset, parity_samples: int | None) -> np.ndarray:
    """Logits of the exported torch model on the first ``parity_samples`` test images."""
    x = data.test_x
    n_par = len(x) if parity_samples is None else min(parity_samples, len(x))
    return torch_predict(model, x[:n_par])


def measure_artifacts(
    artifacts: dict[str, tuple[Path, nn.Module]],
    data: Dataset,
    spec: MeasureSpec,
    parity_samples: int | None = None,
    *,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Results per artifact name; the first runtime in ``spec.runtimes`` is the headline."""
    references = {
        name: torch_reference(model, data, parity_samples) for name, (_, model) in artifacts.items()
    }
    return measure_onnx(
        {name: path for name, (path, _) in artifacts.items()},
        references,
        data,
        spec,
        progress=progress,
    )


def measure_onnx(
    artifacts: dict[str, Path],
    references: dict[str, np.ndarray],
    data: Dataset,
    spec: MeasureSpec,
    *,
    progress: bool = True,
    logits_out: dict[str, np.ndarray] | None = None,
) -> dict[str, dict[str, Any]]:
    """Like :func:`measure_artifacts`, with the torch models' logits given (``references``:
    logits on the first N test images, from :func:`torch_reference`; an artifact without one
    gets no parity), so that the artifacts
    can be measured in another process than the one that exported them. ``logits_out``, if
    given, receives each artifact's test-split logits on the primary runtime (for the audit,
    :mod:`pqd.measurement.audit`, without running the test split again)."""
    x, y = data.test_x, data.test_y.numpy()
    shape = tuple(int(d) for d in x.shape[1:])
    versions = runtime_versions()
    results: dict[str, dict[str, Any]] = {}
    reference = {}
    for name, path in artifacts.items():
        results[name] = _file_record(path)
        if name not in references:  # no torch model to compare with: no parity
            continue
        reference[name] = np.asarray(references[name], dtype=np.float32)
        n_par = len(reference[name])
        results[name]["torch_accuracy"] = float((reference[name].argmax(1) == y[:n_par]).mean())
    for rt in spec.runtimes:
        runners = {name: open_runner(rt, path, spec.threads) for name, path in artifacts.items()}
        for name, runner in runners.items():
            logits = runtime_logits(
                runner.run, x, spec.accuracy_batch_size, f"{name} accuracy ({rt})", progress
            )
            if logits_out is not None and rt == spec.runtimes[0]:
                logits_out[name] = logits
            results[name]["runtimes"][rt] = _runtime_accuracy(
                rt,
                runner.settings,
                versions.get(rt),
                logits,
                y,
                reference.get(name),
                artifacts[name],
            )
        _time_batches(rt, runners, artifacts, spec, shape, results, progress)
    for name, res in results.items():
        _headline(res, artifacts[name], spec.runtimes[0], len(y))
    return results


def _file_record(path: Path) -> dict[str, Any]:
    """What an ONNX artifact's file tells: bytes on disk, params, nonzero params, sparsity,
    MACs, BitOps, the per-layer table and the saturating weight pairs, with ``runtimes``
    still empty.

    Args:
        path: the ONNX file.

    Returns:
        The artifact's record so far.
    """
    comp = onnx_complexity(path)
    return {
        "artifact": path.name,
        "size_bytes": size_bytes(path),
        **{k: comp[k] for k in ("params", "nonzero_params", "sparsity", "macs", "bitops")},
        "layers": comp["layers"],
        "saturation": saturation(path),
        "runtimes": {},
    }


def _runtime_accuracy(
    rt: str,
    settings: dict[str, Any],
    version: str | None,
    logits: np.ndarray,
    y: np.ndarray,
    reference: np.ndarray | None,
    path: Path,
) -> dict[str, Any]:
    """One runtime's record of an artifact before timing: accuracy (with its Wilson
    interval), parity with the torch ``reference`` logits, and on onnxruntime the kernels
    that run."""
    correct = int((logits.argmax(1) == y).sum())
    out: dict[str, Any] = {
        "version": version,
        "settings": settings,
        "accuracy": correct / len(y),
        "accuracy_ci": [round(v, 6) for v in wilson_interval(correct, len(y))],
    }
    if reference is not None:
        out["parity"] = parity(reference, logits[: len(reference)])
    if rt == "onnxruntime":  # which kernels run: fused INT8 ops or float ones
        optimized = ort_optimized(path)
        out["kernels"] = ort_kernels("", proto=optimized)
        out.update(float_islands(optimized))
    return out


def _time_batches(
    rt: str,
    runners: dict[str, Any],
    artifacts: dict[str, Path],
    spec: MeasureSpec,
    shape: tuple[int, ...],
    results: dict[str, dict[str, Any]],
    progress: bool,
) -> None:
    """Latency of every artifact on runtime ``rt`` at each batch size (interleaved), into
    ``results[name]["runtimes"][rt]["latency_ms"]``; the batch-1 figures also at its top."""
    for b in spec.batch_sizes:
        warmup = warmup_for(b, spec.warmup)
        timed = (
            runners
            if not static_batch(rt)
            else {
                name: open_runner(rt, path, spec.threads, batch=b)
                for name, path in artifacts.items()
            }
        )
        stats = compare_latency(
            {name: r.run for name, r in timed.items()},
            (b, *shape),
            warmup=warmup,
            repeats=repeats_for(b, spec.repeats),
            progress=progress,
            desc=f"latency batch {b} ({rt})",
        )
        for name, st in stats.items():
            lat = results[name]["runtimes"][rt].setdefault(
                "latency_ms", {"runtime": rt, "threads": spec.threads, "batches": {}}
            )
            lat["batches"][str(b)] = {**st.as_dict(), "warmup": warmup}
            if b == 1:
                lat.update(
                    {
                        "batch": 1,
                        "p50": round(st.p50, 4),
                        "p90": round(st.p90, 4),
                        "mean": round(st.mean, 4),
                        "p99": round(st.p99, 4),
                        "max": round(st.max, 4),
                    }
                )


def _headline(res: dict[str, Any], path: Path, primary: str, test_images: int) -> None:
    """Complete an artifact's record: whether its OpenVINO IR is kept, the fastest runtime per
    batch size, and the primary runtime's accuracy, latency and parity at the top."""
    shipped = res["runtimes"]
    if "openvino-ir" in shipped:
        res["openvino_ir"] = keep_ir_if_faster(path, shipped)
        if not res["openvino_ir"]["kept"]:  # deleted: not a way to deploy it
            shipped = {rt: r for rt, r in shipped.items() if rt != "openvino-ir"}
    res["fastest"] = fastest_runtimes(shipped)
    head = res["runtimes"][primary]
    res["accuracy"] = head["accuracy"]
    res["accuracy_ci"] = head["accuracy_ci"]
    res["test_images"] = test_images
    res["latency_ms"] = head["latency_ms"]
    if "parity" in head:
        res["parity"] = head["parity"]
    res["runtime"] = primary


def keep_ir_if_faster(
    onnx_path: Path, runtimes: dict[str, dict[str, Any]], noise: float = 0.05
) -> dict[str, Any]:
    """Keep the OpenVINO IR (``.xml``/``.bin`` beside ``onnx_path``) only where it runs faster.

    OpenVINO compiles the IR and the ONNX file it came from to the same runtime graph, so
    they usually time the same; the IR files are kept when their p50 is more than ``noise``
    below the ONNX file's at some measured batch size (both on OpenVINO, same settings),
    and deleted otherwise (the ``openvino-ir`` timings stay in the record).

    Args:
        onnx_path: the ONNX artifact the IR was converted from.
        runtimes: the artifact's ``runtimes`` record with ``openvino`` and ``openvino-ir``.
        noise: relative p50 difference (fraction) below which the two count as equal.

    Returns:
        ``{"kept": bool, "files": [...], "size_bytes", "p50_ratio": {batch: ir / onnx}}``.
    """
    xml, binary = openvino_ir_paths(onnx_path)
    ir_b = runtimes["openvino-ir"].get("latency_ms", {}).get("batches", {})
    onnx_b = runtimes.get("openvino", {}).get("latency_ms", {}).get("batches", {})
    ratio = {b: ir_b[b]["p50"] / onnx_b[b]["p50"] for b in ir_b if b in onnx_b}
    # without an ONNX timing to beat, the IR is what was asked for: keep it
    kept = not ratio or any(r < 1 - noise for r in ratio.values())
    size = sum(f.stat().st_size for f in (xml, binary) if f.exists())
    if not kept:
        for f in (xml, binary):
            f.unlink(missing_ok=True)
    return {
        "kept": kept,
        "files": [xml.name, binary.name] if kept else [],
        "size_bytes": size,
        "p50_ratio": {b: round(r, 4) for b, r in ratio.items()},
        "noise": noise,
    }


def fastest_runtimes(runtimes: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The runtime with the lowest p50 at each measured batch size, and how it was set up.

    Args:
        runtimes: one artifact's ``runtimes`` record (per runtime: ``latency_ms.batches``
            with p50 in ms, and the ``settings`` it was opened with).

    Returns:
        ``{batch: {"runtime", "p50_ms", "settings", "others_p50_ms": {runtime: p50}}}``
        (batch as text, as in the record).
    """
    out: dict[str, dict[str, Any]] = {}
    batches = {b for r in runtimes.values() for b in r.get("latency_ms", {}).get("batches", {})}
    for b in sorted(batches, key=int):
        p50 = {
            rt: r["latency_ms"]["batches"][b]["p50"]
            for rt, r in runtimes.items()
            if b in r.get("latency_ms", {}).get("batches", {})
        }
        best = min(p50, key=lambda rt: p50[rt])
        out[b] = {
            "runtime": best,
            "p50_ms": p50[best],
            "settings": runtimes[best].get("settings", {}),
            "others_p50_ms": {rt: v for rt, v in p50.items() if rt != best},
        }
    return out
