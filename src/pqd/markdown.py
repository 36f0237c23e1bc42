"""Markdown pieces shared by the run and search reports (:mod:`pqd.report`,
:mod:`pqd.report_audit`)."""

from __future__ import annotations

from typing import Any

KIND_ORDER = ("baseline", "permutation", "reference", "pairwise")
"""Search group kinds in report order."""


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def ordered_groups(search: dict[str, Any]) -> list[dict[str, Any]]:
    """Groups in report order: baseline, permutations by rank, references, pairwise runs."""
    groups = search["groups"]
    ranked = {gid: i for i, gid in enumerate(search["ranking"])}
    return sorted(
        groups,
        key=lambda g: (
            KIND_ORDER.index(g["kind"]),
            ranked.get(g["id"], len(ranked)),
            groups.index(g),
        ),
    )
