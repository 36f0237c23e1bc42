"""Human-readable reports rendered from record.json (never from live objects).

``pqd report RUN_DIR`` re-renders ``report.md`` from the stored record, so a
report can always be regenerated and never disagrees with the record. The package:
:mod:`~pqd.report.text` (small pieces of text), :mod:`~pqd.report.run` (one run),
:mod:`~pqd.report.search` and :mod:`~pqd.report.plots` (a search); the audit's sections are
:mod:`pqd.report_audit`, the Markdown/HTML helpers :mod:`pqd.markdown`.
"""

from __future__ import annotations

from pqd.markdown import table
from pqd.progress import plural
from pqd.report.plots import KIND_STYLE, search_plots
from pqd.report.run import (
    SUMMARY_HEADER,
    deploy_lines,
    early_exit_rows,
    early_exit_section,
    parity_warnings,
    render_markdown,
    summary_rows,
    target_section,
)
from pqd.report.search import (
    PAIR_HEADER,
    SEARCH_HEADER,
    derived_order_text,
    pairwise_rows,
    parity_failed_text,
    render_search_html,
    render_search_markdown,
    search_rows,
    write_search_report,
)
from pqd.report.text import (
    ci_text,
    kernel_summary,
    noisy_latency,
    notes_text,
    paired_text,
    points_text,
    speed_text,
)

__all__ = [
    "KIND_STYLE",
    "PAIR_HEADER",
    "SEARCH_HEADER",
    "SUMMARY_HEADER",
    "ci_text",
    "deploy_lines",
    "derived_order_text",
    "early_exit_rows",
    "early_exit_section",
    "kernel_summary",
    "noisy_latency",
    "notes_text",
    "paired_text",
    "pairwise_rows",
    "parity_failed_text",
    "parity_warnings",
    "plural",
    "points_text",
    "render_markdown",
    "render_search_html",
    "render_search_markdown",
    "search_plots",
    "search_rows",
    "speed_text",
    "summary_rows",
    "table",
    "target_section",
    "write_search_report",
]
