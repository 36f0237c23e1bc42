"""``pqd plan`` itself (:func:`plan`) and the pick rule (:func:`choose_pick`)."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from pqd.errors import PqdError
from pqd.latency_model.model import LEVELS, Ratios
from pqd.planner.candidates import generate, search_levels
from pqd.planner.latency import (
    FINAL_PANELS,
    files_against_dense,
    measure_against_dense,
    near_budget_scale,
    ratio_steps,
    recalibrated,
    setup_latency_model,
    uniform_reference,
    widened,
)
from pqd.planner.report import write_plan
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
from pqd.stats import ALPHA, compare_paired, holm


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
        cache_dir: latency cache folder (default ``PQD_CACHE_DIR`` or ~/.cache/pqd/latency).
        timing: ``{"warmup", "repeats", "rounds"}`` of the latency model's panels.
        progress: progress bars and lines.

    Returns:
        plan.json's data (the pick under ``"pick"``).
    """

    from pqd.data import resolve_data_root
    from pqd.measurement.runtime import available_runtimes
    from pqd.runs import check_executor

    t_start = time.perf_counter()
    if not isinstance(recipe, Recipe):
        from pqd.recipe import load_recipe

        recipe = load_recipe(recipe)
    if not latency_ms > 0:
        raise PqdError(f"--latency-ms {latency_ms} is not a budget", "give milliseconds > 0")
    if k < 1:
        raise PqdError(f"k {k} trains no candidate", "give k of 1 or more")
    executor = check_executor(executor, workers, address)
    runtime = runtime or next((r for r in recipe.measure.runtimes if r != "auto"), "onnxruntime")
    if runtime not in available_runtimes():
        raise PqdError(
            f"runtime {runtime!r} is not installed",
            f"pip install {runtime}, or use --runtime onnxruntime",
        )
    threads = threads or recipe.measure.threads
    out_dir = Path(out).resolve()
    data_root = str(resolve_data_root(data_dir, recipe.data.root))
    from pqd.progress import phases_shown

    # phase lines: with progress, or from the command (which shows them with --no-progress)
    say = announce if progress or phases_shown() else (lambda _m: None)

    # ---- 1. the latency model
    setup = setup_latency_model(
        recipe,
        runtime,
        threads,
        levels,
        data_dir=data_dir,
        cache_dir=cache_dir,
        timing=timing,
        say=say,
    )
    base_data, index, precision, pc = setup.base_data, setup.index, setup.precision, setup.stage
    data, example, fresh, lm = setup.data, setup.example, setup.fresh, setup.lm
    validation = lm.validate(validate) if validate > 0 else None
    if validation:
        say(
            f"latency model error over {validation['n']} random candidates: median "
            f"{100 * validation['median_error']:.1f}%, worst {100 * validation['worst_error']:.1f}%"
        )

    # ---- 2. refusals, from whole networks timed side by side
    fastest = lm.uniform(lm.levels[0])
    ends = lm.measure({"dense": {}, "fastest": fastest})
    if dense_ms is not None:  # the dense time the budget was set against: this panel on it
        ends = {"dense": dense_ms, "fastest": ends["fastest"] * dense_ms / ends["dense"]}
    dense_ref = ends["dense"]  # every later panel is scaled to it (measure_against_dense)
    label = precision.upper()
    if ends["dense"] <= latency_ms:
        raise PlanError(
            f"budget {latency_ms:g} ms is already met by the dense {label} model (measured p50 "
            f"{ends['dense']:.3f} ms on {runtime}, {threads} threads): nothing to prune",
            "run the recipe without channel pruning (pqd run), or give a smaller --latency-ms",
        )
    if ends["fastest"] > latency_ms * (1 + tolerance):
        raise PlanError(
            f"budget {latency_ms:g} ms is below every candidate: the fastest measured (every "
            f"channel group at keep {lm.levels[0]:g}) runs in {ends['fastest']:.3f} ms "
            f"({label}, {runtime}, {threads} threads)",
            f"give --latency-ms {ends['fastest']:.3f} or more",
        )

    # ---- 3. the shared baseline (trained once, or the recipe's checkpoint)
    from pqd.runs import Executor, file_digest, folder_status, reset_folder
    from pqd.search import baseline_trial

    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {"trained_now": 0, "reused": 0, "failed": 0}
    plain = recipe.model_copy(update={"search": None})
    with Executor(executor, workers, address, data_root, progress) as ex:
        base = baseline_trial(plain, data_root)
        base_dir = out_dir / base.folder
        results: dict[str, dict[str, Any]] = {}
        status = folder_status(base_dir, base.key)
        if status in ("missing", "partial"):  # a stopped one continues where it stopped
            say(f"baseline into {base_dir}" + (" (continuing)" if status == "partial" else ""))
            if status == "missing":
                reset_folder(base_dir, base)
            ex.run(
                [(base, base_dir)], lambda t, f, r: results.__setitem__(t.key, r), local_first=True
            )
            if not results[base.key]["ok"]:
                raise PqdError(
                    f"plan baseline: {results[base.key]['problem']}", results[base.key]["fix"]
                )
        checkpoint = base_dir / "baseline.safetensors"

        # ---- 4. candidates and their estimates
        from pqd.checkpoint import load_checkpoint
        from pqd.recipe import PruneChannelsSpec

        digest = file_digest(checkpoint)
        trained_base = load_checkpoint(copy.deepcopy(fresh), checkpoint).cpu().eval()
        spec = PruneChannelsSpec.model_validate(pc)
        rng = np.random.default_rng(recipe.seed)
        perm = rng.permutation(len(data.train_x))
        calib_x = data.train_x[np.sort(perm[:calib_images])]
        val_x, val_y = data.val_x, data.val_y
        if not len(val_x):  # no validation split: training images the BN pass did not see
            rest = np.sort(perm[calib_images : calib_images + 500])
            val_x, val_y = data.train_x[rest], data.train_y[rest]

        def abn(r: Ratios) -> tuple[float, float]:
            return adaptive_bn_eval(trained_base, example, r, spec, calib_x, val_x, val_y)

        sens = cached_json(
            out_dir / SENSITIVITY_FILE,
            {
                "checkpoint": digest,
                "calib_images": calib_images,
                "seed": recipe.seed,
                "levels": list(lm.levels),
                "groups": dict(lm.groups),
                "round_to": spec.round_to,
                "exclude": list(spec.exclude),
                "data": recipe.data.model_dump(mode="json"),
                "val_images": len(val_x),
            },
            lambda: sensitivity_curves(lm, lambda r: abn(r)[1], search_levels(lm.levels), say),
        )

        def estimate(r: Ratios) -> float:
            return sensitivity_loss(sens, r)

        def select() -> dict[str, Any]:
            """Steps 3-4 (candidates, estimates, the uniform reference, screening, whole-file
            timing): the rows and which are trained."""
            cands = generate(lm, estimate, n_random, recipe.seed)

            # what a user does by hand, measured first: uniform pruning at the smallest ratio
            # whose whole file meets the budget; its window of uniform files near the budget also
            # calibrates the model there (scale = median measured / predicted)
            ref_ratio, ref_ms, uniform_ms = uniform_reference(
                lm, latency_ms, ratio_steps(spec.max_ratio), tolerance, dense_ref
            )
            scale = near_budget_scale(lm, uniform_ms, ref_ratio)
            rows: list[dict[str, Any]] = []
            for r in cands:
                pred = lm.predict(r)
                size = lm.predict_size_mb(r)
                feasible = pred * scale <= latency_ms and (size_mb is None or size <= size_mb)
                rows.append(
                    {
                        "ratios": r,
                        "predicted_ms": round(pred, 5),
                        "calibrated_ms": round(pred * scale, 5),
                        "predicted_size_mb": round(size, 4),
                        "estimated_loss": round(estimate(r), 6),
                        "feasible": feasible,
                    }
                )
            feasible = sorted(
                (row for row in rows if row["feasible"]),
                key=lambda row: (row["estimated_loss"], row["predicted_ms"]),
            )
            if not feasible:  # the model's error: the fastest measured met the budget
                fastest_row = min(rows, key=lambda row: float(row["predicted_ms"]))
                fastest_row["feasible"] = True
                feasible = [fastest_row]

            def screen_and_measure(pool: list[dict[str, Any]]) -> list[dict[str, Any]]:
                """Adaptive-BN ranking (validation loss) of the ``screen`` best of ``pool`` by
                the sensitivity estimate, and the best ``max(2k, 4)`` of those measured whole
                (the latency model's error must not put an over-budget candidate in training);
                the ones within the budget, best first."""
                screened = pool[:screen]
                say(f"adaptive-BN validation of the {len(screened)} best by sensitivity")
                for row in screened:
                    if "abn_loss" not in row:  # a re-screen meets rows the first one ranked
                        acc, loss = abn(row["ratios"])
                        row["abn_accuracy"], row["abn_loss"] = round(acc, 5), round(loss, 5)
                ranked = sorted(screened, key=lambda row: (row["abn_loss"], row["predicted_ms"]))
                head = ranked[: max(2 * k, 4)]
                times = measure_against_dense(
                    lm, {str(i): row["ratios"] for i, row in enumerate(head)}, dense_ref
                )
                for i, row in enumerate(head):
                    row["premeasured_ms"] = round(times[str(i)], 5)
                return [r for r in head if r["premeasured_ms"] <= latency_ms * (1 + tolerance)]

            chosen = screen_and_measure(feasible)[:k]
            if len(chosen) < k:  # the model under-predicted these: once more, scaled
                more = recalibrated(feasible, latency_ms, above=scale)
                if more:
                    say(f"latency model under-predicted by {more[0]['scale']:.2f}x: re-screening")
                    chosen += screen_and_measure(more)[: k - len(chosen)]
            else:  # the files ran faster than predicted: spend the budget they left
                wider = widened(rows, latency_ms, scale, tolerance)
                if wider:
                    over = scale / wider[0]["scale"]
                    say(f"latency model over-predicted by {over:.2f}x: re-screening")
                    more = screen_and_measure(wider)
                    both = sorted(chosen + more, key=lambda r: (r["abn_loss"], r["predicted_ms"]))
                    chosen = both[:k]
            # and always the hand-made answer (so the pick, by validation top-1, is never a worse
            # bet than it)
            ref = lm.uniform(1.0 - ref_ratio)
            same = next((r for r in rows if r["ratios"] == ref), None)
            ref_row = same or {
                "ratios": ref,
                "predicted_ms": round(lm.predict(ref), 5),
                "calibrated_ms": round(lm.predict(ref) * scale, 5),
                "predicted_size_mb": round(lm.predict_size_mb(ref), 4),
                "estimated_loss": round(estimate(ref), 6),
                "feasible": True,
            }
            if same is None:
                rows.append(ref_row)
            ref_row.update(uniform_reference=ref_ratio, premeasured_ms=round(ref_ms, 5))
            if all(r["ratios"] != ref for r in chosen):
                chosen.append(ref_row)
            return {
                "rows": rows,
                "chosen": [next(i for i, r in enumerate(rows) if r is c) for c in chosen],
                "scale": scale,
                "ref_ratio": ref_ratio,
                "ref_ms": ref_ms,
            }

        # a resumed plan trains what it chose before (timings on a noisy machine would
        # choose again, differently, and leave trained runs out of the pick)
        selection = cached_json(
            out_dir / SELECTION_FILE,
            {
                "checkpoint": digest,
                "latency_ms": latency_ms,
                "size_mb": size_mb,
                "k": k,
                "screen": screen,
                "selection": 2,  # 2: also widened when the whole files ran faster
                "n_random": n_random,
                "calib_images": calib_images,
                "tolerance": tolerance,
                "seed": recipe.seed,
                "architecture": lm.architecture_key(),
                "machine": lm.key,
            },
            select,
        )
        rows = selection["rows"]
        chosen = [rows[i] for i in selection["chosen"]]
        scale, ref_ratio, ref_ms = (
            selection["scale"],
            selection["ref_ratio"],
            selection["ref_ms"],
        )
        say(
            f"{len(rows)} candidates estimated, {sum(r['feasible'] for r in rows)} feasible by "
            f"the latency model (x{scale:.3f} from the uniform files); training {len(chosen)} "
            f"(uniform reference: ratio {ref_ratio:g}, measured {ref_ms:.3f} ms)"
        )

        # ---- 5. training through the normal pipeline, resumable
        from pqd.runs import Trial, trial_key

        trials = []
        for i, row in enumerate(chosen):
            job = candidate_recipe(
                base_data, index, row["ratios"], f"{recipe.name}-plan-{i}", str(checkpoint)
            )
            order = tuple(s.stage for s in job.stages)
            epochs = tuple(s.epochs for s in job.stages)
            key = trial_key(job, digest, data_root)
            trials.append(Trial("plan", order, job.seed, epochs, job, key))
            row["key"] = trials[-1].key
        todo, to_measure = [], []
        for t in trials:
            folder = out_dir / plan_folder(t)
            st = folder_status(folder, t.key)
            if st == "done":
                counts["reused"] += 1
            elif st == "trained":
                counts["reused"] += 1
                to_measure.append(folder)
            else:
                if st == "missing":  # a stopped one continues from its last step and epoch
                    reset_folder(folder, t)
                todo.append((t, folder))

        def finished(trial: Any, folder: Path, result: dict[str, Any]) -> None:
            if result["ok"]:
                counts["trained_now"] += 1
                to_measure.append(folder)
                say(f"trained {folder.name} in {result['seconds']:.0f} s")
            else:
                counts["failed"] += 1
                say(f"{folder.name} FAILED: {result['error']}")

        ex.run(todo, finished)
    from pqd.pipeline import measure_run

    for folder in to_measure:
        measure_run(folder, data_dir=data_root, progress=progress)

    # ---- 6. one panel of every final file, then the pick
    finals = {
        t.key: out_dir / plan_folder(t) / "final.onnx"
        for t in trials
        if (out_dir / plan_folder(t) / "record.json").is_file()
    }
    # with the dense network (exported as the latency model does): its p50 here scales the
    # panel to the dense time the budget was set against
    from pqd.latency_model.measure import export_as_shipped

    dense_file = out_dir / "reference" / f"dense-{precision}-{lm.architecture_key()}.onnx"
    if not dense_file.is_file():
        dense_file.parent.mkdir(parents=True, exist_ok=True)
        export_as_shipped(lm.candidate_model({}), example, dense_file, int8=precision == "int8")
    timed = files_against_dense(lm, finals, dense_file, dense_ref)
    panel, drift = timed.ms, dense_ref / timed.dense_raw_ms
    trained = []
    for row, t in zip(chosen, trials, strict=True):
        folder = out_dir / plan_folder(t)
        entry: dict[str, Any] = {**row, "dir": str(folder.relative_to(out_dir))}
        rec_path = folder / "record.json"
        if rec_path.is_file() and t.key in panel:
            final = json.loads(rec_path.read_text(encoding="utf-8"))["final"]
            entry.update(
                status="done",
                measured_ms=round(panel[t.key], 5),
                measured_raw_ms=round(panel[t.key] / drift, 5),
                measured_spread=round(timed.spread[t.key], 4),
                accuracy=final["accuracy"],
                val_accuracy=final.get("val_accuracy"),
                size_bytes=final["size_bytes"],
            )
        else:
            entry["status"] = "failed"
        trained.append(entry)
    ok = [e for e in trained if e["status"] == "done"]
    within = [e for e in ok if e["measured_ms"] <= latency_ms * (1 + tolerance)]
    pick, pick_rule = choose_pick(within, out_dir)
    result: dict[str, Any] = {
        "version": PLAN_VERSION,
        "recipe": recipe.name,
        "model": recipe.model.name,
        "budget": {"latency_ms": latency_ms, "size_mb": size_mb, "tolerance": tolerance},
        "runtime": runtime,
        "threads": threads,
        "precision": precision,
        "latency_model": {**lm.describe(), "validation": validation, "near_budget_scale": scale},
        "dense_ms": round(ends["dense"], 5),
        "final_panel_drift": round(drift, 4),
        "final_panels": FINAL_PANELS,
        "dense_file": str(dense_file.relative_to(out_dir)),
        "fastest_ms": round(ends["fastest"], 5),
        "counts": {
            "estimated": len(rows),
            "feasible": sum(r["feasible"] for r in rows),
            "trained": len(trained),
            **counts,
        },
        "candidates": rows,
        "trained": trained,
        "pick": pick,
        "pick_rule": pick_rule,
        "executor": executor,
        "timing_s": {"total": round(time.perf_counter() - t_start, 1)},
    }
    if pick is not None:
        pick_trial = next(t for t in trials if t.key == pick["key"])
        text = dump_recipe(pick_trial.recipe)
        (out_dir / PICK_FILE).write_text(
            f"# pqd plan's pick for {latency_ms:g} ms ({runtime}, {threads} threads): "
            f"pqd run {PICK_FILE} --out DIR reproduces it\n{text}",
            encoding="utf-8",
        )
        result["pick_recipe"] = PICK_FILE
    write_plan(result, out_dir)
    if pick is None:
        closest = min(ok, key=lambda e: e["measured_ms"]) if ok else None
        raise PlanError(
            f"no trained candidate met {latency_ms:g} ms when measured"
            + (f" (fastest: {closest['measured_ms']:.3f} ms)" if closest else " (all failed)"),
            f"see {out_dir / 'report.md'}; raise --latency-ms or -k, or re-run on a quieter "
            "machine",
        )
    return result


