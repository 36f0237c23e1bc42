"""Plain data to a :class:`Recipe` (:func:`recipe_from_dict`): pydantic's validation errors
worded as one :class:`pqd.errors.RecipeError` line with the key path, the closest key, stage
name or choice for a typo, and the fix."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ValidationError

from pqd.errors import RecipeError, did_you_mean
from pqd.recipe.schema import Recipe
from pqd.recipe.stage_specs import STAGE_NAMES, STAGE_SPECS


def _closest(err: dict[str, Any]) -> str:
    """`` (did you mean ...?)`` for a misspelt key, stage name or choice (else "")."""
    kind, ctx = err["type"], err.get("ctx", {})
    if kind == "extra_forbidden":
        allowed = _allowed_keys(Recipe, err["loc"][:-1])
        return did_you_mean(err["loc"][-1], allowed.split(", ") if allowed else [])
    if kind == "union_tag_invalid":
        return did_you_mean(ctx.get("tag", ""), STAGE_NAMES)
    if kind in ("literal_error", "enum") and isinstance(err.get("input"), str):
        return did_you_mean(err["input"], re.findall(r"'([^']*)'", str(ctx.get("expected"))))
    return ""


def _fix_for(err: dict[str, Any], model: type[BaseModel] | None) -> str:
    kind = err["type"]
    ctx = err.get("ctx", {})
    if kind == "extra_forbidden":
        allowed = _allowed_keys(model, err["loc"][:-1])
        return "remove it or fix its spelling" + (f" (allowed: {allowed})" if allowed else "")
    if kind in ("literal_error", "enum"):
        return f"use one of {ctx.get('expected', 'the allowed values')}"
    if kind == "union_tag_invalid":
        return f"use one of {ctx.get('expected_tags', ', '.join(STAGE_NAMES))}"
    if kind == "union_tag_not_found":
        return f"add 'stage: <name>' with one of {', '.join(STAGE_NAMES)}"
    if kind == "missing":
        return "add it"
    bounds = {
        "greater_than": ">",
        "greater_than_equal": ">=",
        "less_than": "<",
        "less_than_equal": "<=",
    }
    if kind in bounds:
        limit = next(iter(ctx.values()), "?")
        return f"use a value {bounds[kind]} {limit}"
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return "give a value of the right type"
    if kind == "too_short":
        return "give at least one entry"
    return "correct the value"


def _allowed_keys(model: type[BaseModel] | None, loc: tuple[Any, ...]) -> str:
    """Field names of the section at ``loc`` (best effort, for error hints)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int) or current is None:
            continue
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                # discriminated stage union: the tag appears in loc
                current = dict(zip(STAGE_NAMES, STAGE_SPECS, strict=True)).get(str(part))
                continue
            current = _inner_model(field.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return ", ".join(current.model_fields)
    return ""


def _inner_model(annotation: Any) -> Any:
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _inner_model(arg)
        if found is not None:
            return found
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _format_validation(exc: ValidationError, source: str) -> RecipeError:
    errors = exc.errors(include_url=False)
    err = errors[0]
    loc = ".".join(str(p) for p in err["loc"] if p not in STAGE_NAMES or err["loc"][0] != "stages")
    msg = err["msg"]
    fix: str | None = _fix_for(err, Recipe)
    if err["type"] == "value_error":  # our validators word problem and fix themselves
        msg, _, fix = str(err["ctx"]["error"]).partition("; fix: ")
        fix = fix or None
    elif err["type"] == "union_tag_invalid":
        msg = f"unknown stage {err['ctx'].get('tag')!r}"
    elif err["type"] == "union_tag_not_found":
        msg = "the stage has no 'stage' key"
    elif err["type"] not in ("missing", "extra_forbidden") and "input" in err:
        shown = repr(err["input"])
        if len(shown) > 60:
            shown = shown[:57] + "..."
        msg = f"{msg} (got {shown})"
    msg += _closest(err)
    extra = len(errors) - 1
    more = f" (+{extra} more problem{'s' if extra > 1 else ''})" if extra else ""
    where = f"{loc}: " if loc else ""
    return RecipeError(f"{source}: {where}{msg}{more}", fix)


def recipe_from_dict(data: Any, source: str = "recipe") -> Recipe:
    """Validate plain data into a :class:`Recipe`, or raise a one-line RecipeError."""
    if not isinstance(data, dict):
        raise RecipeError(
            f"{source}: the top level must be a mapping (got {type(data).__name__})",
            "start the file with keys such as model:, data:, stages:",
        )
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise _format_validation(exc, source) from None
