"""A latency model of the target CPU, built by measuring exported ONNX pieces.

``pqd plan`` must rank thousands of channel-width candidates against a latency budget
without exporting each one. This module measures instead of counting:

1. **Layers and groups.** Every conv/linear of the network is tied to the channel groups
   of :func:`pqd.prune.channels.channel_groups` that set its output and input widths. A
   candidate is ``{group root: removed fraction}`` (the ``ratios`` of a ``prune_channels``
   stage); each group keeps ``round_keep((1 - r) * C)`` channels, rounded to ``round_to``
   as the stage rounds them, so a candidate's per-layer widths are known without surgery.
2. **Lookup tables.** Layers with the same kind, kernel, stride, padding, dilation, depthwise
   flag and input size form a *family*; for each family the table holds the measured batch-1
   p50 of a one-layer ONNX piece (conv -> BN -> ReLU, or linear) at a grid of input x output
   widths (the ``levels`` keep fractions of the full widths, rounded like the stage). Pieces
   are exported as they ship: INT8 through the PT2E QAT prepare + calibrate + QDQ export path
   (:func:`pqd.quant.prepare.prepare_qat`, :func:`pqd.onnx_export.export_onnx`), or FP32; they are
   timed on the chosen runtime and thread count, interleaved (:func:`compare_latency`).
   Between grid points a layer's time is bilinear in its widths, on a table made monotone
   (running maximum along both width axes), so the prediction never falls when a width grows.
3. **Whole-network overhead.** Pieces timed alone each pay a call and a quantize/dequantize
   at their ends that the whole network does not, and miss what lies between layers (adds,
   pools). Whole networks at uniform widths (every level, dense included) are exported and
   timed; ``predict = overhead_ms + scale * sum(pieces)`` is fitted to them (least squares,
   ``scale >= 0``).
4. **Cache.** Pieces depend on shapes only, so one JSON file per machine fingerprint
   (CPU model and the SIMD flags that decide INT8 speed, runtime and its version, threads,
   precision, opset) holds every piece ever measured there, and the fit per architecture
   (``PQD_CACHE_DIR``, default ``~/.cache/pqd/latency``).

:meth:`LatencyModel.validate` exports random candidates whole and reports the model's
error against their measured p50 (median and worst, relative).

    lm = LatencyModel(build_model("resnet18", 10, mean, std), torch.rand(2, 3, 32, 32))
    lm.build()
    lm.predict({"net.features.1.conv1": 0.5})    # ms, batch 1, p50
    lm.validate(n=20)                            # {"median_error": ..., "worst_error": ...}
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from pqd.errors import PqdError

TABLE_VERSION = 2  # 2: pieces timed in steady-state blocks, as whole files
WHOLE_FILE_TIMING = {"warmup": 50, "rounds": 4, "block": 100}
"""Timing of every latency-model panel, pieces and whole files (:meth:`LatencyModel.time_paths`):
warm-up calls, interleaved rounds and calls per file per round (steady state; short blocks
bias small files against large ones)."""
LEVELS = (0.25, 0.5, 0.75, 1.0)
"""Keep fractions of the lookup grid (and of the planner's candidates), the dense 1.0 last."""
ENV_CACHE_DIR = "PQD_CACHE_DIR"


def default_cache_dir() -> Path:
    """``$PQD_CACHE_DIR``, else ``$XDG_CACHE_HOME/pqd/latency``, else ``~/.cache/pqd/latency``."""
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pqd" / "latency"


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


# ---------------------------------------------------------------------------- layers


@dataclass(frozen=True)
class Layer:
    """One conv/linear of the network and the groups that set its widths."""

    name: str
    kind: str  # conv | linear
    cin: int
    cout: int
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    depthwise: bool = False
    groups: int = 1  # a grouped (not depthwise) conv keeps its group count
    height: int = 1  # input size
    width: int = 1
    in_group: str | None = None  # group root setting the input width (None: fixed)
    out_group: str | None = None

    def family(self) -> str:
        """Layers that share one lookup table: everything but the two widths."""
        if self.kind == "linear":
            return "linear"
        k, s, p, d = self.kernel, self.stride, self.padding, self.dilation
        g = "dw" if self.depthwise else f"g{self.groups}"
        return (
            f"conv:k{k[0]}x{k[1]}:s{s[0]}x{s[1]}:p{p[0]}x{p[1]}:d{d[0]}x{d[1]}:{g}"
            f":{self.height}x{self.width}"
        )


def piece_key(family: str, cin: int, cout: int) -> str:
    """Cache key of one piece: its family and widths."""
    return f"{family}:{cin}->{cout}"


def network_layers(
    model: nn.Module, example: torch.Tensor, exclude: Sequence[str] = ()
) -> tuple[list[Layer], dict[str, int]]:
    """Every conv/linear of an eager ``model`` with its groups, and each group's channels.

    Args:
        model: the unpruned eager network.
        example: an input batch (batch >= 1).
        exclude: fnmatch patterns of modules whose outputs are not pruned (as the stage's).

    Returns:
        ``(layers in forward order, {group root: channel count})``.
    """
    from pqd.prune.channels import _eval, channel_groups

    dg, groups = channel_groups(model, example, exclude)
    names = {m: n for n, m in model.named_modules()}
    out_of: dict[str, str] = {}
    in_of: dict[str, str] = {}
    for root, group in groups.items():
        for dep, _ in group:
            module = dep.target.module
            if not isinstance(module, (nn.Conv2d, nn.Linear)):
                continue
            if dg.is_out_channel_pruning_fn(dep.handler):
                out_of[names[module]] = root
            else:
                in_of[names[module]] = root
    sizes: dict[str, tuple[int, int]] = {}
    order: list[str] = []

    def hook(mod: nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        name = names[mod]
        order.append(name)
        x = inputs[0]
        sizes[name] = (int(x.shape[-2]), int(x.shape[-1])) if x.dim() == 4 else (1, 1)

    hooks = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    try:
        with torch.no_grad(), _eval(model):
            model(example[:1])
    finally:
        for h in hooks:
            h.remove()
    modules = dict(model.named_modules())
    layers = []
    for name in dict.fromkeys(order):
        m = modules[name]
        h, w = sizes[name]
        if isinstance(m, nn.Conv2d):
            depthwise = m.groups > 1 and m.groups == m.in_channels
            layers.append(
                Layer(
                    name,
                    "conv",
                    m.in_channels,
                    m.out_channels,
                    _pair(m.kernel_size),
                    _pair(m.stride),
                    _pair(m.padding),
                    _pair(m.dilation),
                    depthwise,
                    1 if depthwise else m.groups,
                    h,
                    w,
                    in_of.get(name, out_of.get(name) if depthwise else None),
                    out_of.get(name),
                )
            )
        else:
            layers.append(
                Layer(
                    name,
                    "linear",
                    m.in_features,
                    m.out_features,
                    in_group=in_of.get(name),
                    out_group=out_of.get(name),
                )
            )
    return layers, {root: len(g[0].idxs) for root, g in groups.items()}


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[-1]))
    if isinstance(v, str):  # "same"/"valid" padding: kept as a label-free 0
        return (0, 0)
    return (int(v), int(v))


