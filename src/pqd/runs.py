"""Trials as run folders: what ``pqd search`` and ``pqd plan`` share.

A trial is an ordinary, fully resolved recipe keyed by a hash of what decides its result
(:func:`trial_key`); its folder is ``done``, ``trained``, ``partial`` (stopped while
training: it continues) or ``missing`` (:func:`folder_status`). Trials that compute the same
first stages share them (:func:`start_from_siblings`, :class:`Sharing`);
:mod:`pqd.executors` trains them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pqd.errors import PqdError
from pqd.recipe import Recipe, stable_dump

KEY_VERSION = 1  # bump when a change makes old trial folders unusable
TRIAL_FILE = "trial.json"
TRIALS_FILE = "trials.json"  # in a search folder: the current recipe's trial folders


@dataclass(frozen=True)
class Trial:
    """One entry of the search: a kind, a stage order, a seed, and the run that gives it.

    Entries whose resolved recipes are equal share one run (same ``key``, same folder): with
    two stages, the pairwise run A->B is the permutation A->B.
    """

    kind: str  # baseline | permutation | pairwise | reference
    order: tuple[str, ...]
    seed: int
    epochs: tuple[int, ...]
    recipe: Recipe
    key: str

    @property
    def group(self) -> str:
        """Id shared by the seeds of one kind and order, e.g. ``permutation:prune>quantize``."""
        return "baseline" if self.kind == "baseline" else f"{self.kind}:{'>'.join(self.order)}"

    @property
    def folder(self) -> str:
        """Run folder relative to the search folder."""
        if self.kind == "baseline":
            return "baseline"
        return f"trials/{'-'.join(self.order)}-s{self.seed}-{self.key[:10]}"


def trial_key(recipe: Recipe, checkpoint_digest: str | None, data_root: str) -> str:
    """Hash of everything that decides a run's result: the resolved recipe (without its name,
    with the baseline checkpoint's content hash in place of its path) and the data folder."""
    data = stable_dump(recipe)  # fields at their defaults left out: new ones change nothing
    data.pop("name", None)
    data.pop("search", None)
    data.get("data", {}).pop("download", None)  # where the files came from, not what they are
    if not data.get("data"):
        data.pop("data", None)  # all at defaults: as if never written
    if data.get("baseline", {}).get("checkpoint"):
        data["baseline"]["checkpoint"] = checkpoint_digest
    blob = json.dumps(
        {"v": KEY_VERSION, "recipe": data, "data_root": data_root},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


# ---------------------------------------------------------------------------- trial folders


def folder_status(folder: Path, key: str) -> str:
    """``done`` (record.json measured), ``trained`` (exported, awaiting measurement),
    ``partial`` (this key's run, stopped while training: it continues from its last
    finished step and epoch) or ``missing`` (absent or another key's: to be redone)."""
    from pqd.pipeline import PENDING_FILE, REFERENCE_FILE

    try:
        if json.loads((folder / TRIAL_FILE).read_text(encoding="utf-8")).get("key") != key:
            return "missing"
    except (OSError, ValueError):
        return "missing"
    try:
        record = json.loads((folder / "record.json").read_text(encoding="utf-8"))
        if "p50" in record["final"]["latency_ms"] and "accuracy" in record["final"]:
            return "done"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    needed = (PENDING_FILE, REFERENCE_FILE, "baseline.onnx", "final.onnx")
    if all((folder / f).is_file() for f in needed):
        return "trained"
    from pqd.resume import PROGRESS

    return "partial" if (folder / PROGRESS).is_file() else "missing"


def unfinished_text(out: Path) -> str | None:
    """How far an unfinished run in ``out`` has come, in words (for ``pqd report`` and a
    search's progress): its finished steps and the step that continues after an epoch,
    e.g. ``"finished 00-baseline, 01-prune; 02-quantize stopped after epoch 3 of 4"``.

    Args:
        out: a run folder.

    Returns:
        None when ``out`` holds no progress (nothing begun) or a complete run.
    """
    from pqd.resume import RunFolderError, read_progress

    try:
        progress = read_progress(out)
        if progress is None:
            return None
        steps = [str(e["step"]) for e in progress.get("steps", [])]
        recipe = progress.get("recipe") or {}
    except (RunFolderError, TypeError, KeyError, AttributeError):
        return None  # (an unreadable file: the run itself says so when it continues)
    if progress.get("complete") and (out / "record.json").is_file():
        return None
    parts = [f"finished {', '.join(steps)}" if steps else "no step finished"]
    from safetensors import SafetensorError, safe_open

    for path in sorted((out / "checkpoints").glob("*.epoch.safetensors")):
        name = path.name.split(".")[0]  # e.g. 02-quantize
        try:
            with safe_open(str(path), "pt") as f:
                epoch = int(json.loads((f.metadata() or {})["pqd"])["epoch"])
            i = int(name.split("-")[0])
            spec = recipe["baseline"] if i == 0 else recipe["stages"][i - 1]
            # (an iterative schedule counts the epochs of each cycle: no "of N")
            whole = spec.get("epochs") and spec.get("schedule") != "iterative"
            of = f" of {spec['epochs']}" if whole else ""
        except (OSError, ValueError, KeyError, IndexError, TypeError, SafetensorError):
            continue
        parts.append(f"{name} stopped after epoch {epoch}{of}")
    return "; ".join(parts)


def search_progress(out: Path) -> str | None:
    """How far the search in ``out`` has come, in words (``pqd report`` before search.json
    exists): its trials by state, and where each stopped one continues
    (:func:`unfinished_text`).

    Args:
        out: a ``pqd search`` folder.

    Returns:
        None when ``out`` holds no search (no baseline or trial folders).
    """
    if not (out / "baseline" / TRIAL_FILE).is_file():
        return None
    base = folder_status(out / "baseline", _key(out / "baseline"))
    if base != "done":
        stopped = unfinished_text(out / "baseline")
        return "the baseline is not finished" + (f" ({stopped})" if stopped else "")
    states: dict[str, int] = {}
    stopped_at = []
    try:  # the current recipe's trials (other recipes' trial folders are kept beside them)
        listed = json.loads((out / TRIALS_FILE).read_text(encoding="utf-8"))
        folders = [out / str(t["folder"]) for t in listed]
    except (OSError, ValueError, KeyError, TypeError):
        folders = [t.parent for t in sorted((out / "trials").glob(f"*/{TRIAL_FILE}"))]
    for folder in folders:
        state = folder_status(folder, _key(folder))
        if state not in ("done", "trained") and (folder / "failed.json").is_file():
            state = "failed"  # (in the last invocation; a re-run tries it again)
        states[state] = states.get(state, 0) + 1
        text = unfinished_text(folder) if state == "partial" else None
        if text and "stopped after" in text:
            stopped_at.append(f"{folder.name}: {text}")
    words = {
        "done": "done",
        "trained": "trained (awaiting measurement)",
        "partial": "begun",
        "missing": "not begun",
        "failed": "failed",
    }
    counts = ", ".join(f"{states[k]} {w}" for k, w in words.items() if states.get(k))
    total = sum(states.values())
    return f"{states.get('done', 0)} of {total} trials done ({counts})" + "".join(
        f"; {t}" for t in stopped_at
    )


def _key(folder: Path) -> str:
    try:
        return str(json.loads((folder / TRIAL_FILE).read_text(encoding="utf-8")).get("key"))
    except (OSError, ValueError, AttributeError):
        return ""


def refuse_other_baseline(folder: Path, key: str) -> None:
    """Raise a one-line PqdError when ``folder`` holds a finished, measured baseline of a
    recipe other than ``key``'s: training this recipe's baseline would delete it (and
    orphan the trials trained from it). A half-finished one is simply redone."""
    try:
        old = json.loads((folder / TRIAL_FILE).read_text(encoding="utf-8")).get("key")
    except (OSError, ValueError, AttributeError):
        return
    if isinstance(old, str) and old != key and folder_status(folder, old) == "done":
        raise PqdError(
            f"{folder} holds the finished baseline of another search recipe (key {old}; "
            f"this recipe's is {key}): training this one there would delete it",
            "use another --out, or --fresh to retrain the baseline in this folder "
            "(trial folders are kept per recipe)",
        )


def reset_folder(folder: Path, trial: Trial) -> None:
    from pqd.checkpoint import atomic_write_text

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    atomic_write_text(
        folder / TRIAL_FILE,
        json.dumps(
            {
                "key": trial.key,
                "name": trial.recipe.name,
                "order": list(trial.order),
                "seed": trial.seed,
                "epochs": list(trial.epochs),
            },
            indent=2,
        ),
    )


def start_from_siblings(folder: Path, trial: Trial, siblings: list[Path]) -> list[str]:
    """Start a fresh trial folder from the most finished stages another trial shares with
    it (:func:`pqd.resume.shared_steps`): a pairwise run A->B is the first two stages of the
    permutation A->B->C, with the same seeds, so it is not trained twice; at least one stage
    must be shared (the baseline alone is only loaded).

    Args:
        folder: the trial's folder, just reset (holding no progress).
        trial: the trial.
        siblings: the other trials' folders of the same search.

    Returns:
        The names of the steps taken over (empty: none was shared).
    """
    from pqd.resume import PROGRESS, RunFolder, shared_steps

    if (folder / PROGRESS).exists():
        return []  # begun already: it continues on its own
    best: tuple[Path, list[dict[str, Any]]] | None = None
    for sibling in siblings:
        steps = shared_steps(sibling, trial.recipe)
        if len(steps) >= 2 and (best is None or len(steps) > len(best[1])):
            best = sibling, steps
    if best is None:
        return []
    try:
        RunFolder.adopt(folder, trial.recipe, *best)
    except OSError:  # (a full disk): the trial trains those stages itself
        reset_folder(folder, trial)
        return []
    return [str(e["step"]) for e in best[1]]


class Sharing:
    """Which trial a free slot of a parallel executor (processes, Ray) takes next, so that
    trials share stages (:func:`start_from_siblings`) without workers sitting idle: one per
    search run (it caches each trial's step fingerprints by key).

    Args:
        finished: trials whose folders hold their finished steps (appended to as trials
            finish).
    """

    START, LATER, WAIT = 0, 1, 2

    def __init__(self, finished: list[Trial]) -> None:
        self.finished = finished
        self._prints: dict[str, list[str]] = {}

    def prints(self, trial: Trial) -> list[str]:
        """The trial's step fingerprints (:func:`pqd.fingerprint.fingerprints`)."""
        from pqd.fingerprint import fingerprints

        if trial.key not in self._prints:
            self._prints[trial.key] = fingerprints(trial.recipe)
        return self._prints[trial.key]

    def shared(self, a: Trial, b: Trial) -> int:
        """How many leading steps (the baseline, then stages) ``a`` and ``b`` compute the
        same: 0 when even the baselines differ, 2 or more when a stage is shared."""
        n = 0
        for x, y in zip(self.prints(a), self.prints(b), strict=False):
            if x != y:
                break
            n += 1
        return n

    def level(self, trial: Trial, folder: Path, running: list[Trial]) -> int:
        """``WAIT``: a running trial trains every step of ``trial`` (a pairwise run A->B
        while A->B->C trains): it takes them over once that one finishes. ``LATER``: a
        running trial trains some of its stages that no finished one offers: started only
        when no ``START`` trial is left for a free worker. ``START`` otherwise, and always
        for a trial begun before (its folder has progress)."""
        from pqd.resume import PROGRESS

        if (folder / PROGRESS).exists():
            return self.START
        offered = max((self.shared(trial, t) for t in self.finished), default=0)
        best = max((self.shared(trial, t) for t in running), default=0)
        if best < max(2, offered + 1):
            return self.START
        return self.WAIT if best == len(self.prints(trial)) else self.LATER
