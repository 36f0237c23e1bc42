"""``pqd search`` itself: the shared baseline, every trial through an executor, each
measured on the driver, then the summary (:func:`run_search`)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pqd.errors import PqdError
from pqd.recipe import Recipe
from pqd.runs import (
    Executor,
    Trial,
    check_executor,
    file_digest,
    folder_status,
    refuse_other_baseline,
    reset_folder,
)
from pqd.search.summary import summarize, write_search
from pqd.search.trials import baseline_trial, order_label, plan_trials, say, search_budget

# ---------------------------------------------------------------------------- the search


def run_search(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    data_dir: str | None = None,
    executor: str = "sequential",
    workers: int | None = None,
    address: str | None = None,
    progress: bool = True,
    fresh: bool = False,
) -> dict[str, Any]:
    """Run (or resume) the search of ``recipe`` into ``out_dir``; returns search.json's data.

    A finished baseline of another recipe in ``out_dir`` is refused (one line, nothing
    written) unless ``fresh``, which retrains the baseline there; trial folders are keyed by
    their recipe, so other recipes' trials stay where they are."""
    from pqd.pipeline import check_recipe_data, check_runtimes

    t_start = time.perf_counter()
    if recipe.search is None:
        search_budget(recipe)  # raises the one-line error
    executor = check_executor(executor, workers, address)
    check_runtimes(recipe)
    out = Path(out_dir).resolve()
    data_root = str(check_recipe_data(recipe, data_dir).path)
    base = baseline_trial(recipe, data_root)
    if not fresh:
        refuse_other_baseline(out / base.folder, base.key)
    stats = {"trained": 0, "reused": 0, "failed": 0, "measured": 0}
    results: dict[str, dict[str, Any]] = {}  # key -> train result (this invocation)
    timing = {"train": 0.0, "measure": 0.0}

    def measure(folder: Path) -> None:
        from pqd.pipeline import measure_run

        t0 = time.perf_counter()
        measure_run(
            folder,
            data_dir=data_root,
            progress=progress,
            where=f"driver ({socket.gethostname()}), sequential: one run at a time, "
            "never while a trial trains",
        )
        timing["measure"] += time.perf_counter() - t0
        stats["measured"] += 1

    with Executor(executor, workers, address, data_root, progress) as ex:
        out.mkdir(parents=True, exist_ok=True)  # only once the executor is up: nothing is
        # left behind when it cannot start
        # ---- the shared baseline
        base_dir = out / base.folder
        status = folder_status(base_dir, base.key)
        if status in ("missing", "partial"):
            from pqd.progress import plural

            ckpt = recipe.baseline.checkpoint
            what = (
                f"loading {ckpt}" if ckpt else f"training {plural(recipe.baseline.epochs, 'epoch')}"
            )
            if status == "partial":  # stopped while training: it continues
                what = f"continuing ({what})"
            else:
                reset_folder(base_dir, base)
            say(f"baseline: {what} into {base_dir}")
            t0 = time.perf_counter()
            ex.run(
                [(base, base_dir)], lambda t, f, r: results.__setitem__(t.key, r), local_first=True
            )
            timing["train"] += time.perf_counter() - t0
            failure = results[base.key]
            if not failure["ok"]:
                raise PqdError(f"search baseline: {failure['problem']}", failure["fix"])
            stats["trained"] += 1
        else:
            stats["reused"] += 1
        if folder_status(base_dir, base.key) == "trained":
            measure(base_dir)
        checkpoint = base_dir / "baseline.safetensors"
        trials = plan_trials(recipe, str(checkpoint), file_digest(checkpoint), data_root)

        # ---- trials: unique runs, reuse finished ones
        runs: dict[str, Trial] = {}
        for t in trials:
            runs.setdefault(t.key, t)
        todo, to_measure = [], []
        for key, t in runs.items():
            st = folder_status(out / t.folder, key)
            if st == "done":
                stats["reused"] += 1
            elif st == "trained":
                to_measure.append(out / t.folder)
                stats["reused"] += 1
            else:
                todo.append((t, out / t.folder))
        say(
            f"{len(trials)} trials ({_count(trials)}) in {len(runs)} runs, "
            f"{len(runs) - len(todo)} reused; executor {executor}"
        )

        n_todo = len(todo)

        def finished(trial: Trial, folder: Path, result: dict[str, Any]) -> None:
            results[trial.key] = result
            i = len([k for k in results if k != base.key])
            what = (
                f"{result['seconds']:.0f} s on {result['host']}"
                if result["ok"]
                else f"FAILED: {result['error']}"
            )
            say(
                f"[{i}/{n_todo}] {trial.kind} {order_label(trial.order)} seed {trial.seed} "
                f"(epochs {'/'.join(map(str, trial.epochs))}): {what}"
            )
            if result["ok"]:
                stats["trained"] += 1
                if executor == "sequential":
                    measure(folder)  # nothing else runs now
                else:
                    to_measure.append(folder)
            else:
                stats["failed"] += 1
                from pqd.checkpoint import atomic_write_text

                atomic_write_text(folder / "failed.json", json.dumps(result, indent=2))

        for trial, folder in todo:
            if folder_status(folder, trial.key) == "missing":  # a stopped one continues
                reset_folder(folder, trial)
        t0, m0 = time.perf_counter(), timing["measure"]
        ex.run(todo, finished)
        timing["train"] += time.perf_counter() - t0 - (timing["measure"] - m0)
        executor_info = ex.describe()
    # ---- measurement of everything trained elsewhere, one run at a time, then the panel
    for folder in to_measure:
        say(f"measuring {folder.relative_to(out)}")
        measure(folder)
    t0 = time.perf_counter()
    search = summarize(recipe, out, base, trials, executor_info, progress=progress)
    timing["panel"] = time.perf_counter() - t0
    search["runs"].update(
        trained_now=stats["trained"], reused=stats["reused"], failed=stats["failed"]
    )
    search["timing_s"] = {
        "train": round(timing["train"], 1),
        "measure": round(timing["measure"], 1),
        "panel": round(timing["panel"], 1),
        "total": round(time.perf_counter() - t_start, 1),
    }
    write_search(search, out)
    return search


def _count(trials: Sequence[Trial]) -> str:
    kinds = [t.kind for t in trials]
    return ", ".join(
        f"{kinds.count(k)} {k}" for k in ("permutation", "pairwise", "reference") if k in kinds
    )
