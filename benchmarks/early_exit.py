"""The early-exit table: run recipes/early-exit.yaml and print exits on vs off.

    python benchmarks/early_exit.py                  # runs `pqd run recipes/early-exit.yaml`
    python benchmarks/early_exit.py --record runs/early-exit/record.json   # a past run

Prints, from one run's record.json: batch-1 latency over every test image (mean, p50,
p90) of the INT8 artifact with exits (exits/exits.onnx: one graph whose If nodes stop at
the first confident exit; and the part files called in turn, each exit's segment and
head fused into one call, and as two calls)
next to the same weights with exits disabled (final.onnx, one graph: the reference; and
the segments run back to back without heads), test top-1 of each,
expected MACs; then per exit: threshold, test top-1 of the head, fraction leaving there.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def render(record: dict, wall_s: float | None) -> str:
    """Markdown tables and ratio lines for one record with ``final.early_exit``."""
    from pqd.markdown import table
    from pqd.report.run import early_exit_rows
    from pqd.report.text import points_text

    ee = record["final"].get("early_exit")
    if ee is None:
        raise ValueError("the record has no final.early_exit: the recipe has no early_exit stage")
    lat, ref, seg = ee["latency_ms"], ee["no_exit_latency_ms"], ee["segments_no_heads_latency_ms"]
    full = ee["full_macs"] / 1e6
    rows = [
        [
            "INT8, exits disabled: final.onnx (reference)",
            f"{100 * ee['accuracy_no_exits']:.2f}%",
            f"{ref['mean']:.3f}",
            f"{ref['p50']:.3f}",
            f"{ref['p90']:.3f}",
            f"{full:.1f}",
            "1.00x",
        ],
        [
            "INT8, exits disabled: segments back to back",
            f"{100 * ee['accuracy_no_exits']:.2f}%",
            f"{seg['mean']:.3f}",
            f"{seg['p50']:.3f}",
            f"{seg['p90']:.3f}",
            f"{full:.1f}",
            f"{ref['mean'] / seg['mean']:.2f}x",
        ],
        [
            "INT8 with exits: exits.onnx (one graph, If nodes)",
            f"{100 * ee['accuracy_with_exits']:.2f}%",
            f"{lat['mean']:.3f}",
            f"{lat['p50']:.3f}",
            f"{lat['p90']:.3f}",
            f"{ee['expected_macs'] / 1e6:.1f}",
            f"{ee['speedup_mean']:.2f}x",
        ],
    ]
    for key, label in (
        ("files_latency_ms", "INT8 with exits: exit files called in turn"),
        ("unfused_latency_ms", "INT8 with exits: segment and head as two calls"),
    ):
        if (other := ee.get(key)) is not None:
            rows.append(
                [
                    label,
                    f"{100 * ee['accuracy_with_exits']:.2f}%",
                    f"{other['mean']:.3f}",
                    f"{other['p50']:.3f}",
                    f"{other['p90']:.3f}",
                    f"{ee['expected_macs'] / 1e6:.1f}",
                    f"{ref['mean'] / other['mean']:.2f}x",
                ]
            )
    lines = [
        table(
            [
                "artifact (batch 1, every test image)",
                "top-1",
                "mean ms",
                "p50 ms",
                "p90 ms",
                "MMACs",
                "mean speed-up",
            ],
            rows,
        ),
        "",
    ]
    lines.append(
        table(
            [
                "head",
                "after block",
                "threshold",
                "test top-1 of head",
                "leave here",
                "MMACs to here",
            ],
            early_exit_rows(ee),
        )
    )
    lines.append("")
    target = ", ".join(f"{k} {v}" for k, v in ee["target"].items())
    lines.append(
        f"- exits on vs off, mean batch-1 latency speed-up: {ee['speedup_mean']:.2f}x "
        f"against final.onnx ({ee['speedup_p50']:.2f}x at p50), "
        f"{seg['mean'] / lat['mean']:.2f}x against the same segment files run to "
        "the end; accuracy "
        f"{points_text(-ee['accuracy_drop_points'])}; thresholds calibrated on the "
        f"{record['data']['val']} validation images for {target}"
    )
    b = record["baseline"]
    lines.append(
        f"- FP32 baseline.onnx: {100 * b['accuracy']:.2f}% top-1, p50 "
        f"{b['latency_ms']['p50']:.3f} ms (random input, timed apart from the rows "
        "above)"
    )
    t = record["timing_s"]
    lines.append(
        f"- pipeline time {t['total']:.0f} s (baseline {t['baseline']:.0f} s, stages "
        f"{t['stages']:.0f} s, export {t['export']:.0f} s, measure {t['measure']:.0f} s)"
        + (f"; command wall time {wall_s:.0f} s" if wall_s else "")
    )
    env = record["environment"]
    lines.append(
        f"- {env['cpu']}, {env['measure_threads']} threads, {ee['runtime']}; "
        f"{lat['rounds']} passes over {record['data']['test']} test images per row"
        + (" (subset of the official test split)" if record["data"].get("subset_note") else "")
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--record", type=Path, help="print the table of this record.json, no run")
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "early-exit.yaml")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "early-exit")
    ap.add_argument(
        "overrides", nargs="*", metavar="key.path=value", help="recipe overrides passed to pqd run"
    )
    args = ap.parse_args(argv)
    wall = None
    record_path = args.record
    if record_path is None:
        t0 = time.perf_counter()
        cmd = [
            sys.executable,
            "-m",
            "pqd.cli",
            "run",
            str(args.recipe),
            "--out",
            str(args.out),
            *args.overrides,
        ]
        if subprocess.run(cmd, cwd=ROOT).returncode != 0:
            return 1
        wall = time.perf_counter() - t0
        record_path = args.out / "record.json"
    if not record_path.is_file():
        print(
            f"benchmarks/early_exit.py: error: {record_path} not found; run without --record",
            file=sys.stderr,
        )
        return 2
    try:
        print(render(json.loads(record_path.read_text()), wall))
    except ValueError as exc:
        print(f"benchmarks/early_exit.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
