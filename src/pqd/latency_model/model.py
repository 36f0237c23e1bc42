"""The latency model itself: a network's measured pieces, summed and fitted into a
prediction of a candidate's batch-1 p50 on this machine (:class:`LatencyModel`).

It builds the tables (the pieces the cache lacks are measured), fits the whole-network
overhead on uniform networks, predicts without export, and validates against candidates
exported whole.
"""

from __future__ import annotations

import copy
import hashlib
import json
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from pqd.errors import PqdError
from pqd.latency_model.layers import Layer, kept_channels, network_layers, piece_key
from pqd.latency_model.measure import (
    default_cache_dir,
    export_as_shipped,
    fingerprint,
    fingerprint_key,
    piece_module,
    time_files,
)
from pqd.latency_model.tables import bilinear, fit_overhead, monotone
from pqd.stats import wilson_interval

WHOLE_FILE_TIMING = {"warmup": 50, "rounds": 4, "block": 100}
"""Timing of every latency-model panel, pieces and whole files (:meth:`LatencyModel.time_paths`):
warm-up calls, interleaved rounds and calls per file per round (steady state; short blocks
bias small files against large ones)."""

WITHIN = 0.10
"""The relative error the field counts a latency prediction right within (+-10%)."""

MIXED = 8
"""Random whole candidates of mixed widths in the overhead fit, beside the uniform ones."""

MIXED_SEED = 7919
"""Their seed: not :meth:`LatencyModel.validate`'s default 0, so validation candidates are
other networks than the fitted ones."""

LEVELS = (0.25, 0.5, 0.75, 1.0)
"""Keep fractions of the lookup grid (and of the planner's candidates), the dense 1.0 last."""


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
        mixed: random whole candidates (every group at a random level, drawn from their own
            seed, not :meth:`validate`'s) timed beside the uniform networks for the
            overhead fit: uniform networks alone under-predicted mixed widths by 5% on
            average here.
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
        mixed: int = MIXED,
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
        self.mixed = max(0, int(mixed))
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
        if fit is None or refit or fit.get("mixed", 0) != self.mixed:
            self.say(
                f"latency model: timing {len(self.levels)} whole uniform networks and "
                f"{self.mixed} of mixed widths"
            )
            configs = {f"uniform-{v:g}": self.uniform(v) for v in self.levels}
            rng = np.random.default_rng(MIXED_SEED)
            configs.update({f"mixed-{i}": self.random_candidate(rng) for i in range(self.mixed)})
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
                "mixed": self.mixed,
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
        return self.measure_panels(candidates, 1)[0]

    def measure_panels(self, candidates: dict[str, Ratios], panels: int) -> list[dict[str, float]]:
        """Every candidate exported whole once and timed in ``panels`` panels, each with its
        own sessions and the files in turn in the other order.

        Args:
            candidates: name -> ratios.
            panels: how many times the files are timed (at least 1).

        Returns:
            One ``name -> p50 (ms)`` per panel.
        """
        with tempfile.TemporaryDirectory(prefix="pqd-candidates-") as tmp:
            paths = {
                name: export_as_shipped(
                    self.candidate_model(r), self.example, Path(tmp) / f"c{i}.onnx", int8=self._int8
                )
                for i, (name, r) in enumerate(candidates.items())
            }
            order = list(paths)
            return [
                self.time_paths({n: paths[n] for n in (order if p % 2 == 0 else order[::-1])})
                for p in range(max(1, panels))
            ]

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

    def validate(self, n: int = 20, seed: int = 0, panels: int = 1) -> dict[str, Any]:
        """The model's error on ``n`` random candidates exported whole and measured.

        Args:
            n: candidates (at least 1).
            seed: random seed of the candidates.
            panels: times each candidate is timed, each in a panel of its own sessions
                (:meth:`measure_panels`); the measured p50 is the median over the panels.

        Returns:
            ``{"n", "median_error", "worst_error", "within_10", "within_10_ci",
            "candidates": [{"ratios", "predicted_ms", "measured_ms", "error"}]}``; errors are
            relative (``|predicted - measured| / measured``); ``within_10`` is the share
            (fraction) of candidates predicted within +-10% of their measured p50, the
            field's accuracy unit (nn-Meter, LitePred), with its 95% Wilson interval. With
            two panels or more also ``panel_agreement``: the share of candidates whose
            first two panels agree within +-10% (how far the measurement itself repeats,
            the ceiling for any predictor), with ``panel_agreement_ci``; each candidate
            row then holds its ``panels_ms``.
        """
        self._check_built()
        rng = np.random.default_rng(seed)
        cands = {f"v{i}": self.random_candidate(rng) for i in range(max(1, n))}
        timed = self.measure_panels(cands, panels)
        measured = {name: float(np.median([t[name] for t in timed])) for name in cands}
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
            if len(timed) > 1:
                rows[-1]["panels_ms"] = [round(t[name], 5) for t in timed]
        errors = [row["error"] for row in rows]
        within = sum(e <= WITHIN for e in errors)
        lo, hi = wilson_interval(within, len(errors))
        out: dict[str, Any] = {
            "n": len(rows),
            "median_error": float(np.median(errors)),
            "worst_error": float(np.max(errors)),
            "within_10": within / len(errors),
            "within_10_ci": [round(lo, 6), round(hi, 6)],
            "candidates": rows,
        }
        if len(timed) > 1:
            agree = sum(abs(timed[1][c] / timed[0][c] - 1.0) <= WITHIN for c in cands)
            a_lo, a_hi = wilson_interval(agree, len(cands))
            out["panels"] = len(timed)
            out["panel_agreement"] = agree / len(cands)
            out["panel_agreement_ci"] = [round(a_lo, 6), round(a_hi, 6)]
        return out

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


def validation_text(v: dict[str, Any]) -> str:
    """One line of :meth:`LatencyModel.validate`'s report, e.g. ``median 3.1%, worst
    12.0%, 18 of 20 within +-10% (90% [70, 97])`` (reports written before the share was
    kept give median and worst only)."""
    text = f"median {100 * v['median_error']:.1f}%, worst {100 * v['worst_error']:.1f}%"
    if "within_10" in v:
        lo, hi = v["within_10_ci"]
        text += (
            f", {round(v['within_10'] * v['n'])} of {v['n']} within +-10% "
            f"({100 * v['within_10']:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}])"
        )
    return text
