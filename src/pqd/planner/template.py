"""The plan's template job: the recipe with one ``prune_channels`` stage given per-group
ratios, each candidate's recipe, file names, cached JSON steps."""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pqd.errors import PqdError, RecipeError
from pqd.latency_model.model import Ratios
from pqd.recipe import Recipe, recipe_from_dict

PLAN_FILE = "plan.json"


PICK_FILE = "pick.yaml"


SENSITIVITY_FILE = "sensitivity.json"


SELECTION_FILE = "selection.json"


PLAN_VERSION = 1


class PlanError(PqdError):
    """The budget cannot be planned for (already met, or below every candidate)."""


def announce(msg: str) -> None:
    print(f"pqd plan: {msg}", file=sys.stderr, flush=True)


def template(recipe: Recipe, runtime: str, threads: int) -> tuple[dict[str, Any], int, str]:
    """The recipe as plain data for the candidates: measured on ``runtime`` with ``threads``
    at batch 1, and a ``prune_channels`` stage (inserted first with 1 epoch if absent).

    Returns:
        ``(recipe data, index of the prune_channels stage, precision "int8" | "fp32")``.
    """
    data = recipe.model_dump(mode="json")
    data.pop("search", None)
    stages = data["stages"]
    kinds = [s["stage"] for s in stages]
    if "early_exit" in kinds:
        raise RecipeError(
            "pqd plan does not search early-exit thresholds yet",
            "remove the early_exit stage from the recipe to plan its channels and precision",
        )
    if kinds.count("prune_channels") > 1:
        raise RecipeError(
            "pqd plan sets the ratios of one prune_channels stage, the recipe has "
            f"{kinds.count('prune_channels')}",
            "keep one prune_channels stage",
        )
    quant = [s for s in stages if s["stage"] == "quantize"]
    if any(q.get("mode") == "dynamic" for q in quant):
        raise RecipeError(
            "pqd plan models static INT8 (QAT or PTQ) or FP32 files, not dynamic quantization",
            "use quantize mode qat or ptq",
        )
    if "prune_channels" not in kinds:
        stages.insert(0, {"stage": "prune_channels", "ratios": {}, "epochs": 1})
    index = [s["stage"] for s in stages].index("prune_channels")
    pc = stages[index]
    for key in ("ratio", "target"):
        pc.pop(key, None)
    pc["ratios"] = {}
    pc["scope"] = "layer"
    data["measure"] = {
        **data["measure"],
        "runtimes": [runtime],
        "threads": threads,
        "batch_sizes": [1],
    }
    return data, index, "int8" if quant else "fp32"


def candidate_recipe(
    base: dict[str, Any], index: int, ratios: Ratios, name: str, checkpoint: str
) -> Recipe:
    """The template with ``ratios`` (groups at 0 left out) in its prune_channels stage."""
    data = copy.deepcopy(base)
    data["name"] = name
    data["stages"][index]["ratios"] = {g: r for g, r in sorted(ratios.items()) if r > 0}
    data["baseline"] = {**data["baseline"], "checkpoint": checkpoint}
    return recipe_from_dict(data, f"plan candidate {name}")


def cached_json(
    path: Path, key: dict[str, Any], compute: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """What ``compute`` returned when ``path`` holds it for the same ``key`` (e.g. the
    sensitivity curves of the same baseline checkpoint, calibration, groups, rounding and
    data), else computed and written there: a resumed plan does not evaluate it again."""
    from pqd.checkpoint import atomic_write_text

    if path.is_file():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            if saved.get("key") == key:
                return dict(saved["value"])
        except (ValueError, KeyError, TypeError):
            pass  # unreadable: computed again and rewritten
    value = compute()
    atomic_write_text(path, json.dumps({"key": key, "value": value}, indent=1))
    return value


def plan_folder(trial: Any) -> str:
    return f"trials/plan-{trial.key[:12]}"
