"""Human-readable reports rendered from record.json (never from live objects).

``pqd report RUN_DIR`` re-renders ``report.md`` from the stored record, so a
report can always be regenerated and never disagrees with the record. The package:
:mod:`~pqd.report.text` (small pieces of text), :mod:`~pqd.report.run` (one run),
:mod:`~pqd.report.search` and :mod:`~pqd.report.plots` (a search); the audit's sections are
:mod:`pqd.report_audit`, the Markdown/HTML helpers :mod:`pqd.markdown`.
"""

from __future__ import annotations

from pqd.markdown import table  # the CLI prints its summaries with it
from pqd.report.run import (
    SUMMARY_HEADER,
    parity_warnings,
    render_markdown,
    summary_rows,
)
from pqd.report.search import (
    PAIR_HEADER,
    SEARCH_HEADER,
    derived_order_text,
    pairwise_rows,
    parity_failed_text,
    render_search_markdown,
    search_rows,
    write_search_report,
)
from pqd.report.text import paired_text, points_text, seconds_text, speed_text

__all__ = [
    "PAIR_HEADER",
    "SEARCH_HEADER",
    "SUMMARY_HEADER",
    "derived_order_text",
    "paired_text",
    "pairwise_rows",
    "parity_failed_text",
    "parity_warnings",
    "points_text",
    "render_markdown",
    "render_search_markdown",
    "search_rows",
    "seconds_text",
    "speed_text",
    "summary_rows",
    "table",
    "write_search_report",
]
