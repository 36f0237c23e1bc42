"""Command-line overrides (``stages.0.sparsity=0.7``): parsed as YAML scalars and set into a
recipe's plain data before it is validated."""

from __future__ import annotations

from typing import Any

import yaml

from pqd.errors import RecipeError


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    """Parse ``a.b.0.c=value`` strings; values are read as YAML scalars/lists."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not p for p in key.split(".")):
            raise RecipeError(
                f"override {item!r} is not of the form key.path=value",
                "write e.g. stages.0.sparsity=0.7 or baseline.epochs=5",
            )
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        parsed.append((key.split("."), value))
    return parsed


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each dotted key in a plain dict (list items by index); returns ``data``."""
    for path, value in parse_overrides(overrides):
        node: Any = data
        for i, part in enumerate(path[:-1]):
            node = _child(node, part, path[: i + 1], create=True)
        last = path[-1]
        if isinstance(node, list):
            idx = _index(node, last, path)
            node[idx] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise RecipeError(
                f"override {'.'.join(path)}: {'.'.join(path[:-1])} is not a section",
                "override a key inside a mapping",
            )
    return data


def _index(node: list[Any], part: str, path: list[str]) -> int:
    if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
        raise RecipeError(
            f"override {'.'.join(path)}: no list item {part!r} (the list has {len(node)})",
            f"use an index from 0 to {len(node) - 1}",
        )
    return int(part)


def _child(node: Any, part: str, path: list[str], *, create: bool) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, path)]
    if isinstance(node, dict):
        if part not in node or node[part] is None:
            if not create:
                raise KeyError(part)
            node[part] = {}
        return node[part]
    raise RecipeError(
        f"override {'.'.join(path)}: {'.'.join(path[:-1])} is not a section",
        "override a key inside a mapping",
    )
