"""The README's "Order search" table: run the shipped search and print its summary.

    python benchmarks/search.py                   # runs pqd search recipes/search-quickstart.yaml
    python benchmarks/search.py --from runs/search   # the table of a finished search

Prints, from the search's search.json: one row per order (full orders ranked by the
criterion, single-technique references, two-stage pairwise runs, the baseline) with test
top-1, MB on disk, batch-1 p50 latency from the search's interleaved latency panel and the
speedup over the FP32 baseline in that panel; the pairwise table; the derived order (or the
cycle); run counts of the pairwise method vs the full permutation search; the wall time.
A re-run with the same --out resumes: finished trials are reused.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADER = [
    "rank",
    "kind",
    "order",
    "epochs",
    "top-1",
    "MB",
    "p50 ms (b1)",
    "speedup",
    "sparsity",
    "Pareto",
]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *["| " + " | ".join(r) + " |" for r in rows],
    ]


def render(search: dict, wall_s: float | None) -> str:
    """The Markdown tables and summary lines of one search.json."""
    from pqd.markdown import ordered_groups
    from pqd.report import PAIR_HEADER, derived_order_text, pairwise_rows

    rows = []
    for g in ordered_groups(search):
        if not g["n"]:
            rows.append(
                [
                    str(g.get("rank", "-")),
                    g["kind"],
                    g["label"],
                    "/".join(map(str, g["epochs"])),
                    "failed",
                    "",
                    "",
                    "",
                    "",
                    "",
                ]
            )
            continue
        sd = f" ± {100 * g['accuracy_std']:.2f}" if g["n"] > 1 else ""
        rows.append(
            [
                str(g.get("rank", "-")),
                g["kind"],
                g["label"],
                "/".join(map(str, g["epochs"])) or "-",
                f"{100 * g['accuracy_mean']:.2f}%{sd}",
                f"{g['size_bytes'] / 1e6:.3f}",
                f"{g['latency_p50_ms']:.3f}",
                f"{g['speedup_vs_baseline']:.2f}x",
                f"{100 * g['sparsity']:.0f}%",
                "yes" if g.get("pareto") else "",
            ]
        )
    lines = _table(HEADER, rows)
    if search.get("pairwise"):
        lines += ["", *_table(PAIR_HEADER, pairwise_rows(search))]
    runs = search["runs"]
    pm, ps = runs["pairwise_method"], runs["permutation_search"]
    panel, t = search["latency_panel"], search.get("timing_s", {})
    lines += [
        "",
        f"- {derived_order_text(search).replace('**', '')}",
        f"- pairwise method: {pm['runs']} two-stage runs ({pm['epochs']} epochs); full "
        f"permutation search: {ps['runs']} runs ({ps['epochs']} epochs)",
        f"- {runs['unique_runs']} runs in all ({runs['trained_now']} trained in the last "
        f"invocation, {runs['reused']} reused); search time {t.get('total', 0):.0f} s "
        f"(training {t.get('train', 0):.0f} s, measuring {t.get('measure', 0):.0f} s, "
        f"latency panel {t.get('panel', 0):.0f} s)"
        + (f"; command wall time {wall_s:.0f} s" if wall_s else ""),
        f"- latency: {panel['runtime']}, {panel['threads']} threads, batch 1, all artifacts "
        f"timed side by side on {panel['cpu']}; {search['data']['test']} test images"
        + (" (a subset of the official test split)" if search["data"].get("subset_note") else ""),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--from",
        dest="source",
        type=Path,
        help="print the table of this search folder (or its search.json), no run",
    )
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "search-quickstart.yaml")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "search")
    ap.add_argument("--workers", type=int, default=None, help="pass --workers N to pqd search")
    ap.add_argument("--fresh", action="store_true", help="pass --fresh to pqd search")
    args = ap.parse_args(argv)
    wall = None
    source = args.source
    if source is None:
        t0 = time.perf_counter()
        cmd = [
            sys.executable,
            "-m",
            "pqd.cli",
            "search",
            str(args.recipe),
            "--out",
            str(args.out),
            "--no-progress",
        ]
        if args.workers:
            cmd += ["--workers", str(args.workers)]
        if args.fresh:
            cmd += ["--fresh"]
        if subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL).returncode != 0:
            return 1
        wall = time.perf_counter() - t0
        source = args.out
    path = source / "search.json" if source.is_dir() else source
    if not path.is_file():
        print(f"benchmarks/search.py: error: {path} not found; run without --from", file=sys.stderr)
        return 2
    print(render(json.loads(path.read_text(encoding="utf-8")), wall))
    return 0


if __name__ == "__main__":
    sys.exit(main())