def kept_channels(channels: int, ratio: float, round_to: int | None) -> int:
    """Channels a group of ``channels`` keeps when ``ratio`` of them are removed, rounded
    exactly as the ``prune_channels`` stage rounds them."""
    from pqd.prune.channels import _round_keep

    return _round_keep((1.0 - ratio) * channels, channels, round_to)


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
    from pqd.measurement.latency import compare_latency
    from pqd.measurement.runtime import open_runner

    out: dict[str, float] = {}
    # one panel per input shape (compare_latency feeds one input to every file)
    by_shape: dict[tuple[int, ...], list[str]] = {}
    for name in paths:
        by_shape.setdefault(tuple(shapes[name]), []).append(name)
    for shape, names in by_shape.items():
        runners = {n: open_runner(runtime, paths[n], threads, batch=1).run for n in names}
        stats = compare_latency(
            runners,
            shape,
            warmup=warmup,
            repeats=max(rounds, repeats),
            rounds=rounds,
            switch_pause_ms=20.0,
            progress=False,
        )
        out.update({n: s.p50 for n, s in stats.items()})
    return out


# ---------------------------------------------------------------------------- tables


def monotone(table: np.ndarray) -> np.ndarray:
    """``table`` with a running maximum along both axes (non-decreasing in both widths)."""
    t = np.maximum.accumulate(np.asarray(table, dtype=np.float64), axis=0)
    return np.maximum.accumulate(t, axis=1)