def choose_pick(
    within: list[dict[str, Any]], out_dir: Path, alpha: float = ALPHA
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The pick among the trained candidates that met the budget when measured.

    A planned candidate is picked only when its validation top-1 beats the uniform reference
    (the answer by hand) beyond noise: a paired comparison on the same validation images,
    exact McNemar, Holm-corrected over the planned candidates within the budget. The best
    of those by validation top-1 (then speed) is the pick; when none is, the uniform
    reference is. Without a uniform reference within the budget, the best by validation
    top-1. The pick's test top-1 is compared with the uniform reference's too (paired, on
    the test images), for the report: the test split never chooses.

    Args:
        within: trained, measured entries within the budget (``val_accuracy``,
            ``measured_ms``, ``dir`` relative to ``out_dir``, ``uniform_reference`` for the
            hand-made one).
        out_dir: the plan folder.
        alpha: family-wise level.

    Returns:
        ``(pick, rule)``: the pick's entry (or None) and what decided, with the comparisons.
    """
    from pqd.record import load_predictions

    def best(rows: list[dict[str, Any]]) -> dict[str, Any]:
        return max(rows, key=lambda e: (e["val_accuracy"] or 0.0, -e["measured_ms"]))

    if not within:
        return None, {"rule": "no candidate met the budget"}
    uniform = next((e for e in within if e.get("uniform_reference") is not None), None)
    planned = [e for e in within if e is not uniform]
    if uniform is None or not planned:
        return best(within), {"rule": "best validation top-1 (no uniform reference to beat)"}
    ref_val = load_predictions(out_dir / uniform["dir"], "val")
    tested: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for e in planned:
        val = load_predictions(out_dir / e["dir"], "val")
        if val is None or ref_val is None or len(val["labels"]) != len(ref_val["labels"]):
            continue
        vs = compare_paired(val["final"], ref_val["final"], val["labels"])
        tested.append((e, vs.as_dict()))
    if not tested:
        return best(within), {"rule": "best validation top-1 (no validation predictions)"}
    adjusted = holm([c["p_value"] for _, c in tested])
    beyond = []
    comparisons = []
    for (e, c), p_adj in zip(tested, adjusted, strict=True):
        wins = p_adj < alpha and c["difference"] > 0
        comparisons.append({"dir": e["dir"], **c, "p_holm": round(p_adj, 6), "beyond_noise": wins})
        if wins:
            beyond.append(e)
    pick = best(beyond) if beyond else uniform
    rule = {
        "rule": (
            "planned candidate: validation top-1 above the uniform reference beyond noise"
            if beyond
            else "uniform reference: no planned candidate beat it beyond noise on validation"
        ),
        "alpha": alpha,
        "validation_vs_uniform": comparisons,
    }
    if pick is not uniform:
        test_pick = load_predictions(out_dir / pick["dir"])
        test_ref = load_predictions(out_dir / uniform["dir"])
        if test_pick is not None and test_ref is not None:
            t = compare_paired(test_pick["final"], test_ref["final"], test_pick["labels"])
            rule["test_vs_uniform"] = {**t.as_dict(), "verdict": t.verdict("pick", "uniform")}
    return pick, rule
