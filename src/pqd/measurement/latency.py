"""Wall-clock latency, measured like timm's benchmark but side by side.

Several artifacts are timed in interleaved rounds (A, B, A, B, ...) after a
warm-up, so slow drift of a shared machine hits them alike; each sample is one
``run`` call timed with ``perf_counter``; p50/p90/p99/max/mean come from all samples
(the tail, p99 and max, is what a worst-case budget has to meet).

After each artifact's block the loop idles ``switch_pause_ms`` (untimed). onnxruntime's
intra-op workers keep spinning for tens of ms after a session's last call and take a core
from whatever runs next: without the pause the first calls of the next block ran 1.8-3.6x
slower here (ResNet-18 INT8 onnxruntime p90 5.9 ms instead of 2.3 ms; p50s barely moved).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

import numpy as np

from pqd.progress import bar as progress_bar

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11


@dataclass
class LatencyStats:
    """Latency of one artifact at one batch size, in milliseconds."""

    batch: int
    p50: float
    p90: float
    mean: float
    min: float
    samples: int
    p99: float = float("nan")
    max: float = float("nan")

    def as_dict(self) -> dict[str, float | int]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def compare_latency(
    runs: dict[str, Callable[[np.ndarray], object]],
    input_shape: tuple[int, ...],
    *,
    warmup: int = 50,
    repeats: int = 300,
    rounds: int = 5,
    switch_pause_ms: float = 100.0,
    seed: int = 0,
    progress: bool = True,
    desc: str = "latency",
) -> dict[str, LatencyStats]:
    """Time every ``runs[name](x)`` on one random float32 input of ``input_shape``.

    Each artifact gets ``warmup`` untimed calls, then ``repeats`` timed calls
    split over ``rounds`` interleaved rounds, with ``switch_pause_ms`` of idle time after
    every block (see module doc).
    """
    x = np.random.default_rng(seed).random(input_shape, dtype=np.float32)
    per_round = [repeats // rounds + (1 if r < repeats % rounds else 0) for r in range(rounds)]
    samples = interleaved_ms(
        runs,
        [x] * warmup,
        [[x] * count for count in per_round],
        switch_pause_ms=switch_pause_ms,
        progress=progress,
        desc=desc,
    )
    out = {}
    for name, ms in samples.items():
        out[name] = LatencyStats(
            batch=input_shape[0],
            p50=float(np.percentile(ms, 50)),
            p90=float(np.percentile(ms, 90)),
            mean=float(ms.mean()),
            min=float(ms.min()),
            samples=len(ms),
            p99=float(np.percentile(ms, 99)),
            max=float(ms.max()),
        )
    return out


def interleaved_ms(
    runs: dict[str, Callable[[np.ndarray], object]],
    warm: Sequence[np.ndarray],
    rounds: Sequence[Sequence[np.ndarray]],
    *,
    switch_pause_ms: float = 100.0,
    progress: bool = True,
    desc: str = "latency",
) -> dict[str, np.ndarray]:
    """The side-by-side timer under :func:`compare_latency`, on given inputs.

    Args:
        runs: the callables to time, by name.
        warm: inputs each run is called on, untimed, before any timing.
        rounds: the timed rounds; in each, every run in turn is timed on every input of
            the round, one call per sample, then the loop idles ``switch_pause_ms``
            (untimed; only when there are several runs, see module doc).
        switch_pause_ms: idle time after each run's block.
        progress: show a progress bar.
        desc: the progress bar's label.

    Returns:
        Every sample of each run in milliseconds, in the order taken.
    """
    for run in runs.values():
        for x in warm:
            run(x)
    samples: dict[str, list[float]] = {name: [] for name in runs}
    total = sum(len(inputs) for inputs in rounds) * len(runs)
    bar = progress_bar(total=total, desc=desc, unit="run", show=progress, leave=False)
    for inputs in rounds:
        for name, run in runs.items():
            times = samples[name]
            for x in inputs:
                t0 = time.perf_counter()
                run(x)
                times.append(time.perf_counter() - t0)
            bar.update(len(inputs))
            if switch_pause_ms > 0 and len(runs) > 1:
                time.sleep(switch_pause_ms / 1e3)
    bar.close()
    return {name: np.asarray(s) * 1e3 for name, s in samples.items()}


class Timing(TypedDict, total=False):
    """:func:`compare_latency`'s protocol settings, for the functions that hand them on."""

    warmup: int
    repeats: int
    rounds: int
    switch_pause_ms: float
    progress: bool
    desc: str


