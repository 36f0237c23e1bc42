"""Resume: a run folder remembers every finished step, so a killed run continues where it was.

After the baseline and after every stage the pipeline writes the step's checkpoint and
appends the step's record entry to ``progress.json``; inside a step, the shared fit loop
checkpoints after every epoch (model, masks, optimizer, epoch, loader and torch RNG states).
Every file is written atomically (temporary file, fsync, rename), so a kill at any instant
leaves either the old or the new version. Layout of the run folder::

    progress.json                      recipe hash, finished steps with their record entries
    baseline.safetensors               the baseline (also the KD teacher)
    checkpoints/01-prune.safetensors   state after stage 1: weights (+ masks), metadata
    checkpoints/02-quantize.epoch.safetensors   mid-stage state, removed when the stage ends

What a checkpoint file holds, and how a quantized or channel-pruned state is rebuilt from
it, is :mod:`pqd.step_state`.

Each step carries a fingerprint of the recipe parts it depends on (:mod:`pqd.fingerprint`:
model, data, seed, train, baseline, the stages up to it): re-running the same recipe into
the same ``--out`` continues it; another recipe there is refused unless ``--resume`` (keep
the finished steps whose fingerprint still matches, e.g. after lowering a later stage's lr)
or ``--fresh``.
Everything is safetensors + JSON: resuming never unpickles anything.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from pqd.checkpoint import atomic_write_text
from pqd.errors import CheckpointError, PqdError
from pqd.fingerprint import fingerprints, sha
from pqd.recipe import Recipe
from pqd.step_state import load_epoch, save_epoch
from pqd.train import FitProgress

PROGRESS = "progress.json"
PROGRESS_VERSION = 1
# what a run writes into its folder; --fresh removes exactly these
RUN_FILES = (
    "progress.json",
    "record.json",
    "report.md",
    "recipe.yaml",
    "baseline.safetensors",
    "baseline.onnx",
    "baseline.onnx.data",
    "final.onnx",
    "predictions.npz",
    "val_predictions.npz",
    "final.onnx.data",
    "pending.json",
    "reference_logits.npz",
)
# test hook: "STEP:EPOCH" (STEP 0 = baseline, i = stage i) pauses after that epoch's checkpoint
PAUSE_ENV = "PQD_TEST_PAUSE_AFTER_EPOCH"


class RunFolderError(PqdError):
    """The --out folder holds another recipe's run, or its progress file is unreadable."""


def note(message: str) -> None:
    """A one-line status message on stderr (what resume reuses and where it continues)."""
    print(f"pqd: {message}", file=sys.stderr, flush=True)


def step_name(recipe: Recipe, step: int) -> str:
    """``00-baseline``, ``01-prune``, ... (step i + 1 is stage i)."""
    return "00-baseline" if step == 0 else f"{step:02d}-{recipe.stages[step - 1].stage}"


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    """Dotted key paths where two plain-data trees differ: changed values first, then keys
    only one side has (e.g. options a newer pqd added, with their defaults)."""
    changed: list[str] = []
    one_sided: list[str] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b), key=str):
                sub = f"{path}.{k}" if path else str(k)
                if (k in a) != (k in b):
                    one_sided.append(sub)
                else:
                    walk(a[k], b[k], sub)
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                walk(x, y, f"{path}.{i}")
        elif a != b:
            changed.append(path or "(top level)")

    walk(a, b, path)
    return changed + one_sided


