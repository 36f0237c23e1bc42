"""The quickstart results table: run the quickstart recipe and print baseline vs final.

    python benchmarks/quickstart.py                 # runs `pqd run recipes/quickstart.yaml`
    python benchmarks/quickstart.py --record runs/quick/record.json   # table of a past run

Prints a Markdown table (accuracy of each artifact on the test split, MB on disk,
batch-1 p50/p90 latency on each measured runtime) and the ratios final vs baseline,
all taken from one run's record.json, plus the run's wall time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rows(record: dict) -> list[list[str]]:
    """One row per artifact and runtime."""
    out = []
    for key in ("baseline", "final"):
        r = record[key]
        for rt, res in r["runtimes"].items():
            lat = res["latency_ms"]
            out.append(
                [
                    key,
                    r["precision"],
                    rt,
                    f"{100 * res['accuracy']:.2f}%",
                    f"{r['size_bytes'] / 1e6:.2f}",
                    f"{lat['p50']:.3f}",
                    f"{lat['p90']:.3f}",
                    f"{100 * r['sparsity']:.1f}%",
                ]
            )
    return out


def render(record: dict, wall_s: float | None) -> str:
    """The Markdown table and ratio lines for one record."""
    from pqd.report import points_text, speed_text

    header = [
        "artifact",
        "precision",
        "runtime",
        "top-1",
        "MB",
        "p50 ms (b1)",
        "p90 ms (b1)",
        "sparsity",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows(record)]
    b, f = record["baseline"], record["final"]
    lines.append("")
    for rt in f["runtimes"]:
        if rt in b["runtimes"]:
            ratio = b["runtimes"][rt]["latency_ms"]["p50"] / f["runtimes"][rt]["latency_ms"]["p50"]
            lines.append(f"- {rt}: final is {speed_text(ratio)} at batch 1 (p50)")
    drop = 100 * (b["accuracy"] - f["accuracy"])
    lines.append(
        f"- {b['size_bytes'] / f['size_bytes']:.2f}x smaller on disk; accuracy "
        f"{points_text(-drop)}; sparsity read back from the INT8 file "
        f"{100 * f['sparsity']:.1f}%"
    )
    t = record["timing_s"]
    lines.append(
        f"- pipeline time {t['total']:.0f} s (baseline {t['baseline']:.0f} s, stages "
        f"{t['stages']:.0f} s, export {t['export']:.0f} s, measure {t['measure']:.0f} s)"
        + (f"; command wall time {wall_s:.0f} s" if wall_s else "")
    )
    env = record["environment"]
    lines.append(
        f"- {env['cpu']}, {env['measure_threads']} threads; "
        f"{record['data']['test']} test images"
        + (" (subset of the official test split)" if record["data"].get("subset_note") else "")
    )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--record", type=Path, help="print the table of this record.json, no run")
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "quickstart.yaml")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "quick")
    args = ap.parse_args()
    wall = None
    record_path = args.record
    if record_path is None:
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "pqd.cli", "run", str(args.recipe), "--out", str(args.out)]
        if subprocess.run(cmd, cwd=ROOT).returncode != 0:
            return 1
        wall = time.perf_counter() - t0
        record_path = args.out / "record.json"
    if not record_path.is_file():
        print(
            f"benchmarks/quickstart.py: error: {record_path} not found; run without --record",
            file=sys.stderr,
        )
        return 2
    print(render(json.loads(record_path.read_text()), wall))
    return 0


if __name__ == "__main__":
    sys.exit(main())
