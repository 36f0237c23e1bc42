"""``pqd plan`` itself (:func:`plan`): the steps of :mod:`pqd.planner` in order, on one
plan folder that the same call resumes."""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pqd.errors import PqdError
from pqd.executors import Executor
from pqd.latency_model import LEVELS, Ratios, validation_text
from pqd.planner.candidates import search_levels
from pqd.planner.latency import (
    FINAL_PANELS,
    PlanSetup,
    files_against_dense,
    settle_borderline,
    setup_latency_model,
)
from pqd.planner.pick import choose_pick
from pqd.planner.report import write_plan
from pqd.planner.select import Screening, select
from pqd.planner.sensitivity import adaptive_bn_eval, sensitivity_curves, sensitivity_loss
from pqd.planner.template import (
    PICK_FILE,
    PLAN_VERSION,
    SELECTION_FILE,
    SENSITIVITY_FILE,
    PlanError,
    announce,
    cached_json,
    candidate_recipe,
    plan_folder,
)
from pqd.recipe import Recipe, dump_recipe
from pqd.runs import Trial


@dataclass
class PlanOptions:
    """:func:`plan`'s keyword arguments (documented there), as one value."""

    latency_ms: float
    size_mb: float | None = None
    threads: int | None = None
    runtime: str | None = None
    k: int = 3
    validate: int = 20
    n_random: int = 2000
    screen: int = 16
    calib_images: int = 256
    levels: tuple[float, ...] = LEVELS
    tolerance: float = 0.05
    dense_ms: float | None = None
    data_dir: str | None = None
    executor: str = "sequential"
    workers: int | None = None
    address: str | None = None
    cache_dir: str | Path | None = None
    timing: dict[str, int] | None = None
    progress: bool = True


