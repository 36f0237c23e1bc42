"""The base of every recipe section: :class:`Strict` (unknown keys are errors) and the
one-line :class:`pqd.errors.SpecError` a section built in Python raises, so that a typo in
``pqd.Prune(sparsty=0.5)`` fails as plainly as the same typo in a recipe file."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic._internal._model_construction import ModelMetaclass

from pqd.errors import SpecError, did_you_mean

Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]


class _OneLineErrors(ModelMetaclass):
    """A section built by calling its class in Python (``pqd.Prune(sparsity=0.5)``) fails
    with a one-line :class:`pqd.errors.SpecError` (a ``ValueError``) naming the closest key;
    validation of recipe data (which does not call the class) keeps pydantic's errors for
    :func:`recipe_from_dict` to word with their key paths."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except ValidationError as exc:
            raise _spec_error(exc, cls) from None


class Strict(BaseModel, metaclass=_OneLineErrors):
    """Base for every recipe section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _spec_error(exc: ValidationError, model: type[BaseModel]) -> SpecError:
    """One line for the first problem of a section built in Python, with the closest key."""
    err = exc.errors(include_url=False)[0]
    name = getattr(model, "__name__", "section").removesuffix("Spec")
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        key = str(err["loc"][-1])
        keys = list(model.model_fields) if len(err["loc"]) == 1 else []
        return SpecError(
            f"{name}: unknown key {key!r}{did_you_mean(key, keys)}",
            f"use one of {', '.join(keys)}" if keys else "remove it",
        )
    if err["type"] == "value_error":  # our validators word problem and fix themselves
        msg, _, fix = str(err["ctx"]["error"]).partition("; fix: ")
        return SpecError(f"{name}: {msg}", fix or "see docs/recipe-reference.md")
    shown = repr(err.get("input"))
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return SpecError(
        f"{name}: {loc}: {err['msg']} (got {shown})",
        f"give {loc} a valid value (docs/recipe-reference.md)",
    )