@dataclass
class RunFolder:
    """The --out folder of one recipe's run: what is finished, where to continue."""

    out: Path
    recipe: Recipe
    prints: list[str]
    steps: list[dict[str, Any]] = field(default_factory=list)  # finished, in order
    complete: bool = False
    continued: dict[str, int] = field(default_factory=dict)  # step -> epoch it continued from
    # step -> its wall seconds in the processes before this one (through its last epoch
    # checkpoint): a continued step's record counts them too
    carried: dict[str, float] = field(default_factory=dict, init=False, repr=False)
    # how many finished steps the folder held when this process opened it
    _opened_with: int = field(default=0, init=False, repr=False)
    # step -> when this process began it
    _began: dict[int, float] = field(default_factory=dict, init=False, repr=False)
    api: bool = False  # refusals in pqd.compress's words (out=, fresh=True), not the CLI's

    @classmethod
    def open(
        cls,
        out: Path,
        recipe: Recipe,
        *,
        resume: bool = False,
        fresh: bool = False,
        api: bool = False,
    ) -> RunFolder:
        """Read ``out``'s progress and decide what to keep (see module doc); refuses another
        recipe's run unless ``resume`` or ``fresh`` (``api``: in the Python API's words).
        Writes nothing."""
        ckpt = recipe.baseline.checkpoint
        if ckpt and not Path(ckpt).is_file():  # (before the fingerprints name it by its bytes)
            raise CheckpointError(
                f"baseline checkpoint {ckpt!r} does not exist (the run folder is left as it is)",
                "give the path of a .safetensors, .pt, .pth or .bin file in baseline.checkpoint",
            )
        folder = cls(out=out, recipe=recipe, prints=fingerprints(recipe), api=api)
        if fresh:
            return folder
        progress = read_progress(out)
        recipe_now = recipe.model_dump(mode="json")
        if progress is None:
            saved = out / "recipe.yaml"
            if saved.is_file() and not resume:
                import yaml

                try:
                    before = yaml.safe_load(saved.read_text(encoding="utf-8"))
                except (yaml.YAMLError, UnicodeDecodeError):
                    before = None
                if before != recipe_now:
                    folder._refuse(_diff(before, recipe_now), resumable=False)
            return folder
        same = progress.get("recipe_sha256") == sha(recipe_now)
        if not same and not resume:
            folder._refuse(_diff(progress.get("recipe"), recipe_now), resumable=True)
        steps = progress.get("steps")
        for i, entry in enumerate(steps if isinstance(steps, list) else []):
            if not isinstance(entry, dict) or i >= len(folder.prints):
                break  # (a malformed entry: the steps from there on are redone)
            if entry.get("fingerprint") != folder.prints[i]:
                break
            folder.steps.append(entry)
        folder._opened_with = len(folder.steps)
        folder.complete = (
            same and bool(progress.get("complete")) and (out / "record.json").is_file()
        )
        return folder

    def _refuse(self, changed: list[str], *, resumable: bool) -> None:
        shown = ", ".join(changed[:3]) + (
            f" (+{len(changed) - 3} more)" if len(changed) > 3 else ""
        )
        if self.api:  # pqd.compress's words
            raise RunFolderError(
                f"out={str(self.out)!r} holds a run with other inputs (differs in: {shown})",
                "pass another out=, or fresh=True to start over in it",
            )
        keep = ", --resume to keep its finished steps that the change does not touch"
        raise RunFolderError(
            f"--out {self.out} holds the run of a different recipe (differs in: {shown})",
            f"use another --out{keep if resumable else ''}, or --fresh to start over in it",
        )

    # ------------------------------------------------------------------ writing

    def start(self, fresh: bool) -> None:
        """Prepare the folder: with ``fresh`` remove an earlier run's files; an unfinished run
        never leaves a record.json that looks complete."""
        self.out.mkdir(parents=True, exist_ok=True)
        if fresh:
            for name in RUN_FILES:
                (self.out / name).unlink(missing_ok=True)
            shutil.rmtree(self.out / "checkpoints", ignore_errors=True)
        for name in ("record.json", "report.md", "pending.json"):
            (self.out / name).unlink(missing_ok=True)
        self._write(complete=False)
        if self.steps:
            note(
                f"resuming {self.recipe.name!r} in {self.out}: finished "
                + ", ".join(e["step"] for e in self.steps)
                + " (not recomputed)"
            )

    def _write(self, *, complete: bool) -> None:
        recipe = self.recipe.model_dump(mode="json")
        data = {
            "progress_version": PROGRESS_VERSION,
            "name": self.recipe.name,
            "recipe_sha256": sha(recipe),
            "recipe": recipe,
            "complete": complete,
            "steps": self.steps,
        }
        atomic_write_text(self.out / PROGRESS, json.dumps(data, indent=2))

    def finish(self, step: int, checkpoint: str, entry: dict[str, Any]) -> None:
        """Record step ``step`` as finished (its checkpoint is already on disk)."""
        self.steps.append(
            {
                "step": step_name(self.recipe, step),
                "fingerprint": self.prints[step],
                "checkpoint": checkpoint,
                "record": entry,
            }
        )
        self._write(complete=False)
        path = epoch_path(self.out, self.recipe, step)
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".paused").unlink(missing_ok=True)

    @classmethod
    def adopt(cls, out: Path, recipe: Recipe, donor: Path, steps: list[dict[str, Any]]) -> None:
        """Start ``out`` (a fresh run folder of ``recipe``) from finished steps of another run:
        their checkpoints copied from ``donor`` and listed in ``out``'s progress, so that the
        run continues after them as after a stop (its record lists them in
        ``resume.reused_steps``).

        Args:
            out: the fresh run folder.
            recipe: its recipe.
            donor: the run folder the steps come from.
            steps: :func:`shared_steps` of ``donor`` and ``recipe``.
        """
        for entry in steps:
            target = out / entry["checkpoint"]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(donor / entry["checkpoint"], target)
        folder = cls(out=out, recipe=recipe, prints=fingerprints(recipe))
        # (marked: their seconds were spent on the donor's run, not on this one)
        folder.steps = [{**e, "adopted_from": donor.name} for e in steps]
        folder._write(complete=False)

    def earlier_seconds(self) -> float:
        """Wall seconds this run spent in processes before this one: its finished steps'
        (not those adopted from another run) and its continued steps' up to their last epoch
        checkpoint.

        Returns:
            Seconds (0.0 for a run that started in this process).
        """
        finished = sum(
            float(e.get("record", {}).get("seconds", 0.0))
            for e in self.steps[: self._opened_with]
            if "adopted_from" not in e
        )
        return finished + sum(self.carried.values())

    def mark_complete(self) -> None:
        """record.json is written: a re-run of the same recipe has nothing left to do."""
        self._write(complete=True)

    def entry(self, step: int) -> dict[str, Any] | None:
        """The record entry of finished step ``step``, else None."""
        return self.steps[step]["record"] if step < len(self.steps) else None

    def begin(self, step: int) -> None:
        """Step ``step`` starts now in this process: its epoch checkpoints count its wall
        seconds from here (set up, calibration and training alike). Called before
        :meth:`epoch_hooks`; a second call for the same step keeps the first time."""
        self._began.setdefault(step, time.perf_counter())

    def epoch_hooks(
        self,
        step: int,
        model: nn.Module,
        masks: dict[str, torch.Tensor],
        hook_state: dict[str, Any] | None = None,
        desc: str = "",
        call: int = 0,
    ) -> tuple[FitProgress | None, Callable[[FitProgress], None]]:
        """(progress to resume ``fit`` from or None, ``on_epoch`` saver) for fit call ``call``
        of step ``step``.

        Restores ``model``'s weights, ``masks`` (in place) and ``hook_state`` (in place) when
        this step has an epoch checkpoint written by the same recipe and fit call."""
        path = epoch_path(self.out, self.recipe, step)
        fingerprint = f"{self.prints[step]}:{call}"
        name = step_name(self.recipe, step)
        start = None
        if path.is_file():
            start = load_epoch(path, fingerprint, model, masks, hook_state)
            if start is not None:
                self.continued[name] = start.epoch
                self.carried[name] = start.seconds
                note(f"{desc or name}: continuing after epoch {start.epoch} (from {path.name})")

        def on_epoch(progress: FitProgress) -> None:
            progress.seconds = self.carried.get(name, 0.0) + time.perf_counter() - self._began[step]
            save_epoch(path, fingerprint, model, masks, progress, hook_state)
            _test_pause(step, progress.epoch, path)

        return start, on_epoch


