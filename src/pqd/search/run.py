"""``pqd search`` itself: the shared baseline, every trial through an executor, each
measured on the driver, then the summary (:func:`run_search`)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pqd.checkpoint import atomic_write_text
from pqd.errors import PqdError
from pqd.executors import Executor, check_executor
from pqd.fingerprint import file_digest
from pqd.recipe import Recipe
from pqd.runs import (
    TRIALS_FILE,
    Sharing,
    Trial,
    folder_status,
    refuse_other_baseline,
    reset_folder,
    start_from_siblings,
)
from pqd.search.summary import step_seconds, summarize, write_search
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
    return SearchRun(recipe, out_dir, data_dir, executor, workers, address, progress).run(fresh)


class SearchRun:
    """One call of :func:`run_search`: its checked inputs, counts and timings, and its steps
    (the baseline, the trials, the measurement), each a method."""

    def __init__(
        self,
        recipe: Recipe,
        out_dir: str | Path,
        data_dir: str | None,
        executor: str,
        workers: int | None,
        address: str | None,
        progress: bool,
    ) -> None:
        from pqd.pipeline import check_recipe_data, check_runtimes

        self.t_start = time.perf_counter()
        if recipe.search is None:
            search_budget(recipe)  # raises the one-line error
        self.executor = check_executor(executor, workers, address)
        check_runtimes(recipe)
        self.recipe, self.workers, self.address, self.progress = recipe, workers, address, progress
        self.out = Path(out_dir).resolve()
        self.data_root = str(check_recipe_data(recipe, data_dir).path)
        self.base = baseline_trial(recipe, self.data_root)
        self.stats = {"trained": 0, "reused": 0, "failed": 0, "measured": 0, "shared_steps": 0}
        self.results: dict[str, dict[str, Any]] = {}  # key -> train result (this invocation)
        self.timing = {"train": 0.0, "measure": 0.0}

    def run(self, fresh: bool) -> dict[str, Any]:
        """Every step in order; search.json's data (see :func:`run_search`)."""
        out = self.out
        if not fresh:
            refuse_other_baseline(out / self.base.folder, self.base.key)
        with Executor(
            self.executor, self.workers, self.address, self.data_root, self.progress
        ) as ex:
            out.mkdir(parents=True, exist_ok=True)  # only once the executor is up: nothing
            # is left behind when it cannot start
            checkpoint = self.baseline(ex)
            trials = plan_trials(
                self.recipe, str(checkpoint), file_digest(checkpoint), self.data_root
            )
            to_measure = self.train(ex, trials)
            executor_info = ex.describe()
        # measurement of everything trained elsewhere, one run at a time, then the panel
        for folder in to_measure:
            say(f"measuring {folder.relative_to(out)}")
            self.measure(folder)
        t0 = time.perf_counter()
        search = summarize(
            self.recipe, out, self.base, trials, executor_info, progress=self.progress
        )
        self.timing["panel"] = time.perf_counter() - t0
        search["runs"].update(
            trained_now=self.stats["trained"],
            reused=self.stats["reused"],
            failed=self.stats["failed"],
            shared_stages=self.stats["shared_steps"],
        )
        search["timing_s"] = {
            "train": round(self.timing["train"], 1),
            "measure": round(self.timing["measure"], 1),
            "panel": round(self.timing["panel"], 1),
            "total": round(time.perf_counter() - self.t_start, 1),
            # every invocation's training, from the run folders' step records
            "steps": step_seconds([out / self.base.folder, *(out / t.folder for t in trials)]),
        }
        write_search(search, out)
        return search

    def measure(self, folder: Path) -> None:
        """Measure one trained run folder here, on the driver (never while a trial trains)."""
        from pqd.pipeline import measure_run

        t0 = time.perf_counter()
        measure_run(
            folder,
            data_dir=self.data_root,
            progress=self.progress,
            where=f"driver ({socket.gethostname()}), sequential: one run at a time, "
            "never while a trial trains",
        )
        self.timing["measure"] += time.perf_counter() - t0
        self.stats["measured"] += 1

    def baseline(self, ex: Executor) -> Path:
        """The shared baseline: trained (or continued, or loaded) once, measured; its
        checkpoint file."""
        base, recipe = self.base, self.recipe
        base_dir = self.out / base.folder
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
                [(base, base_dir)],
                lambda t, f, r: self.results.__setitem__(t.key, r),
                local_first=True,
            )
            self.timing["train"] += time.perf_counter() - t0
            failure = self.results[base.key]
            if not failure["ok"]:
                raise PqdError(f"search baseline: {failure['problem']}", failure["fix"])
            self.stats["trained"] += 1
        else:
            self.stats["reused"] += 1
        if folder_status(base_dir, base.key) == "trained":
            self.measure(base_dir)
        return base_dir / "baseline.safetensors"

    def train(self, ex: Executor, trials: list[Trial]) -> list[Path]:
        """Every unique trial run not finished before, trained through the executor
        (measured right away when sequential); the folders left to measure."""
        out = self.out
        runs: dict[str, Trial] = {}
        for t in trials:
            runs.setdefault(t.key, t)
        todo, to_measure = [], []
        for key, t in runs.items():
            st = folder_status(out / t.folder, key)
            if st in ("done", "trained"):
                self.stats["reused"] += 1
                if st == "trained":
                    to_measure.append(out / t.folder)
            else:
                todo.append((t, out / t.folder))
        say(
            f"{len(trials)} trials ({_count(trials)}) in {len(runs)} runs, "
            f"{len(runs) - len(todo)} reused; executor {self.executor}"
        )
        n_todo = len(todo)

        def finished(trial: Trial, folder: Path, result: dict[str, Any]) -> None:
            self.results[trial.key] = result
            i = len([k for k in self.results if k != self.base.key])
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
                sharing.finished.append(trial)
            if not result["ok"]:
                self.stats["failed"] += 1
                atomic_write_text(folder / "failed.json", json.dumps(result, indent=2))
                return
            self.stats["trained"] += 1
            if self.executor == "sequential":
                self.measure(folder)  # nothing else runs now
            else:
                to_measure.append(folder)

        for trial, folder in todo:
            if folder_status(folder, trial.key) == "missing":  # a stopped one continues
                reset_folder(folder, trial)
        listed = [{"key": t.key, "folder": t.folder} for t in runs.values()]
        atomic_write_text(out / TRIALS_FILE, json.dumps(listed, indent=1))  # (pqd report)
        siblings = [out / t.folder for t in runs.values()]

        def starting(trial: Trial, folder: Path) -> None:
            taken = start_from_siblings(folder, trial, [s for s in siblings if s != folder])
            if taken:
                self.stats["shared_steps"] += len(taken) - 1  # (stages; the baseline is loaded)
                say(
                    f"{trial.kind} {order_label(trial.order)} seed {trial.seed}: "
                    f"{', '.join(taken[1:])} shared with another order (not trained again)"
                )

        # finished trials offer their stages to the ones after them (processes, Ray: a
        # trial that a running one trains every step of waits for it; see Sharing)
        sharing = Sharing([t for t in runs.values() if all(t is not job for job, _ in todo)])
        t0, m0 = time.perf_counter(), self.timing["measure"]
        ex.run(
            todo,
            finished,
            starting=starting,
            order=sharing.level,
        )
        self.timing["train"] += time.perf_counter() - t0 - (self.timing["measure"] - m0)
        return to_measure


def _count(trials: Sequence[Trial]) -> str:
    kinds = [t.kind for t in trials]
    return ", ".join(
        f"{kinds.count(k)} {k}" for k in ("permutation", "pairwise", "reference") if k in kinds
    )