def time_files(
    paths: dict[str, Path],
    runtime: str,
    threads: int,
    shape: tuple[int, ...] | None = None,
    *,
    spinning: bool = True,
    **timing: Unpack[Timing],
) -> dict[str, LatencyStats]:
    """Files timed side by side, the one way pqd times files: a runner per file on
    ``runtime`` with ``threads`` (a static batch where the runtime compiles one), every file
    fed the same random input, in interleaved rounds (:func:`compare_latency`).

    Args:
        paths: name -> ONNX file (all taking inputs of ``shape``).
        runtime: ``onnxruntime``, ``openvino`` or ``openvino-ir``.
        threads: intra-op threads.
        shape: the input's shape, batch first; default the first file's input at batch 1.
        spinning: onnxruntime's intra-op workers busy-wait between calls (its default, as
            a deployed session runs); False for panels of many files, where the workers of
            the files not being timed would otherwise compete for the cores.
        **timing: :func:`compare_latency`'s protocol (its defaults; no progress bar unless
            ``progress=True``).

    Returns:
        name -> :class:`LatencyStats` (ms).
    """
    from pqd.measurement.runtime import open_runner, static_batch

    if not paths:
        return {}
    shape = shape or input_shape(next(iter(paths.values())))
    batch = shape[0] if static_batch(runtime) else None
    runners = {
        name: open_runner(runtime, p, threads, batch=batch, spinning=spinning).run
        for name, p in paths.items()
    }
    return compare_latency(runners, shape, **{"progress": False, **timing})


def input_shape(path: Path, batch: int = 1) -> tuple[int, ...]:
    """The shape of an ONNX file's first input at ``batch``."""
    import onnx

    dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    return (batch, *(int(d.dim_value) for d in dims[1:]))


def graph_signature(path: Path) -> str:
    """A digest of an ONNX file's graph without the values of its weights: the nodes (types,
    attributes, wiring), the opsets, every tensor's name, type and shape, and the values of
    the INT64 tensors (shapes, axes, pads, slice bounds: they shape the computation). Files
    with the same signature normally run the same kernels on the same shapes (an
    unstructured-sparse INT8 file and a dense one share it), so their latencies should
    differ by timing noise only."""
    import hashlib

    import onnx

    proto = onnx.load(str(path), load_external_data=False)

    def strip(t: onnx.TensorProto) -> None:
        if t.data_type != onnx.TensorProto.INT64:
            for name in ("raw_data", "float_data", "int32_data", "int64_data", "double_data",
                         "uint64_data", "string_data"):  # fmt: skip
                t.ClearField(name)

    def walk(graph: onnx.GraphProto) -> None:
        for t in graph.initializer:
            strip(t)
        for sp in graph.sparse_initializer:
            strip(sp.values)
            strip(sp.indices)
        kinds = onnx.AttributeProto
        for node in graph.node:
            for a in node.attribute:
                tensors = {
                    kinds.TENSOR: [a.t],
                    kinds.TENSORS: list(a.tensors),
                    kinds.SPARSE_TENSOR: [a.sparse_tensor.values, a.sparse_tensor.indices],
                }.get(a.type, [])
                for t in tensors:
                    strip(t)
                for g in {kinds.GRAPH: [a.g], kinds.GRAPHS: list(a.graphs)}.get(a.type, []):
                    walk(g)

    walk(proto.graph)
    digest = hashlib.sha256(proto.graph.SerializeToString(deterministic=True))
    for op in proto.opset_import:
        digest.update(op.SerializeToString(deterministic=True))
    return digest.hexdigest()[:16]


def identical_graph_spread(
    p50_ms: dict[str, float], signatures: dict[str, str]
) -> dict[str, float | int | list[str]] | None:
    """How far the p50s of results with the same graph (:func:`graph_signature`) lie apart
    in one panel: its noise floor, below which a latency difference means nothing.

    Args:
        p50_ms: name -> p50 (ms), timed side by side (files, or means of files over seeds).
        signatures: name -> graph signature.

    Returns:
        ``{"spread": the largest (max - min) / max p50 within one graph (fraction), "names":
        the two results of that graph farthest apart, "graphs": graphs with two or more
        timed results, "count": the results in them}``, or None when no graph has two
        (a p50 that is not positive is left out).
    """
    by_graph: dict[str, list[str]] = {}
    for name, p50 in p50_ms.items():
        if p50 > 0:
            by_graph.setdefault(signatures[name], []).append(name)
    shared = [
        sorted(names, key=p50_ms.__getitem__) for names in by_graph.values() if len(names) > 1
    ]
    if not shared:
        return None

    def spread(ns: list[str]) -> float:  # as a pair's relative difference is computed
        return (p50_ms[ns[-1]] - p50_ms[ns[0]]) / p50_ms[ns[-1]]

    widest = max(shared, key=spread)
    return {
        "spread": spread(widest),  # unrounded: a bound that decisions compare against
        "names": [widest[0], widest[-1]],
        "graphs": len(shared),
        "count": sum(len(ns) for ns in shared),
    }