def plan(
    recipe: Recipe | str | Path,
    latency_ms: float,
    out: str | Path,
    *,
    size_mb: float | None = None,
    threads: int | None = None,
    runtime: str | None = None,
    k: int = 3,
    validate: int = 20,
    n_random: int = 2000,
    screen: int = 16,
    calib_images: int = 256,
    levels: tuple[float, ...] = LEVELS,
    tolerance: float = 0.05,
    dense_ms: float | None = None,
    data_dir: str | None = None,
    executor: str = "sequential",
    workers: int | None = None,
    address: str | None = None,
    cache_dir: str | Path | None = None,
    timing: dict[str, int] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Plan (or resume planning) the most accurate candidate within ``latency_ms``.

    Args:
        recipe: the template job (model, data, baseline, stages; see module doc), or the
            path of its YAML file.
        latency_ms: budget, batch-1 p50 in milliseconds of the exported file.
        out: plan folder (created; the same call again resumes).
        size_mb: optional budget on the weights' size (MB, 1e6 bytes), predicted.
        threads: runtime threads (default: the recipe's ``measure.threads``).
        runtime: ``onnxruntime`` or ``openvino`` (default: the recipe's first runtime).
        k: candidates trained for real.
        validate: random whole candidates measured to report the latency model's error
            (0: none).
        n_random: random candidates estimated besides the uniform and greedy ones.
        screen: feasible candidates (best by the sensitivity estimate) whose adaptive-BN
            validation loss ranks them for training.
        calib_images: training images re-estimating BatchNorm statistics per screened one.
        levels: keep fractions of the latency tables (ascending, ending at 1.0).
        tolerance: fraction over the budget a measured pick may run (timing noise).
        dense_ms: the dense model's p50 (ms) the budget was set against, measured earlier
            (e.g. a benchmark's 0.5x of it); default: measured at the start. Every later
            panel times the dense network too and is scaled to it, so a machine that drifts
            during the plan does not move candidates across the budget.
        data_dir: folder holding the data sets.
        executor, workers, address: as ``pqd search`` (sequential, processes, Ray).
        cache_dir: latency cache folder (default ``$PQD_CACHE_DIR/latency``, ~/.cache/pqd/latency).
        timing: ``{"warmup", "repeats", "rounds"}`` of the latency model's panels.
        progress: progress bars and lines.

    Returns:
        plan.json's data (the pick under ``"pick"``).
    """
    options = PlanOptions(
        latency_ms=latency_ms, size_mb=size_mb, threads=threads, runtime=runtime, k=k,
        validate=validate, n_random=n_random, screen=screen, calib_images=calib_images,
        levels=levels, tolerance=tolerance, dense_ms=dense_ms, data_dir=data_dir,
        executor=executor, workers=workers, address=address, cache_dir=cache_dir,
        timing=timing, progress=progress,
    )  # fmt: skip
    return Planning(recipe, options, out).run()


class Planning:
    """One call of :func:`plan`: its checked inputs and its steps, each a method."""

    def __init__(self, recipe: Recipe | str | Path, o: PlanOptions, out: str | Path) -> None:
        from pqd.data import resolve_data_root
        from pqd.executors import check_executor
        from pqd.measurement.runtime import available_runtimes
        from pqd.progress import phases_shown
        from pqd.recipe import load_recipe

        self.t_start = time.perf_counter()
        self.recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
        if not o.latency_ms > 0:
            raise PqdError(f"--latency-ms {o.latency_ms} is not a budget", "give milliseconds > 0")
        if o.k < 1:
            raise PqdError(f"k {o.k} trains no candidate", "give k of 1 or more")
        o.executor = check_executor(o.executor, o.workers, o.address)
        runtimes = self.recipe.measure.runtimes
        o.runtime = o.runtime or next((r for r in runtimes if r != "auto"), "onnxruntime")
        if o.runtime not in available_runtimes():
            raise PqdError(
                f"runtime {o.runtime!r} is not installed",
                f"pip install {o.runtime}, or use --runtime onnxruntime",
            )
        o.threads = o.threads or self.recipe.measure.threads
        self.o = o
        self.runtime, self.threads = o.runtime, o.threads
        self.out_dir = Path(out).resolve()
        self.data_root = str(resolve_data_root(o.data_dir, self.recipe.data.root))
        # phase lines: with progress, or from the command (which shows them with --no-progress)
        self.say = announce if o.progress or phases_shown() else (lambda _m: None)
        self.counts = {"trained_now": 0, "reused": 0, "failed": 0}

    def run(self) -> dict[str, Any]:
        """Every step in order; plan.json's data (see :func:`plan`)."""
        from pqd.fingerprint import file_digest
        from pqd.pipeline import measure_run

        o, say = self.o, self.say
        setup = setup_latency_model(
            self.recipe,
            self.runtime,
            self.threads,
            o.levels,
            data_dir=o.data_dir,
            cache_dir=o.cache_dir,
            timing=o.timing,
            say=say,
        )
        validation = self.validation(setup)
        ends = self.refusals(setup)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with Executor(o.executor, o.workers, o.address, self.data_root, o.progress) as ex:
            checkpoint = self.baseline(ex)
            digest = file_digest(checkpoint)
            screening = self.screening(setup, checkpoint, digest, ends["dense"])
            selection = self.selection(screening, digest)
            rows = selection["rows"]
            chosen = [rows[i] for i in selection["chosen"]]
            say(
                f"{len(rows)} candidates estimated, {sum(r['feasible'] for r in rows)} "
                f"feasible by the latency model (x{selection['scale']:.3f} from the uniform "
                f"files); training {len(chosen)} (uniform reference: ratio "
                f"{selection['ref_ratio']:g}, measured {selection['ref_ms']:.3f} ms)"
            )
            trials, to_measure = self.train(ex, setup, chosen, checkpoint, digest)
        for folder in to_measure:
            measure_run(folder, data_dir=self.data_root, progress=o.progress)
        trained, panel = self.final_panel(setup, chosen, trials, ends["dense"])
        return self.finish(setup, selection, trained, trials, panel, ends, validation)

    def validation(self, setup: PlanSetup) -> dict[str, Any] | None:
        """Step 1's report: the latency model's error on random whole candidates."""
        validation = setup.lm.validate(self.o.validate) if self.o.validate > 0 else None
        if validation:
            self.say(
                f"latency model error over {validation['n']} random candidates: "
                f"{validation_text(validation)}"
            )
        return validation

    def refusals(self, setup: PlanSetup) -> dict[str, float]:
        """Step 2: the dense and the fastest networks timed side by side; a budget the dense
        model meets or the fastest misses is refused (PlanError).

        Returns:
            ``{"dense", "fastest"}`` p50s (ms), on the scale of ``dense_ms`` when given: the
            dense time every later panel is scaled to.
        """
        o, lm = self.o, setup.lm
        ends = lm.measure({"dense": {}, "fastest": lm.uniform(lm.levels[0])})
        if o.dense_ms is not None:  # the dense time the budget was set against: this panel on it
            ends = {"dense": o.dense_ms, "fastest": ends["fastest"] * o.dense_ms / ends["dense"]}
        label, where = setup.precision.upper(), f"{self.runtime}, {self.threads} threads"
        if ends["dense"] <= o.latency_ms:
            raise PlanError(
                f"budget {o.latency_ms:g} ms is already met by the dense {label} model (measured "
                f"p50 {ends['dense']:.3f} ms on {where}): nothing to prune",
                "run the recipe without channel pruning (pqd run), or give a smaller --latency-ms",
            )
        if ends["fastest"] > o.latency_ms * (1 + o.tolerance):
            raise PlanError(
                f"budget {o.latency_ms:g} ms is below every candidate: the fastest measured "
                f"(every channel group at keep {lm.levels[0]:g}) runs in "
                f"{ends['fastest']:.3f} ms ({label}, {where})",
                f"give --latency-ms {ends['fastest']:.3f} or more",
            )
        return ends

    def baseline(self, ex: Executor) -> Path:
        """Step 3: the shared baseline, trained once (or continued) or the recipe's
        checkpoint; its checkpoint file."""
        from pqd.runs import folder_status, reset_folder
        from pqd.search import baseline_trial

        base = baseline_trial(self.recipe.model_copy(update={"search": None}), self.data_root)
        base_dir = self.out_dir / base.folder
        results: dict[str, dict[str, Any]] = {}
        status = folder_status(base_dir, base.key)
        if status in ("missing", "partial"):  # a stopped one continues where it stopped
            self.say(f"baseline into {base_dir}" + (" (continuing)" if status == "partial" else ""))
            if status == "missing":
                reset_folder(base_dir, base)
            ex.run(
                [(base, base_dir)], lambda t, f, r: results.__setitem__(t.key, r), local_first=True
            )
            if not results[base.key]["ok"]:
                raise PqdError(
                    f"plan baseline: {results[base.key]['problem']}", results[base.key]["fix"]
                )
        return base_dir / "baseline.safetensors"

    def screening(
        self, setup: PlanSetup, checkpoint: Path, digest: str, dense_ms: float
    ) -> Screening:
        """Step 3's estimates: the adaptive-BN evaluation of the trained baseline and the
        per-group sensitivity curves (cached in the plan folder)."""
        from pqd.checkpoint import load_checkpoint
        from pqd.recipe import PruneChannelsSpec

        o, lm, data, recipe = self.o, setup.lm, setup.data, self.recipe
        trained_base = load_checkpoint(copy.deepcopy(setup.fresh), checkpoint).cpu().eval()
        spec = PruneChannelsSpec.model_validate(setup.stage)
        perm = np.random.default_rng(recipe.seed).permutation(len(data.train_x))
        calib_x = data.train_x[np.sort(perm[: o.calib_images])]
        val_x, val_y = data.val_x, data.val_y
        if not len(val_x):  # no validation split: training images the BN pass did not see
            rest = np.sort(perm[o.calib_images : o.calib_images + 500])
            val_x, val_y = data.train_x[rest], data.train_y[rest]

        def abn(r: Ratios) -> tuple[float, float]:
            return adaptive_bn_eval(trained_base, setup.example, r, spec, calib_x, val_x, val_y)

        key = {
            "checkpoint": digest,
            "calib_images": o.calib_images,
            "seed": recipe.seed,
            "levels": list(lm.levels),
            "groups": dict(lm.groups),
            "round_to": spec.round_to,
            "exclude": list(spec.exclude),
            "data": recipe.data.model_dump(mode="json"),
            "val_images": len(val_x),
        }
        sens = cached_json(
            self.out_dir / SENSITIVITY_FILE,
            key,
            lambda: sensitivity_curves(lm, lambda r: abn(r)[1], search_levels(lm.levels), self.say),
        )
        return Screening(
            lm=lm, latency_ms=o.latency_ms, size_mb=o.size_mb, tolerance=o.tolerance, k=o.k,
            screen=o.screen, n_random=o.n_random, seed=recipe.seed, dense_ms=dense_ms,
            max_ratio=spec.max_ratio, estimate=lambda r: sensitivity_loss(sens, r), abn=abn,
            say=self.say,
        )  # fmt: skip

    def selection(self, screening: Screening, digest: str) -> dict[str, Any]:
        """Step 3's choice (:func:`pqd.planner.select.select`), cached: a resumed plan trains
        what it chose before (timings on a noisy machine would choose again, differently, and
        leave trained runs out of the pick)."""
        o = self.o
        key = {
            "checkpoint": digest,
            "latency_ms": o.latency_ms,
            "size_mb": o.size_mb,
            "k": o.k,
            "screen": o.screen,
            "selection": 2,  # 2: also widened when the whole files ran faster
            "n_random": o.n_random,
            "calib_images": o.calib_images,
            "tolerance": o.tolerance,
            "seed": self.recipe.seed,
            "architecture": screening.lm.architecture_key(),
            "machine": screening.lm.key,
        }
        return cached_json(self.out_dir / SELECTION_FILE, key, lambda: select(screening))

    def train(
        self,
        ex: Executor,
        setup: PlanSetup,
        chosen: list[dict[str, Any]],
        checkpoint: Path,
        digest: str,
    ) -> tuple[list[Trial], list[Path]]:
        """Step 4: the chosen trained through the normal pipeline, resumable.

        Returns:
            The trials (one per chosen row, whose ``key`` they set) and the run folders
            trained but not yet measured.
        """
        from pqd.runs import folder_status, reset_folder, trial_key

        trials = []
        for i, row in enumerate(chosen):
            job = candidate_recipe(
                setup.base_data,
                setup.index,
                row["ratios"],
                f"{self.recipe.name}-plan-{i}",
                str(checkpoint),
            )
            order = tuple(s.stage for s in job.stages)
            epochs = tuple(s.epochs for s in job.stages)
            key = trial_key(job, digest, self.data_root)
            trials.append(Trial("plan", order, job.seed, epochs, job, key))
            row["key"] = trials[-1].key
        todo, to_measure = [], []
        for t in trials:
            folder = self.out_dir / plan_folder(t)
            st = folder_status(folder, t.key)
            if st in ("done", "trained"):
                self.counts["reused"] += 1
                if st == "trained":
                    to_measure.append(folder)
            else:
                if st == "missing":  # a stopped one continues from its last step and epoch
                    reset_folder(folder, t)
                todo.append((t, folder))

        def finished(trial: Any, folder: Path, result: dict[str, Any]) -> None:
            if result["ok"]:
                self.counts["trained_now"] += 1
                to_measure.append(folder)
                self.say(f"trained {folder.name} in {result['seconds']:.0f} s")
            else:
                self.counts["failed"] += 1
                self.say(f"{folder.name} FAILED: {result['error']}")

        ex.run(todo, finished)
        return trials, to_measure

    def final_panel(
        self, setup: PlanSetup, chosen: list[dict[str, Any]], trials: list[Trial], dense_ms: float
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Step 6's timing: every final file in one panel with the dense network (exported
        as the latency model does), whose p50 there scales the panel to ``dense_ms``.

        Returns:
            The trained entries (measured ones with ``status`` done, p50 and accuracies) and
            ``{"dense_file", "drift"}``.
        """
        from pqd.latency_model import export_as_shipped

        lm, out_dir = setup.lm, self.out_dir
        finals = {
            t.key: out_dir / plan_folder(t) / "final.onnx"
            for t in trials
            if (out_dir / plan_folder(t) / "record.json").is_file()
        }
        dense_file = out_dir / "reference" / f"dense-{setup.precision}-{lm.architecture_key()}.onnx"
        if not dense_file.is_file():
            dense_file.parent.mkdir(parents=True, exist_ok=True)
            int8 = setup.precision == "int8"
            export_as_shipped(lm.candidate_model({}), setup.example, dense_file, int8=int8)
        timed = files_against_dense(lm, finals, dense_file, dense_ms)
        limit = self.o.latency_ms * (1 + self.o.tolerance)
        timed, retimed = settle_borderline(lm, timed, finals, dense_file, dense_ms, limit)
        if retimed:
            self.say(f"timing {len(retimed)} file(s) on the budget's edge once more")
        drift = dense_ms / timed.dense_raw_ms
        trained = []
        for row, t in zip(chosen, trials, strict=True):
            folder = out_dir / plan_folder(t)
            entry: dict[str, Any] = {**row, "dir": str(folder.relative_to(out_dir))}
            rec_path = folder / "record.json"
            if rec_path.is_file() and t.key in timed.ms:
                final = json.loads(rec_path.read_text(encoding="utf-8"))["final"]
                entry.update(
                    status="done",
                    measured_ms=round(timed.ms[t.key], 5),
                    measured_raw_ms=round(timed.ms[t.key] / drift, 5),
                    measured_spread=round(timed.spread[t.key], 4),
                    measured_panels=len(timed.samples[t.key]),
                    accuracy=final["accuracy"],
                    val_accuracy=final.get("val_accuracy"),
                    size_bytes=final["size_bytes"],
                )
            else:
                entry["status"] = "failed"
            trained.append(entry)
        return trained, {"dense_file": dense_file, "drift": drift}

    def finish(
        self,
        setup: PlanSetup,
        selection: dict[str, Any],
        trained: list[dict[str, Any]],
        trials: list[Trial],
        panel: dict[str, Any],
        ends: dict[str, float],
        validation: dict[str, Any] | None,
    ) -> dict[str, Any]:
        """Step 6's pick (:func:`choose_pick`), plan.json, report.md and the pick's recipe;
        PlanError when no trained candidate met the budget when measured."""
        o, out_dir, rows = self.o, self.out_dir, selection["rows"]
        ok = [e for e in trained if e["status"] == "done"]
        within = [e for e in ok if e["measured_ms"] <= o.latency_ms * (1 + o.tolerance)]
        pick, pick_rule = choose_pick(within, out_dir)
        lm_info = {**setup.lm.describe(), "validation": validation}
        result: dict[str, Any] = {
            "version": PLAN_VERSION,
            "recipe": self.recipe.name,
            "model": self.recipe.model.name,
            "budget": {"latency_ms": o.latency_ms, "size_mb": o.size_mb, "tolerance": o.tolerance},
            "runtime": self.runtime,
            "threads": self.threads,
            "precision": setup.precision,
            "latency_model": {**lm_info, "near_budget_scale": selection["scale"]},
            "dense_ms": round(ends["dense"], 5),
            "final_panel_drift": round(panel["drift"], 4),
            "final_panels": FINAL_PANELS,
            "dense_file": str(panel["dense_file"].relative_to(out_dir)),
            "fastest_ms": round(ends["fastest"], 5),
            "counts": {
                "estimated": len(rows),
                "feasible": sum(r["feasible"] for r in rows),
                "trained": len(trained),
                **self.counts,
            },
            "candidates": rows,
            "trained": trained,
            "pick": pick,
            "pick_rule": pick_rule,
            "executor": o.executor,
            "timing_s": {"total": round(time.perf_counter() - self.t_start, 1)},
        }
        if pick is not None:
            pick_trial = next(t for t in trials if t.key == pick["key"])
            (out_dir / PICK_FILE).write_text(
                f"# pqd plan's pick for {o.latency_ms:g} ms ({self.runtime}, {self.threads} "
                f"threads): pqd run {PICK_FILE} --out DIR reproduces it\n"
                + dump_recipe(pick_trial.recipe),
                encoding="utf-8",
            )
            result["pick_recipe"] = PICK_FILE
        write_plan(result, out_dir)
        if pick is None:
            closest = min(ok, key=lambda e: e["measured_ms"]) if ok else None
            raise PlanError(
                f"no trained candidate met {o.latency_ms:g} ms when measured"
                + (f" (fastest: {closest['measured_ms']:.3f} ms)" if closest else " (all failed)"),
                f"see {out_dir / 'report.md'}; raise --latency-ms or -k, or re-run on a quieter "
                "machine",
            )
        return result
