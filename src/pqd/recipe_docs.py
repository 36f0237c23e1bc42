"""The recipe reference (``docs/recipe-reference.md``), generated from the pydantic schema in
:mod:`pqd.recipe`: every section and key with its type, default and allowed values, so the
page cannot drift from what pqd accepts (``tests/test_docs.py`` fails when it is stale).

    python -m pqd.recipe_docs docs/recipe-reference.md      # rewrite the page
"""

from __future__ import annotations

import inspect
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

import annotated_types
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from pqd.recipe import Recipe, TrainOverride

HEADER = """# Recipe reference

Every key a recipe may hold, generated from the schema in `src/pqd/recipe/` by
`python -m pqd.recipe_docs docs/recipe-reference.md` (a test fails when this page is
stale). The guide to the format is [recipe.md](recipe.md). A key left out takes its
default; an unknown key, a wrong type or a value out of range is refused in one line.
"""

_CONSTRAINTS = (
    (annotated_types.Ge, ">= {}", "ge"),
    (annotated_types.Gt, "> {}", "gt"),
    (annotated_types.Le, "<= {}", "le"),
    (annotated_types.Lt, "< {}", "lt"),
    (annotated_types.MinLen, "at least {} long", "min_length"),
    (annotated_types.MaxLen, "at most {} long", "max_length"),
)


def _anchor(model: type[BaseModel]) -> str:
    return model.__name__.lower()


def _type_text(tp: Any, models: list[type[BaseModel]]) -> str:
    """A type as a reader writes it in YAML: ``int``, ``a | b``, ``list of float``..."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is type(None):
        return "null"
    if origin is typing.Annotated:
        return _type_text(args[0], models)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_text(a, models) for a in args)
    if origin in (list, tuple, typing.Sequence):
        inner = [a for a in args if a is not Ellipsis]
        return "list of " + (_type_text(inner[0], models) if inner else "values")
    if origin is dict:
        return f"map of {_type_text(args[0], models)} to {_type_text(args[1], models)}"
    if inspect.isclass(tp) and issubclass(tp, BaseModel):
        if tp is TrainOverride:
            return "[train overrides](#train-overrides)"
        if tp not in models:
            models.append(tp)
        return f"[{tp.__name__}](#{_anchor(tp)})"
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


def _metadata(field: Any) -> list[Any]:
    """The field's constraints, those of an ``Annotated`` member of a union included
    (``Fraction | None``)."""
    found = list(field.metadata)
    for arg in typing.get_args(field.annotation):
        if typing.get_origin(arg) is typing.Annotated:
            for extra in typing.get_args(arg)[1:]:
                found += list(getattr(extra, "metadata", [extra]))
    return found


def _constraints(field: Any) -> str:
    out = []
    for meta in _metadata(field):
        for kind, text, attr in _CONSTRAINTS:
            if isinstance(meta, kind):
                out.append(text.format(getattr(meta, attr)))
    return ", ".join(out)


def _default_text(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel):
            return "its defaults"
        return f"`{value!r}`" if value not in ({}, []) else f"`{value}`"
    if field.default is PydanticUndefined:
        return "required"
    value = field.default
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


_ROLE = re.compile(r":(?:func|class|mod|meth|data|attr):`~?([^`]+)`")


def markdown(doc: str) -> str:
    """A docstring's reST as Markdown on one line: literals and roles (``:func:``,
    ``:mod:`` ...) become code in single backquotes.

    Args:
        doc: a class docstring.

    Returns:
        Its text on one line, code in single backquotes.
    """
    text = re.sub(r"\s+", " ", inspect.cleandoc(doc))
    return _ROLE.sub(r"`\1`", text.replace("``", "`"))


def _section(model: type[BaseModel], models: list[type[BaseModel]]) -> list[str]:
    doc = markdown(model.__doc__ or "")
    lines = [f"## {model.__name__}", "", doc, "", "| key | type | default | allowed |"]
    lines.append("|---|---|---|---|")
    for name, field in model.model_fields.items():
        kind = _type_text(field.annotation, models)
        lines.append(f"| `{name}` | {kind} | {_default_text(field)} | {_constraints(field)} |")
    return [*lines, ""]


def reference() -> str:
    """The whole page, from :class:`pqd.recipe.Recipe` down to every nested section.

    Returns:
        Markdown text.
    """
    models: list[type[BaseModel]] = [Recipe]
    body: list[str] = []
    i = 0
    while i < len(models):  # breadth first: sections in the order a recipe meets them
        body += _section(models[i], models)
        i += 1
    overrides = [
        "## Train overrides",
        "",
        "A `train:` entry under `baseline` or a stage: the keys of [TrainSpec](#trainspec), "
        "each optional; a key not written inherits from the recipe's `train`.",
        "",
    ]
    return "\n".join([HEADER, *body, *overrides])


def main(argv: list[str] | None = None) -> int:
    """Write the page to the path given (default: print it)."""
    args = sys.argv[1:] if argv is None else argv
    text = reference()
    if args:
        Path(args[0]).write_text(text, encoding="utf-8")
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
