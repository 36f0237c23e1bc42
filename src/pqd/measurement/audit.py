"""What compression costs beyond top-1, measured on the deployed ONNX files.

For each artifact (``baseline`` FP32 and ``final``) on the primary runtime, ``audit`` holds:

- ``per_class_accuracy`` (test top-1 per class, by class name) and ``worst_class``;
- ``calibration``: expected calibration error (15 equal-width confidence bins, top-1 softmax
  probability), negative log-likelihood (nats per image) and Brier score (sum over classes of
  the squared error of the softmax, mean over images), with the reliability diagram's bins;
- ``latency_ms_b1``: batch-1 p50 / p90 / p99 / max (ms);
- ``weight_bytes``: bytes of the file's initializers (weights, biases, quantization params);
- with ``full`` (``measure.audit: true`` or ``pqd audit``): ``corruptions`` (top-1 per
  corruption and severity of :mod:`pqd.measurement.corruptions`, and the mean), ``memory`` (peak
  resident memory of a fresh process that loads the file and runs every measured batch size)
  and ``energy`` (RAPL joules per inference where readable, else ``null`` with the reason,
  and CPU-seconds per inference over a timed window as the measured proxy).

``final.audit.vs_baseline`` compares the two: per-class drop (points), the largest one, the
disagreement set (test images whose top-1 differs between the two files, how many of them
the baseline had right, by true class), and the corruption errors of final relative to
baseline (Hendrycks & Dietterich's CE and relative CE). With early exits, ``final.audit``
also has ``exit_calibration`` (measured by :func:`pqd.exits.measure.exit_calibration`): the
same calibration of every exit head's confidence (the one that decides the exit) against
that head's correctness.

    from pqd.pipeline import audit_run
    record = audit_run("runs/quick")   # pqd audit runs/quick
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pqd.measurement.corruptions import CORRUPTIONS, SEVERITIES, corrupted_set

if TYPE_CHECKING:
    from pqd.dataset import Dataset

ECE_BINS = 15
PROBE_WINDOW_S = 2.0  # seconds of timed calls per artifact in the memory/energy probe
ARTIFACTS = ("baseline", "final")


# ---------------------------------------------------------------- accuracy per class, calibration
def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def per_class_accuracy(pred: np.ndarray, y: np.ndarray, classes: list[str]) -> dict[str, float]:
    """Top-1 accuracy per true class (fraction of that class's test images), by class name;
    a class without test images is left out."""
    out = {}
    for k, name in enumerate(classes):
        mask = y == k
        if mask.any():
            out[name] = float((pred[mask] == k).mean())
    return out


def reliability(
    confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS
) -> dict[str, Any]:
    """Expected calibration error of ``confidence`` against ``correct`` over ``bins``
    equal-width bins (``lower < conf <= upper``; a confidence of 0 goes to the first bin),
    with each bin's count, mean confidence and accuracy (``None`` for an empty bin)."""
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    counts, confs, accs, ece = [], [], [], 0.0
    n = len(conf)
    for b in range(bins):
        m = idx == b
        c = int(m.sum())
        counts.append(c)
        if c:
            mc, ma = float(conf[m].mean()), float(ok[m].mean())
            ece += c / n * abs(ma - mc)
            confs.append(mc)
            accs.append(ma)
        else:
            confs.append(None)
            accs.append(None)
    return {
        "bins": bins,
        "ece": float(ece),
        "bin_count": counts,
        "bin_confidence": confs,
        "bin_accuracy": accs,
    }


def calibration(logits: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> dict[str, Any]:
    """ECE (``bins`` bins of the top-1 softmax probability), NLL (mean nats per image) and
    Brier score (mean over images of the summed squared error of the softmax against the
    one-hot label) of ``logits`` [N, classes] for labels ``y`` [N]."""
    p = softmax(logits)
    n = len(y)
    onehot = np.zeros_like(p)
    onehot[np.arange(n), y] = 1.0
    nll = -np.log(np.clip(p[np.arange(n), y], 1e-300, None)).mean()
    brier = ((p - onehot) ** 2).sum(axis=1).mean()
    rel = reliability(p.max(axis=1), p.argmax(axis=1) == y, bins)
    return {"ece": rel.pop("ece"), "nll": float(nll), "brier": float(brier), **rel}


def disagreement(
    pred_base: np.ndarray, pred_final: np.ndarray, y: np.ndarray, classes: list[str]
) -> dict[str, Any]:
    """The test images whose top-1 differs between baseline and final: how many, the
    fraction, how many of them the baseline had right (and final now gets wrong), how many
    final fixed, and the count per true class (class names)."""
    diff = pred_base != pred_final
    right_before = diff & (pred_base == y)
    fixed = diff & (pred_final == y)
    by_class = {name: int(diff[y == k].sum()) for k, name in enumerate(classes) if (y == k).any()}
    return {
        "count": int(diff.sum()),
        "fraction": float(diff.mean()),
        "right_before": int(right_before.sum()),
        "fixed": int(fixed.sum()),
        "images": len(y),
        "by_class": by_class,
    }


def class_damage(base: dict[str, float], final: dict[str, float]) -> dict[str, Any]:
    """Per-class drop in points (baseline minus final) and the largest one."""
    drops = {k: round(100 * (base[k] - final[k]), 4) for k in base if k in final}
    worst = max(drops, key=lambda k: drops[k]) if drops else None
    return {
        "per_class_drop_points": drops,
        "largest_class_drop": (
            {"class": worst, "points": drops[worst]} if worst is not None else None
        ),
    }


def _worst(per_class: dict[str, float]) -> dict[str, Any] | None:
    if not per_class:
        return None
    k = min(per_class, key=lambda c: per_class[c])
    return {"class": k, "accuracy": per_class[k]}


# ---------------------------------------------------------------- corruptions
def corruption_accuracy(
    run: Any,
    images: np.ndarray,
    y: np.ndarray,
    *,
    seed: int = 0,
    names: list[str] | None = None,
    severities: tuple[int, ...] = SEVERITIES,
    batch_size: int = 256,
    cache: Path | None = None,
    progress: bool = False,
    desc: str = "corruptions",
) -> dict[str, Any]:
    """Top-1 of ``run`` (float32 NCHW in [0, 1] -> logits) on every corrupted copy of
    ``images`` (uint8 NCHW); ``accuracy[name]`` lists severities 1..5, ``mean_accuracy``
    averages all of them."""
    from pqd.progress import bar as progress_bar

    names = list(names or CORRUPTIONS)
    acc: dict[str, list[float]] = {}
    bar = progress_bar(total=len(names) * len(severities), desc=desc, show=progress, leave=False)
    for name in names:
        acc[name] = []
        for s in severities:
            xs = corrupted_set(images, name, s, seed, cache)
            pred = np.concatenate(
                [
                    np.asarray(run(xs[i : i + batch_size].astype(np.float32) / 255.0)).argmax(1)
                    for i in range(0, len(xs), batch_size)
                ]
            )
            acc[name].append(float((pred == y).mean()))
            bar.update(1)
    bar.close()
    flat = [a for v in acc.values() for a in v]
    return {
        "seed": seed,
        "severities": list(severities),
        "images": len(y),
        "accuracy": acc,
        "mean_accuracy": float(np.mean(flat)) if flat else None,
    }


def corruption_errors(
    base: dict[str, Any], final: dict[str, Any], clean_base: float, clean_final: float
) -> dict[str, Any]:
    """Final vs baseline corruption error per corruption: ``ce`` = sum of final's top-1
    errors over severities / the baseline's (Hendrycks & Dietterich's CE with the baseline
    as the reference model), ``relative_ce`` = the same over the errors added to each
    model's clean error (``None`` when the baseline loses nothing); means over corruptions."""
    ce, rel = {}, {}
    for name, fin in final["accuracy"].items():
        b = base["accuracy"].get(name)
        if b is None:
            continue
        eb = sum(1 - a for a in b)
        ef = sum(1 - a for a in fin)
        ce[name] = ef / eb if eb > 0 else None
        db = sum((1 - a) - (1 - clean_base) for a in b)
        df = sum((1 - a) - (1 - clean_final) for a in fin)
        rel[name] = df / db if db > 0 else None
    ok_ce = [v for v in ce.values() if v is not None]
    ok_rel = [v for v in rel.values() if v is not None]
    return {
        "ce": ce,
        "relative_ce": rel,
        "mean_ce": float(np.mean(ok_ce)) if ok_ce else None,
        "mean_relative_ce": float(np.mean(ok_rel)) if ok_rel else None,
        "mean_accuracy_drop_points": round(
            100 * (base["mean_accuracy"] - final["mean_accuracy"]), 4
        ),
    }


# ---------------------------------------------------------------- size, memory, energy
def weight_bytes(path: str | Path) -> int:
    """Bytes of every initializer of the ONNX file (weights in their stored dtype)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    return int(sum(numpy_helper.to_array(t).nbytes for t in proto.graph.initializer))


RAPL_ROOT = Path("/sys/class/powercap")


def rapl_zones(root: Path = RAPL_ROOT) -> tuple[dict[str, Path], str | None]:
    """The readable RAPL package zones (``intel-rapl:N/energy_uj``), or ``{}`` and why not."""
    if not root.is_dir():
        return {}, (
            f"{root} does not exist (no powercap driver: a virtual machine, a "
            "container without it, or a CPU without RAPL)"
        )
    zones = sorted(p for p in root.glob("intel-rapl:*") if p.name.count(":") == 1)
    if not zones:
        return {}, f"{root} has no intel-rapl package zones"
    found, why = {}, None
    for z in zones:
        f = z / "energy_uj"
        try:
            int(f.read_text())
            found[z.name] = f
        except (OSError, ValueError) as exc:
            why = (
                f"{f} is not readable ({type(exc).__name__}: {exc}); since Linux 5.10 "
                "energy_uj is root-only: run as root or chmod it"
            )
    return (found, None) if found else ({}, why)


_PROBE = r"""
import importlib.util, json, os, resource, sys, time
import numpy as np
spec = importlib.util.spec_from_file_location("pqd_runtime_probe", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = mod  # dataclasses look their module up there
spec.loader.exec_module(mod)
path, rt, threads = sys.argv[2], sys.argv[3], int(sys.argv[4])
batches, shape = json.loads(sys.argv[5]), json.loads(sys.argv[6])
window, rapl = float(sys.argv[7]), json.loads(sys.argv[8])
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return None
def peak():  # VmHWM: this process image's own high-water mark (ru_maxrss keeps the parent's)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
def energy():
    out = 0
    for f in rapl.values():
        out += int(open(f).read())
    return out
if rt == "onnxruntime":
    import onnxruntime
else:
    mod.import_openvino()
out = {"rss_after_import_bytes": rss(), "peak_after_import_bytes": peak()}
runner = mod.open_runner(rt, path, threads)
out["rss_after_load_bytes"] = rss()
rng = np.random.default_rng(0)
xs = {b: rng.random((b, *shape), dtype=np.float32) for b in batches}
for b in batches:
    for _ in range(5):
        runner.run(xs[b])
out["peak_rss_bytes"] = peak()
out["rss_after_runs_bytes"] = rss()
per = {}
for b in batches:
    for _ in range(5):
        runner.run(xs[b])
    e0 = energy() if rapl else None
    c0, t0, n = time.process_time(), time.perf_counter(), 0
    while time.perf_counter() - t0 < window / len(batches):
        runner.run(xs[b]); n += 1
    c1, t1 = time.process_time(), time.perf_counter()
    e1 = energy() if rapl else None
    per[str(b)] = {"calls": n, "images": n * b, "window_s": round(t1 - t0, 4),
                   "cpu_s": round(c1 - c0, 6), "energy_uj": (e1 - e0) if rapl else None}
out["windows"] = per
print("PQD_PROBE " + json.dumps(out))
"""


def process_probe(
    path: str | Path,
    runtime: str,
    threads: int,
    batches: list[int],
    shape: tuple[int, ...],
    window_s: float = 2.0,
    timeout: float = 600,
) -> dict[str, Any]:
    """Peak memory and CPU time / energy of a fresh process that loads ``path`` on
    ``runtime`` and runs it at every batch size in ``batches``.

    The child imports only the runtime and :mod:`pqd.measurement.runtime` (no torch), so its
    peak resident memory (``VmHWM`` of /proc/self/status: heap, the runtime's arenas, mapped
    libraries; not ``ru_maxrss``, which a child inherits from its parent) is what a
    deployment process costs; ``artifact_bytes`` = peak minus the memory right after
    importing the runtime. Then, per batch size, it runs back to back for
    ``window_s / len(batches)`` s and reports process CPU time (all threads; onnxruntime's
    spinning workers included) and the RAPL package energy over that window where readable.

    Args:
        path: the ONNX file.
        runtime: ``onnxruntime`` or ``openvino``.
        threads: intra-op threads, as measured.
        batches: batch sizes (images per call).
        shape: one image's shape, e.g. ``(3, 32, 32)``.
        window_s: seconds of timed calls in all (split over the batch sizes).
        timeout: seconds before the child is killed.

    Returns:
        ``{"memory": {...}, "energy": {...}}`` for the record (bytes, seconds, joules).
    """
    from pqd.measurement import runtime as runtime_module

    zones, reason = rapl_zones()
    cmd = [
        sys.executable,
        "-c",
        _PROBE,
        runtime_module.__file__,
        str(path),
        runtime,
        str(threads),
        json.dumps(list(batches)),
        json.dumps(list(shape)),
        str(window_s),
        json.dumps({k: str(v) for k, v in zones.items()}),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PQD_PROBE ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the memory/energy probe of {path} failed: {tail}")
    raw = json.loads(lines[-1].removeprefix("PQD_PROBE "))
    memory = {
        "peak_rss_bytes": raw["peak_rss_bytes"],
        "rss_after_import_bytes": raw["rss_after_import_bytes"],
        "artifact_bytes": raw["peak_rss_bytes"] - raw["peak_after_import_bytes"],
        "batches": list(batches),
        "runtime": runtime,
        "threads": threads,
        "how": "VmHWM (peak resident set) of a fresh process: runtime imported, file loaded, "
        "5 calls per batch size; artifact_bytes = peak minus the peak right after the "
        "import (the file, the session and its arenas)",
    }
    windows = {}
    for b, w in raw["windows"].items():
        calls, images = max(w["calls"], 1), max(w["images"], 1)
        joules = None if w["energy_uj"] is None else w["energy_uj"] / 1e6
        windows[b] = {
            **{k: w[k] for k in ("calls", "images", "window_s", "cpu_s")},
            "cpu_s_per_call": w["cpu_s"] / calls,
            "cpu_s_per_image": w["cpu_s"] / images,
            "wall_s_per_call": w["window_s"] / calls,
            "joules_per_call": None if joules is None else joules / calls,
            "joules_per_image": None if joules is None else joules / images,
        }
    one = windows.get("1") or next(iter(windows.values()))
    energy = {
        "joules_per_inference": one["joules_per_call"],
        "rapl": {
            "readable": bool(zones),
            "zones": sorted(zones),
            "reason": reason,
            "note": "RAPL counts the whole CPU package (other processes too)",
        },
        "cpu_s_per_inference": one["cpu_s_per_call"],
        "proxy": "cpu_s_per_inference: process CPU time (all threads) over the timed "
        "window / calls at batch 1 -- a measured proxy for energy, not joules",
        "batches": windows,
        "runtime": runtime,
        "threads": threads,
    }
    return {"memory": memory, "energy": energy}


# ---------------------------------------------------------------- putting it together
def latency_tail(latency_ms: dict[str, Any]) -> dict[str, Any] | None:
    """Batch-1 p50 / p90 / p99 / max (ms) from a measured ``latency_ms`` entry."""
    b1 = latency_ms.get("batches", {}).get("1")
    if not b1 or "p99" not in b1:
        return None
    return {k: b1[k] for k in ("p50", "p90", "p99", "max", "samples", "source") if k in b1}


def audit_artifacts(
    paths: dict[str, Path],
    logits: dict[str, np.ndarray],
    data: Dataset,
    spec: Any,
    latency: dict[str, dict[str, Any]] | None = None,
    *,
    full: bool = False,
    seed: int = 0,
    exit_calibration: list[dict[str, Any]] | None = None,
    progress: bool = False,
    cache: Path | None = None,
) -> dict[str, dict[str, Any]]:
    """The ``audit`` of each artifact (see the module doc).

    Args:
        paths: ``{"baseline": path, "final": path}`` ONNX files.
        logits: the primary runtime's logits of each file on the whole test split
            (what the accuracy was computed from).
        data: the loaded Dataset.
        spec: the MeasureSpec (runtimes resolved; the first is the primary).
        latency: each artifact's measured ``latency_ms`` (for p99 / max), if any.
        full: also the corruption suite, the memory and the energy probe.
        seed: the corruption suite's seed.
        exit_calibration: the calibration of ``final``'s exit heads, if it has any
            (:func:`pqd.exits.measure.exit_calibration`).
        progress: progress bars.
        cache: the corruption cache folder (``None``: the default).

    Returns:
        ``{name: audit}``; ``final`` holds ``vs_baseline`` when both were audited.
    """
    from pqd.measurement.runtime import open_runner

    y = data.test_y.numpy()
    classes = list(data.classes)
    primary = spec.runtimes[0]
    out: dict[str, dict[str, Any]] = {}
    preds = {}
    for name, path in paths.items():
        lg = np.asarray(logits[name], dtype=np.float32)
        preds[name] = lg.argmax(1)
        pc = per_class_accuracy(preds[name], y, classes)
        a: dict[str, Any] = {
            "runtime": primary,
            "images": len(y),
            "accuracy": float((preds[name] == y).mean()),
            "per_class_accuracy": pc,
            "worst_class": _worst(pc),
            "calibration": calibration(lg, y),
            "weight_bytes": weight_bytes(path),
        }
        tail = latency_tail((latency or {}).get(name, {}))
        if tail is not None:
            a["latency_ms_b1"] = tail
        if full:
            t0 = time.perf_counter()
            runner = open_runner(primary, path, spec.threads)
            a["corruptions"] = corruption_accuracy(
                runner.run,
                data.test_x.numpy(),
                y,
                seed=seed,
                batch_size=spec.accuracy_batch_size,
                cache=cache,
                progress=progress,
                desc=f"{name} corruptions",
            )
            a["corruptions"]["seconds"] = round(time.perf_counter() - t0, 2)
            shape = tuple(int(d) for d in data.test_x.shape[1:])
            a.update(
                process_probe(
                    path,
                    primary,
                    spec.threads,
                    list(spec.batch_sizes),
                    shape,
                    window_s=PROBE_WINDOW_S,
                )
            )
        out[name] = a
    if exit_calibration is not None and "final" in out:
        out["final"]["exit_calibration"] = exit_calibration
    if "baseline" in out and "final" in out:
        b, f = out["baseline"], out["final"]
        vs = {
            **class_damage(b["per_class_accuracy"], f["per_class_accuracy"]),
            "disagreement": disagreement(preds["baseline"], preds["final"], y, classes),
            "ece_change": f["calibration"]["ece"] - b["calibration"]["ece"],
            "nll_change": f["calibration"]["nll"] - b["calibration"]["nll"],
        }
        if "corruptions" in b and "corruptions" in f:
            vs["corruption"] = corruption_errors(
                b["corruptions"], f["corruptions"], b["accuracy"], f["accuracy"]
            )
        f["vs_baseline"] = vs
    return out


def audit_comparison(final_audit: dict[str, Any]) -> dict[str, Any]:
    """Headline audit keys for ``record["comparison"]``."""
    vs = final_audit.get("vs_baseline")
    if not vs:
        return {}
    worst = vs["largest_class_drop"]
    out = {
        "worst_class_drop_points": worst["points"] if worst else None,
        "worst_class_drop_class": worst["class"] if worst else None,
        "disagreement": round(vs["disagreement"]["fraction"], 6),
        "ece_change": round(vs["ece_change"], 6),
    }
    if "corruption" in vs:
        out["corruption_accuracy_drop_points"] = vs["corruption"]["mean_accuracy_drop_points"]
        out["mean_relative_ce"] = vs["corruption"]["mean_relative_ce"]
    return out


def attach(record: dict[str, Any], audits: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Put ``audits`` into a record (``record[name]["audit"]``, headline keys into
    ``record["comparison"]``); returns the record."""
    for name, a in audits.items():
        record[name]["audit"] = a
    if "final" in audits:
        record.setdefault("comparison", {}).update(audit_comparison(audits["final"]))
    return record