def bilinear(xs: Sequence[int], ys: Sequence[int], table: np.ndarray, x: float, y: float) -> float:
    """Bilinear interpolation of ``table[i, j]`` (at ``xs[i]``, ``ys[j]``, both ascending) at
    (x, y), clamped to the grid's edges. Monotone tables give monotone results."""
    xs_a = np.asarray(xs, dtype=np.float64)
    ys_a = np.asarray(ys, dtype=np.float64)
    x = float(np.clip(x, xs_a[0], xs_a[-1]))
    y = float(np.clip(y, ys_a[0], ys_a[-1]))
    i = int(np.clip(np.searchsorted(xs_a, x, side="right") - 1, 0, max(0, len(xs_a) - 2)))
    j = int(np.clip(np.searchsorted(ys_a, y, side="right") - 1, 0, max(0, len(ys_a) - 2)))
    i1, j1 = min(i + 1, len(xs_a) - 1), min(j + 1, len(ys_a) - 1)
    tx = 0.0 if i1 == i else (x - xs_a[i]) / (xs_a[i1] - xs_a[i])
    ty = 0.0 if j1 == j else (y - ys_a[j]) / (ys_a[j1] - ys_a[j])
    top = table[i, j] * (1 - ty) + table[i, j1] * ty
    bottom = table[i1, j] * (1 - ty) + table[i1, j1] * ty
    return float(top * (1 - tx) + bottom * tx)


def fit_overhead(sums: Sequence[float], measured: Sequence[float]) -> tuple[float, float]:
    """``(overhead_ms, scale)`` with ``measured ~ overhead + scale * sums`` (least squares,
    ``scale >= 0``; one point: scale 1)."""
    s = np.asarray(sums, dtype=np.float64)
    m = np.asarray(measured, dtype=np.float64)
    if len(s) >= 2 and np.ptp(s) > 0:
        scale, overhead = np.polyfit(s, m, 1)
        if scale > 0:
            return float(overhead), float(scale)
    return float(np.mean(m - s)), 1.0


# ---------------------------------------------------------------------------- the model


Ratios = dict[str, float]
"""A candidate: removed fraction per channel group root (missing groups: 0)."""


