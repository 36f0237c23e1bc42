"""How the latency model measures: the machine fingerprint its cache is keyed by, one-layer
pieces exported as the pipeline ships them, and files timed interleaved on the runtime.

A piece's latency depends on its shape and on the machine and runtime only, so the
fingerprint (CPU model and SIMD flags, runtime and version, threads, precision, opset)
names the cache file that holds every piece measured there.

Every panel (pieces, the whole networks of the fit, the candidates that validate it) opens
its onnxruntime sessions without spinning: a panel holds tens of sessions, and with
onnxruntime's default the workers of the files just timed busy-wait while the next one is
timed, so a file's time depended on the panel around it and a model fitted on one panel
missed files timed in another (benchmarks/latency_model.py).
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from pqd.cache import cache_dir
from pqd.errors import PqdError
from pqd.latency_model.layers import Layer

TABLE_VERSION = 3  # 2: pieces timed in steady-state blocks, as whole files; 3: no spinning


def default_cache_dir() -> Path:
    """:func:`pqd.cache.cache_dir` ``("latency")``: ``$PQD_CACHE_DIR/latency``, else
    ``~/.cache/pqd/latency``."""
    return cache_dir("latency")


def fingerprint(runtime: str, threads: int, precision: str, opset: int = 20) -> dict[str, Any]:
    """What decides a piece's latency besides its shape: the machine and the runtime.

    Args:
        runtime: ``onnxruntime`` or ``openvino``.
        threads: intra-op threads the runtime is pinned to.
        precision: ``int8`` or ``fp32``.
        opset: ONNX opset of the exported pieces.

    Returns:
        CPU model, CPU flags, runtime, runtime version, threads, precision, opset and the
        table format version (JSON-ready).
    """
    from pqd.measurement.env import cpu_flags, cpu_model
    from pqd.measurement.runtime import runtime_versions

    versions = runtime_versions()
    if runtime not in versions:
        raise PqdError(
            f"runtime {runtime!r} is not installed",
            f"use one of {', '.join(versions) or 'onnxruntime'} (pip install {runtime})",
        )
    return {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "runtime": runtime,
        "runtime_version": versions[runtime],
        "threads": threads,
        "precision": precision,
        "opset": opset,
        "table_version": TABLE_VERSION,
    }


def fingerprint_key(fp: dict[str, Any]) -> str:
    """Short hash of a :func:`fingerprint` (the cache file's name)."""
    blob = json.dumps(fp, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


# ---------------------------------------------------------------------------- pieces


def piece_module(layer: Layer, cin: int, cout: int) -> tuple[nn.Module, torch.Tensor]:
    """A one-layer network like ``layer`` at widths ``cin`` -> ``cout`` and its example
    input (batch 2): conv -> BN -> ReLU, or a linear layer."""
    if layer.kind == "linear":
        return nn.Linear(cin, cout), torch.rand(2, cin)
    groups = cin if layer.depthwise else layer.groups
    if layer.depthwise:
        cout = cin
    conv = nn.Conv2d(
        cin,
        cout,
        layer.kernel,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        groups=groups,
        bias=False,
    )
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU()), torch.rand(
        2, cin, layer.height, layer.width
    )


def export_as_shipped(
    model: nn.Module, example: torch.Tensor, path: Path, *, int8: bool, opset: int = 20
) -> Path:
    """Export ``model`` to ``path`` as the pipeline ships it: INT8 (PT2E QAT graph on a copy,
    observers calibrated on random inputs, QDQ export) or FP32."""
    from pqd.onnx_export import export_onnx
    from pqd.quant.calibration import calibrate
    from pqd.quant.prepare import prepare_qat

    m = copy.deepcopy(model).cpu().float()
    example = example.cpu()
    if int8:
        m = prepare_qat(m, example)
        calibrate(m, [(torch.rand(8, *example.shape[1:]), None)], 1, torch.device("cpu"))
    else:
        m.eval()
    export_onnx(m, path, example, quantized=int8, opset=opset)
    return path


def time_files(
    paths: dict[str, Path],
    shapes: dict[str, tuple[int, ...]],
    runtime: str,
    threads: int,
    *,
    warmup: int = 10,
    repeats: int = 50,
    rounds: int = 2,
) -> dict[str, float]:
    """Batch-1 p50 (ms) of every file, timed interleaved in one panel.

    Args:
        paths: name -> ONNX file.
        shapes: name -> input shape (batch 1 first).
        runtime: ``onnxruntime`` or ``openvino``.
        threads: intra-op threads.
        warmup: untimed calls per file.
        repeats: timed calls per file, over ``rounds`` interleaved rounds.
        rounds: interleaved rounds.

    Returns:
        name -> p50 in milliseconds.
    """
    from pqd.measurement.latency import time_files as time_side_by_side

    out: dict[str, float] = {}
    # one panel per input shape (every file of a panel is fed one input)
    by_shape: dict[tuple[int, ...], list[str]] = {}
    for name in paths:
        by_shape.setdefault(tuple(shapes[name]), []).append(name)
    for shape, names in by_shape.items():
        stats = time_side_by_side(
            {n: paths[n] for n in names},
            runtime,
            threads,
            shape,
            warmup=warmup,
            repeats=max(rounds, repeats),
            rounds=rounds,
            switch_pause_ms=20.0,
            spinning=False,
        )
        out.update({n: s.p50 for n, s in stats.items()})
    return out
