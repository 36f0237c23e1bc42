"""The trials of a search: epochs per position, labels, the shared baseline, every
order's recipe (:func:`plan_trials`), and the plan printed before a search runs."""

from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from pqd.errors import PqdError, RecipeError
from pqd.fingerprint import file_digest
from pqd.recipe import Recipe, recipe_from_dict
from pqd.runs import Trial, trial_key

# ---------------------------------------------------------------------------- planning


def allocate_epochs(total: int, budget: Sequence[float]) -> list[int]:
    """Split ``total`` epochs over positions by ``budget`` percentages (largest remainder).

    The result always sums to ``total``; leftover epochs go to the positions with the largest
    fractional share, earlier positions first on ties. ``[20, 40, 40]`` of 5 -> ``[1, 2, 2]``.
    """
    weight = float(sum(budget))
    if total < 0 or weight <= 0 or any(b < 0 for b in budget):
        raise ValueError(f"cannot split {total} epochs by {list(budget)}")
    shares = [total * b / weight for b in budget]
    epochs = [math.floor(s + 1e-9) for s in shares]
    rest = total - sum(epochs)
    by_remainder = sorted(range(len(shares)), key=lambda i: (-(shares[i] - epochs[i]), i))
    for i in by_remainder[:rest]:
        epochs[i] += 1
    return epochs


def search_budget(recipe: Recipe) -> tuple[int, list[float]]:
    """``(total_epochs, budget)`` of a search recipe, defaults filled in."""
    spec = recipe.search
    if spec is None:
        raise PqdError(
            f"recipe {recipe.name!r} has no search: section",
            "add search: {total_epochs: ..., budget: [...]} or use 'pqd run'",
        )
    n = len(recipe.stages)
    total = (
        spec.total_epochs if spec.total_epochs is not None else sum(s.epochs for s in recipe.stages)
    )
    budget = list(spec.budget) if spec.budget is not None else [100.0 / n] * n
    return total, budget


def order_label(order: Sequence[str]) -> str:
    """``prune -> quantize``; ``baseline`` for the empty order."""
    return " -> ".join(order) if order else "baseline"


def short_label(order: Sequence[str]) -> str:
    """``P>Q>D`` (stage initials); ``base`` for the empty order."""
    return ">".join(s[0].upper() for s in order) if order else "base"


def baseline_trial(recipe: Recipe, data_root: str) -> Trial:
    """The shared baseline as a run without stages (trained, or loaded from a checkpoint)."""
    data = recipe.model_dump(mode="json")
    data.pop("search", None)
    data.update(name=f"{recipe.name}-baseline", stages=[])
    base = recipe_from_dict(data, "search baseline")
    ckpt = base.baseline.checkpoint
    digest = file_digest(ckpt) if ckpt and Path(ckpt).is_file() else ckpt
    return Trial(
        "baseline",
        (),
        recipe.seed,
        (recipe.baseline.epochs,) if not ckpt else (),
        base,
        trial_key(base, digest, data_root),
    )


def trial_recipe(
    recipe: Recipe,
    order: Sequence[int],
    epochs: Sequence[int],
    seed: int,
    checkpoint: str,
    name: str,
) -> Recipe:
    """The search recipe's stages ``order`` (indices) with ``epochs`` per position, ``seed``,
    loading ``checkpoint``; PTQ stages keep 0 epochs (they calibrate only)."""
    data = recipe.model_dump(mode="json")
    data.pop("search", None)
    stages = []
    for i, e in zip(order, epochs, strict=True):
        stage = dict(data["stages"][i])
        if not (stage["stage"] == "quantize" and stage.get("mode") == "ptq"):
            stage["epochs"] = int(e)
        stages.append(stage)
    data.update(name=name, seed=seed, stages=stages)
    data["baseline"] = {**data["baseline"], "checkpoint": checkpoint}
    try:
        return recipe_from_dict(data, f"search trial {name}")
    except RecipeError as exc:
        raise RecipeError(
            f"search: trial {order_label([recipe.stages[i].stage for i in order])} with "
            f"epochs {list(epochs)} is not a valid recipe ({exc.problem})",
            "raise search.total_epochs or the budget share of that position",
        ) from None


def plan_trials(
    recipe: Recipe, checkpoint: str, checkpoint_digest: str, data_root: str
) -> list[Trial]:
    """Every trial entry of the search, in run order: permutations, pairwise, references."""
    spec = recipe.search
    assert spec is not None
    total, budget = search_budget(recipe)
    n = len(recipe.stages)
    names = [s.stage for s in recipe.stages]
    alloc = allocate_epochs(total, budget)
    plans: list[tuple[str, tuple[int, ...], list[int]]] = []
    if spec.mode in ("permutations", "both"):
        plans += [("permutation", p, alloc) for p in itertools.permutations(range(n))]
    if spec.mode in ("pairwise", "both"):
        plans += [("pairwise", p, alloc[:2]) for p in itertools.permutations(range(n), 2)]
    if spec.references:
        plans += [("reference", (i,), [total]) for i in range(n)]
    trials = []
    for seed in spec.seeds:
        for kind, idx, epochs in plans:
            order = tuple(names[i] for i in idx)
            name = f"{recipe.name}-{'-'.join(order)}-s{seed}"
            r = trial_recipe(recipe, idx, epochs, seed, checkpoint, name)
            trials.append(
                Trial(
                    kind, order, seed, tuple(epochs), r, trial_key(r, checkpoint_digest, data_root)
                )
            )
    return trials


def search_plan_text(recipe: Recipe) -> str:
    """One line for ``pqd validate``: how many runs the search makes, with which epochs."""
    spec = recipe.search
    assert spec is not None
    total, budget = search_budget(recipe)
    n = len(recipe.stages)
    alloc = allocate_epochs(total, budget)
    perms = math.factorial(n) if spec.mode != "pairwise" else 0
    pairs = n * (n - 1) if spec.mode != "permutations" else 0
    if perms and n == 2:
        pairs = 0  # with two stages the pairwise runs are the permutation runs
    per_seed = perms + pairs + (n if spec.references else 0)
    pairwise = f", pairwise runs {'/'.join(map(str, alloc[:2]))}" if pairs else ""
    return (
        f"search: {spec.mode}, {per_seed * len(spec.seeds)} runs + 1 baseline "
        f"({len(spec.seeds)} seed(s)); epochs per position {'/'.join(map(str, alloc))} of "
        f"{total}{pairwise}"
    )


def say(msg: str) -> None:
    """A one-line status message of the search on stderr."""
    print(f"pqd search: {msg}", file=sys.stderr, flush=True)