class LatencyModel:
    """Predicts a candidate's batch-1 p50 (ms) on this machine from measured pieces.

    Args:
        model: the unpruned eager network (its weights do not matter).
        example: an input batch (batch >= 2), e.g. ``torch.rand(2, 3, 32, 32)``.
        runtime: ``onnxruntime`` (default) or ``openvino``.
        threads: intra-op threads of the runtime.
        precision: ``int8`` (PT2E QDQ, as a quantize stage ships) or ``fp32``.
        levels: keep fractions of the lookup grid (ascending, ending at 1.0).
        round_to: kept channels rounded to a multiple of this (as the stage does).
        exclude: fnmatch patterns of modules whose outputs are never pruned.
        cache_dir: folder of the cache files (default :func:`default_cache_dir`).
        warmup, repeats, rounds: timing of each panel (per file).
        say: progress lines (e.g. ``print``), or None.
    """

    def __init__(
        self,
        model: nn.Module,
        example: torch.Tensor,
        *,
        runtime: str = "onnxruntime",
        threads: int = 2,
        precision: str = "int8",
        levels: Sequence[float] = LEVELS,
        round_to: int | None = 8,
        exclude: Sequence[str] = (),
        cache_dir: str | Path | None = None,
        warmup: int = 10,
        repeats: int = 50,
        rounds: int = 2,
        say: Callable[[str], None] | None = None,
    ) -> None:
        if precision not in ("int8", "fp32"):
            raise ValueError(f"precision must be int8 or fp32, got {precision!r}")
        lv = sorted({float(v) for v in levels})
        if not lv or lv[-1] != 1.0 or lv[0] <= 0.0:
            raise PqdError(
                f"latency levels {list(levels)} must be keep fractions in (0, 1] ending at 1.0",
                "give e.g. levels 0.25, 0.5, 0.75, 1.0",
            )
        self.model = copy.deepcopy(model).cpu().float().eval()
        self.example = example[:2].detach().cpu().float()
        self.runtime, self.threads, self.precision = runtime, threads, precision
        self.levels = tuple(lv)
        self.round_to = round_to
        self.exclude = tuple(exclude)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.timing = {"warmup": warmup, "repeats": repeats, "rounds": rounds}
        self.say = say or (lambda _msg: None)
        self.layers, self.groups = network_layers(self.model, self.example, self.exclude)
        self.fingerprint = fingerprint(runtime, threads, precision)
        self.key = fingerprint_key(self.fingerprint)
        self.pieces: dict[str, float] = {}
        self.overhead_ms = 0.0
        self.scale = 1.0
        self.calibration: list[dict[str, Any]] = []
        self.measured_pieces = 0  # pieces measured by this object (not read from the cache)
        self.built = False

    # ---- geometry

    @property
    def cache_file(self) -> Path:
        """This machine's (and runtime's) cache file."""
        return self.cache_dir / f"latency-{self.key}.json"

    def architecture_key(self) -> str:
        """Hash of the layer list (families, widths, groups), the levels and the whole-file
        timing protocol: the fit's cache key (a fit timed another way is fitted again)."""
        blob = json.dumps([asdict(lay) for lay in self.layers], sort_keys=True)
        extra = json.dumps([self.levels, self.round_to, WHOLE_FILE_TIMING], sort_keys=True)
        return hashlib.sha256((blob + extra).encode("utf-8")).hexdigest()[:16]

    def widths(self, ratios: Ratios) -> dict[str, tuple[int, int]]:
        """Per layer, the ``(input, output)`` channels under the candidate ``ratios``."""
        kept = {
            root: kept_channels(c, float(ratios.get(root, 0.0)), self.round_to)
            for root, c in self.groups.items()
        }
        out = {}
        for lay in self.layers:
            cin = kept[lay.in_group] if lay.in_group else lay.cin
            cout = kept[lay.out_group] if lay.out_group else lay.cout
            if lay.depthwise:
                cout = cin
            out[lay.name] = (cin, cout)
        return out

    def uniform(self, keep: float) -> Ratios:
        """Every group keeping the fraction ``keep``."""
        return dict.fromkeys(self.groups, round(1.0 - keep, 6))

    def grid(self, lay: Layer) -> tuple[list[int], list[int]]:
        """The table's input and output widths for ``lay``'s family at this network's
        full widths (one point on an axis whose width no group sets)."""
        cins = (
            sorted({kept_channels(lay.cin, 1 - v, self.round_to) for v in self.levels})
            if lay.in_group
            else [lay.cin]
        )
        if lay.depthwise:
            return cins, cins
        couts = (
            sorted({kept_channels(lay.cout, 1 - v, self.round_to) for v in self.levels})
            if lay.out_group
            else [lay.cout]
        )
        return cins, couts

    def _tables(self) -> dict[str, tuple[list[int], list[int], np.ndarray]]:
        """Per layer name: its grid and monotone table (pieces must be measured)."""
        out = {}
        for lay in self.layers:
            cins, couts = self.grid(lay)
            fam = lay.family()
            if lay.depthwise:
                diag = [self.pieces[piece_key(fam, c, c)] for c in cins]
                table = np.array([[diag[i]] * len(cins) for i in range(len(cins))])
                table = np.maximum(table, table.T)  # t(c, c') = t(max(c, c'))
            else:
                table = np.array(
                    [[self.pieces[piece_key(fam, ci, co)] for co in couts] for ci in cins]
                )
            out[lay.name] = (cins, couts, monotone(table))
        return out

    # ---- building

    def needed_pieces(self) -> dict[str, tuple[Layer, int, int]]:
        """Every piece of the grid: key -> (a layer of its family, cin, cout)."""
        need: dict[str, tuple[Layer, int, int]] = {}
        for lay in self.layers:
            cins, couts = self.grid(lay)
            pairs = (
                [(c, c) for c in cins] if lay.depthwise else [(a, b) for a in cins for b in couts]
            )
            for cin, cout in pairs:
                need.setdefault(piece_key(lay.family(), cin, cout), (lay, cin, cout))
        return need

    def _load_cache(self) -> dict[str, Any]:
        try:
            data = json.loads(self.cache_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("fingerprint") != self.fingerprint:
            return {}  # another machine's or runtime's file under this name: not trusted
        return data

    def _save_cache(self, fits: dict[str, Any]) -> None:
        from pqd.checkpoint import atomic_write_text

        data = self._load_cache()  # merge: another process may have added pieces
        pieces = {**data.get("pieces", {}), **self.pieces}
        all_fits = {**data.get("networks", {}), **fits}
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(
            self.cache_file,
            json.dumps(
                {"fingerprint": self.fingerprint, "pieces": pieces, "networks": all_fits},
                indent=1,
                sort_keys=True,
            ),
        )

    def build(self, *, refit: bool = False) -> LatencyModel:
        """Measure the pieces and whole networks the cache lacks; fit the overhead.

        Args:
            refit: re-time the whole uniform networks even when the cache has the fit.

        Returns:
            ``self``, ready to :meth:`predict`.
        """
        cached = self._load_cache()
        known = cached.get("pieces", {})
        need = self.needed_pieces()
        self.pieces = {k: float(known[k]) for k in need if k in known}
        missing = {k: v for k, v in need.items() if k not in self.pieces}
        if missing:
            self.say(
                f"latency model: measuring {len(missing)} pieces "
                f"({len(need) - len(missing)} cached) on {self.runtime}, "
                f"{self.threads} threads, {self.precision}"
            )
            self.pieces.update(self._measure_pieces(missing))
            self.measured_pieces += len(missing)
        arch = self.architecture_key()
        fit = cached.get("networks", {}).get(arch)
        if fit is None or refit:
            self.say(f"latency model: timing {len(self.levels)} whole uniform networks")
            configs = {f"uniform-{v:g}": self.uniform(v) for v in self.levels}
            measured = self.measure(configs)
            sums = {n: self.sum_pieces(r, checked=False) for n, r in configs.items()}
            self.overhead_ms, self.scale = fit_overhead(
                [sums[n] for n in configs], [measured[n] for n in configs]
            )
            self.calibration = [
                {"name": n, "pieces_ms": round(sums[n], 5), "measured_ms": round(measured[n], 5)}
                for n in configs
            ]
            fit = {
                "overhead_ms": self.overhead_ms,
                "scale": self.scale,
                "calibration": self.calibration,
            }
        else:
            self.overhead_ms, self.scale = float(fit["overhead_ms"]), float(fit["scale"])
            self.calibration = list(fit.get("calibration", []))
        self._save_cache({arch: fit})
        self.built = True
        self._table_cache = self._tables()
        return self

    def _measure_pieces(self, missing: dict[str, tuple[Layer, int, int]]) -> dict[str, float]:
        out: dict[str, float] = {}
        items = list(missing.items())
        chunk = 16
        with tempfile.TemporaryDirectory(prefix="pqd-pieces-") as tmp:
            for start in range(0, len(items), chunk):
                paths, shapes = {}, {}
                for i, (key, (lay, cin, cout)) in enumerate(items[start : start + chunk]):
                    module, example = piece_module(lay, cin, cout)
                    paths[key] = export_as_shipped(
                        module, example, Path(tmp) / f"p{start + i}.onnx", int8=self._int8
                    )
                    shapes[key] = (1, *example.shape[1:])
                out.update(
                    time_files(paths, shapes, self.runtime, self.threads, **self._steady_timing())
                )
                for p in paths.values():
                    p.unlink(missing_ok=True)
        return out

    @property
    def _int8(self) -> bool:
        return self.precision == "int8"

    # ---- predicting

    def sum_pieces(self, ratios: Ratios, *, checked: bool = True) -> float:
        """Sum of the layers' table times (ms) under ``ratios`` (no overhead)."""
        if checked:
            self._check_built()
        tables = getattr(self, "_table_cache", None) or self._tables()
        total = 0.0
        for name, (cin, cout) in self.widths(ratios).items():
            cins, couts, table = tables[name]
            total += bilinear(cins, couts, table, cin, cout)
        return total

    def predict(self, ratios: Ratios) -> float:
        """Predicted batch-1 p50 (ms) of the candidate exported as shipped, without export.

        Args:
            ratios: removed fraction per group root (see :attr:`groups`); absent: 0.

        Returns:
            Milliseconds.
        """
        self._check_built()
        unknown = sorted(set(ratios) - set(self.groups))
        if unknown:
            raise PqdError(
                f"candidate names group {unknown[0]!r}, which the network does not have",
                f"use group roots such as {', '.join(list(self.groups)[:3])}",
            )
        return self.overhead_ms + self.scale * self.sum_pieces(ratios)

    def predict_size_mb(self, ratios: Ratios) -> float:
        """Weight bytes (MB, 1e6) of the candidate: 1 byte per weight in INT8, 4 in FP32."""
        per = 1 if self._int8 else 4
        total = 0
        w = self.widths(ratios)
        for lay in self.layers:
            cin, cout = w[lay.name]
            kh, kw = lay.kernel
            g = cin if lay.depthwise else lay.groups
            total += cout * (cin // g) * kh * kw
        return total * per / 1e6

    def _check_built(self) -> None:
        if not self.built:
            raise RuntimeError("call build() before predict()")

    # ---- whole networks

    def candidate_model(self, ratios: Ratios) -> nn.Module:
        """A copy of the network cut to ``ratios`` (first channels kept: latency only)."""
        from pqd.prune.channels import apply_structure

        m = copy.deepcopy(self.model)
        records = []
        for root, c in self.groups.items():
            k = kept_channels(c, float(ratios.get(root, 0.0)), self.round_to)
            if k < c:
                records.append({"layer": root, "channels": c, "kept": list(range(k))})
        return apply_structure(m, self.example, records)

    def measure(self, candidates: dict[str, Ratios]) -> dict[str, float]:
        """Measured batch-1 p50 (ms) of every candidate exported whole, timed interleaved
        (:meth:`time_paths`)."""
        with tempfile.TemporaryDirectory(prefix="pqd-candidates-") as tmp:
            paths = {
                name: export_as_shipped(
                    self.candidate_model(r), self.example, Path(tmp) / f"c{i}.onnx", int8=self._int8
                )
                for i, (name, r) in enumerate(candidates.items())
            }
            return self.time_paths(paths)

    def time_paths(self, paths: dict[str, Path]) -> dict[str, float]:
        """Batch-1 p50 (ms) of whole ONNX files (the model's input shape) in one interleaved
        panel, with steady-state timing: at least 50 warm-up calls and 4 rounds of 100 calls
        per file. Whole files are few and decide what is trained and picked; with 10 warm-up
        calls and blocks of 25 a 0.35 ms ResNet-18 file timed 0.42-0.50 ms here, next to a
        dense file that did not move, so shorter blocks bias small files against large ones.

        Args:
            paths: name -> ONNX file.

        Returns:
            name -> p50 in milliseconds.
        """
        shape = (1, *self.example.shape[1:])
        return time_files(
            paths, dict.fromkeys(paths, shape), self.runtime, self.threads, **self._steady_timing()
        )

    def _steady_timing(self) -> dict[str, int]:
        """The timing of every panel, pieces and whole files alike (one protocol: a model
        of pieces timed otherwise than the files it predicts was off by 50% here)."""
        rounds = max(WHOLE_FILE_TIMING["rounds"], self.timing["rounds"])
        return {
            "warmup": max(WHOLE_FILE_TIMING["warmup"], self.timing["warmup"]),
            "rounds": rounds,
            "repeats": max(WHOLE_FILE_TIMING["block"] * rounds, self.timing["repeats"]),
        }

    def random_candidate(self, rng: np.random.Generator, levels: Iterable[float] = ()) -> Ratios:
        """Each group at a random keep level (of ``levels``, default the grid's)."""
        lv = list(levels) or list(self.levels)
        return {root: round(1.0 - float(rng.choice(lv)), 6) for root in self.groups}

    def validate(self, n: int = 20, seed: int = 0) -> dict[str, Any]:
        """The model's error on ``n`` random candidates exported whole and measured.

        Args:
            n: candidates (at least 1).
            seed: random seed of the candidates.

        Returns:
            ``{"n", "median_error", "worst_error", "candidates": [{"ratios",
            "predicted_ms", "measured_ms", "error"}]}``; errors are relative
            (``|predicted - measured| / measured``).
        """
        self._check_built()
        rng = np.random.default_rng(seed)
        cands = {f"v{i}": self.random_candidate(rng) for i in range(max(1, n))}
        measured = self.measure(cands)
        rows = []
        for name, r in cands.items():
            pred = self.predict(r)
            meas = measured[name]
            rows.append(
                {
                    "ratios": r,
                    "predicted_ms": round(pred, 5),
                    "measured_ms": round(meas, 5),
                    "error": round(abs(pred - meas) / meas, 5),
                }
            )
        errors = [row["error"] for row in rows]
        return {
            "n": len(rows),
            "median_error": float(np.median(errors)),
            "worst_error": float(np.max(errors)),
            "candidates": rows,
        }

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary: fingerprint, cache file, groups, fit, piece counts."""
        return {
            "fingerprint": self.fingerprint,
            "cache_file": str(self.cache_file),
            "levels": list(self.levels),
            "round_to": self.round_to,
            "groups": dict(self.groups),
            "layers": len(self.layers),
            "pieces": len(self.needed_pieces()),
            "pieces_measured_now": self.measured_pieces,
            "overhead_ms": round(self.overhead_ms, 5),
            "scale": round(self.scale, 5),
            "calibration": self.calibration,
        }
