"""Markdown and HTML pieces shared by the run, search and plan reports (:mod:`pqd.report`,
:mod:`pqd.report_audit`, :mod:`pqd.planner`): every report.html is self-contained (plots
embedded as base64 PNG) so it can be mailed or archived alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

KIND_ORDER = ("baseline", "permutation", "reference", "pairwise")
"""Search group kinds in report order."""


def model_text(name: str, kwargs: dict[str, Any] | None = None) -> str:
    """The model as a recipe builds it, its arguments as in the recipe's ``model.kwargs``,
    e.g. ```fastnet_q8` (plan: [24, 64, M, 256])``."""
    if not kwargs:
        return f"`{name}`"

    def value(v: Any) -> str:
        return f"[{', '.join(map(str, v))}]" if isinstance(v, list) else str(v)

    return f"`{name}` ({'; '.join(f'{k}: {value(v)}' for k, v in kwargs.items())})"


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


# ---------------------------------------------------------------------------- HTML

HTML_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;"
    "padding:0 1em;color:#222}table{border-collapse:collapse;font-size:13px;"
    "margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
    "td:nth-child(2),td:nth-child(3),th{text-align:left}tr:nth-child(even)"
    "{background:#f6f6f6}img{max-width:100%;border:1px solid #ddd}"
    "figure{margin:1.5em 0}figcaption{font-size:12px;color:#666}code{font-size:12px}"
)


def html_table(header: list[str], rows: list[list[str]]) -> str:
    """An HTML table (cells escaped, Markdown ``code``/**bold** kept)."""
    head = "".join(f"<th>{md_inline(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{md_inline(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def md_inline(text: str) -> str:
    """Markdown **bold** and `code` of one line as HTML (the rest escaped)."""
    import html
    import re

    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(text))
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def html_figure(name: str, png: bytes) -> str:
    """A PNG embedded as base64 with its name as caption."""
    import base64
    import html

    return (
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,'
        f'{base64.b64encode(png).decode("ascii")}"><figcaption>{html.escape(name)}'
        "</figcaption></figure>"
    )


def html_page(title: str, parts: list[str]) -> str:
    """A self-contained HTML page of ``parts`` (HTML fragments)."""
    import html

    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{HTML_STYLE}</style>"
        "</head><body>" + "\n".join(parts) + "</body></html>\n"
    )


def markdown_html(text: str, images: dict[str, bytes]) -> str:
    """The report Markdown pqd writes (headings, paragraphs, ``- `` items, tables, images
    ``![alt](path)``) as a self-contained HTML page; ``images`` maps each path to its PNG.

    Args:
        text: Markdown as the reports write it.
        images: image path (as written in ``text``) -> PNG bytes; a missing one is named.

    Returns:
        The page.
    """
    import re

    parts: list[str] = []
    title = ""
    rows: list[list[str]] = []

    def flush() -> None:
        if rows:
            parts.append(html_table(rows[0], rows[1:]))
            rows.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):
                rows.append(cells)
            continue
        flush()
        image = re.fullmatch(r"!\[(.*?)\]\((.+?)\)", line.strip())
        if image:
            png = images.get(image.group(2))
            parts.append(
                html_figure(image.group(1), png)
                if png
                else f"<p>(missing image {md_inline(image.group(2))})</p>"
            )
        elif line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")), 4)
            heading = line.lstrip("#").strip()
            title = title or heading
            parts.append(f"<h{level}>{md_inline(heading)}</h{level}>")
        elif line.startswith("- "):
            parts.append(f"<li>{md_inline(line[2:])}</li>")
        elif line.strip():
            parts.append(f"<p>{md_inline(line)}</p>")
    flush()
    return html_page(title or "pqd report", parts)


def linked_images(text: str, folder: Path) -> dict[str, bytes]:
    """The PNG bytes of every image ``![alt](path)`` that ``text`` links, read relative to
    ``folder`` (missing files are left out: :func:`markdown_html` names them)."""
    import re

    images = {}
    for rel in re.findall(r"!\[.*?\]\((.+?)\)", text):
        path = folder / rel
        if path.is_file():
            images[rel] = path.read_bytes()
    return images