def read_progress(out: Path) -> dict[str, Any] | None:
    """The progress file of the run folder ``out`` (the one reader of ``progress.json``).

    Args:
        out: a run folder.

    Returns:
        Its content; None when there is none (nothing begun) or it holds no object.

    Raises:
        RunFolderError: the file exists but cannot be read or parsed.
    """
    path = out / PROGRESS
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise RunFolderError(
            f"{path} is unreadable ({type(exc).__name__})",
            "run with --fresh to start over in that folder",
        ) from None
    return data if isinstance(data, dict) else None


def shared_steps(donor: Path, recipe: Recipe) -> list[dict[str, Any]]:
    """The finished steps of the run in ``donor`` that ``recipe`` would compute the same:
    the longest run of steps from the baseline on whose fingerprints match ``recipe``'s
    and whose checkpoint is in the folder (a search's pairwise run A->B is the first two
    stages of the permutation A->B->C, and orders that start alike share their first stage).

    Args:
        donor: another run folder.
        recipe: the recipe about to run.

    Returns:
        Their progress entries, in step order (empty when unreadable or nothing matches).
    """
    try:
        kept = RunFolder.open(donor, recipe, resume=True).steps  # fingerprints that match
    except RunFolderError:
        return []
    shared = []
    for entry in kept:
        ckpt = entry.get("checkpoint")
        if not isinstance(ckpt, str) or Path(ckpt).is_absolute() or ".." in Path(ckpt).parts:
            break
        if not (donor / ckpt).is_file():
            break
        shared.append(entry)
    return shared


def epoch_path(out: Path, recipe: Recipe, step: int) -> Path:
    """Where step ``step`` keeps its per-epoch checkpoint."""
    return out / "checkpoints" / f"{step_name(recipe, step)}.epoch.safetensors"


def _test_pause(step: int, epoch: int, path: Path) -> None:
    """Test hook (``PQD_TEST_PAUSE_AFTER_EPOCH=STEP:EPOCH``): announce and wait to be killed."""
    if os.environ.get(PAUSE_ENV) == f"{step}:{epoch}":
        path.with_name(path.name + ".paused").write_text("paused\n")
        time.sleep(600)
