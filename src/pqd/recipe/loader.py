"""Reading and writing recipes: :func:`load_recipe` (a YAML file, overrides, paths anchored
to the file or the shell), :func:`dump_recipe` (the fully resolved YAML) and
:func:`stable_dump` (defaults left out: what resume fingerprints and trial keys hash)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from pqd.errors import RecipeError
from pqd.recipe.overrides import apply_overrides, parse_overrides
from pqd.recipe.schema import Recipe
from pqd.recipe.validate import recipe_from_dict


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a YAML recipe file."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"recipe {str(p)!r} does not exist", "give the path of a YAML recipe")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise RecipeError(f"{p}: not a UTF-8 text file", "give a YAML recipe") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "malformed YAML"
        raise RecipeError(
            f"{p}: malformed YAML{where}: {problem}",
            "fix the YAML syntax (indentation, colons, quotes)",
        ) from None
    if data is None:
        data = {}
    if isinstance(data, dict):
        anchor_paths(data, p.parent)  # paths in the file: relative to the file
    if overrides:
        if not isinstance(data, dict):
            return recipe_from_dict(data, str(p))
        data = apply_overrides(data, overrides)
        anchor_paths(data, Path.cwd())  # paths on the command line: relative to the shell
        recipe = recipe_from_dict(data, str(p))
        if any(path == ["data", "root"] for path, _ in parse_overrides(overrides)):
            recipe.data._root_from = "override"
        return recipe
    return recipe_from_dict(data, str(p))


RECIPE_PATHS = (("data", "root"), ("baseline", "checkpoint"))
"""The recipe's file-system paths (section, key)."""


def anchor_paths(data: dict[str, Any], folder: Path) -> None:
    """Make the relative paths of :data:`RECIPE_PATHS` in plain recipe data absolute, taken
    relative to ``folder`` (``~`` expanded); other values are left for validation.

    Args:
        data: the recipe as plain data (changed in place).
        folder: the folder relative paths start from.
    """
    for section, key in RECIPE_PATHS:
        node = data.get(section)
        if not isinstance(node, dict) or not isinstance(node.get(key), str):
            continue
        value = os.path.expanduser(node[key].strip())
        if value:
            node[key] = os.path.normpath(os.path.join(os.path.abspath(folder), value))


def stable_dump(recipe: Recipe) -> dict[str, Any]:
    """The recipe as JSON data without the fields left at their defaults (each stage keeps
    its ``stage`` name): what resume fingerprints and search trial keys hash, so that a field
    added to pqd later, with a default, does not make finished runs look different.

    Args:
        recipe: the recipe.

    Returns:
        The dict (``stages`` always present, as a list).
    """
    data = recipe.model_dump(mode="json", exclude_defaults=True)
    data["stages"] = [
        {"stage": spec.stage, **spec.model_dump(mode="json", exclude_defaults=True)}
        for spec in recipe.stages
    ]
    return data


def dump_recipe(recipe: Recipe) -> str:
    """YAML text of the fully resolved recipe (defaults included); loads back equal."""
    data = recipe.model_dump(mode="json")
    if data.get("search") is None:
        data.pop("search", None)  # a plain run recipe stays as it was
    return yaml.safe_dump(data, sort_keys=False)
