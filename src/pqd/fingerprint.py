"""Step fingerprints: what decides each step's result, so that a finished step is kept (a
resumed run, a search trial starting from another's stages) only where it would come out
the same.

Step 0 (the baseline) depends on the seed, device, model, data (not where the files are)
and the train and baseline sections (a baseline checkpoint by its bytes, not its path: a
Ray task that holds it elsewhere computes the same fingerprints); stage i on those, the
stages up to it and, once a quantize stage ran, the deployment target's weight range; a
channel-pruning latency target also on what it measures with (``measure.threads``, and
INT8 when a later stage quantizes).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pqd.recipe import Recipe, stable_dump
from pqd.target import resolve as resolve_target


def sha(data: Any) -> str:
    """sha256 (hex) of plain data as sorted JSON."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


@functools.lru_cache(maxsize=32)
def _digest(path: str, size: int, mtime_ns: int, inode: int, ctime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_digest(path: str | Path) -> str:
    """sha256 (hex) of a file's bytes, computed once while its size, times and inode are
    unchanged (an atomic replace gives a new inode).

    Raises:
        OSError: the file cannot be read.
    """
    st = os.stat(path)
    return _digest(str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


def _relevant(recipe: Recipe) -> dict[str, Any]:
    """The recipe parts every trained step depends on (data paths aside; fields at their
    defaults left out, :func:`pqd.recipe.stable_dump`)."""
    d = stable_dump(recipe)
    data = {k: v for k, v in d.get("data", {}).items() if k not in ("root", "download")}
    baseline = d.get("baseline")
    if isinstance(baseline, dict) and baseline.get("checkpoint"):
        with contextlib.suppress(OSError):  # (missing: RunFolder.open refuses it)
            baseline = {**baseline, "checkpoint": "sha256:" + file_digest(baseline["checkpoint"])}
    return {
        "seed": d.get("seed"),
        "device": d.get("device"),
        "model": d.get("model"),
        "data": data,
        "train": d.get("train"),
        "baseline": baseline,
    }


def _reads_beyond_its_spec(recipe: Recipe, i: int) -> dict[str, Any]:
    """What stage ``i``'s result depends on besides its own settings and the steps before
    it: a channel-pruning latency target measures the file at ``measure.threads``, in INT8
    when a later stage quantizes (``precision: auto``); nothing for every other stage."""
    spec = recipe.stages[i]
    target = getattr(spec, "target", None)
    if spec.stage != "prune_channels" or getattr(target, "latency_ms", None) is None:
        return {}
    later = any(s.stage == "quantize" for s in recipe.stages[i:])
    return {
        "threads": recipe.measure.threads,
        **({"quantize_later": later} if getattr(target, "precision", None) == "auto" else {}),
    }


def fingerprints(recipe: Recipe) -> list[str]:
    """Fingerprint of step 0 (baseline) and of each stage i (step i + 1)."""
    base = _relevant(recipe)
    stages = stable_dump(recipe)["stages"]
    target = resolve_target(recipe.export.target)  # the weight range quantize stages train with
    reads = [_reads_beyond_its_spec(recipe, i) for i in range(len(stages))]
    prints = []
    for i in range(len(stages) + 1):
        quantized = any(s["stage"] == "quantize" for s in stages[:i])
        extra = {"reads": reads[:i]} if any(reads[:i]) else {}  # (absent: prints as before)
        prints.append(
            sha(
                {
                    **base,
                    "stages": stages[:i],
                    **({"target": target} if quantized else {}),
                    **extra,
                }
            )
        )
    return prints
