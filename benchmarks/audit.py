"""The audit table: what compression cost the quickstart beyond top-1.

    python benchmarks/audit.py --run runs/quick          # audit a finished run folder, print
    python benchmarks/audit.py --run runs/quick --reuse  # table of an audit already recorded
    python benchmarks/audit.py --search runs/search      # one row per audited search trial

Runs the full audit (:func:`pqd.pipeline.audit_run`: per-class damage, disagreement,
calibration, the 11 x 5 corruption suite, peak memory and CPU-seconds of a fresh process) on
the run's baseline.onnx and final.onnx, writes it into the run's record.json and report.md,
and prints a Markdown table (baseline vs final) with the CPU it was measured on. ``--search``
audits every finished trial of a ``pqd search`` folder and prints, per order, top-1 next to
the robustness numbers (do some orders cost more robustness at equal top-1?).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def cpu_line(record: dict[str, Any]) -> str:
    """The CPU the numbers were measured on (model name, flags that decide INT8 speed)."""
    env = record["environment"]
    return (
        f"{env['cpu']}, {env['logical_cpus']} logical CPUs ("
        f"{', '.join(env['cpu_flags']) or 'no AVX-512/VNNI flags'}), "
        f"{env['measure_threads']} threads, {record['final']['audit']['runtime']}"
    )


def rows(record: dict[str, Any]) -> list[list[str]]:
    """Metric, baseline, final."""
    b, f = record["baseline"]["audit"], record["final"]["audit"]
    vs = f["vs_baseline"]
    worst = vs["largest_class_drop"]
    dis = vs["disagreement"]

    def both(get: Any) -> list[str]:
        out = []
        for a in (b, f):
            try:
                out.append(get(a))
            except (KeyError, TypeError):
                out.append("-")
        return out

    out = [
        ["test top-1", *both(lambda a: _pct(a["accuracy"]))],
        [
            "worst class top-1",
            *both(lambda a: f"{_pct(a['worst_class']['accuracy'])} ({a['worst_class']['class']})"),
        ],
        ["largest per-class drop", "-", f"{worst['points']:+.2f} points ({worst['class']})"],
        [
            "top-1 changed vs baseline",
            "-",
            f"{dis['count']}/{dis['images']} ({_pct(dis['fraction'])}), "
            f"{dis['right_before']} right before",
        ],
        ["ECE (15 bins)", *both(lambda a: f"{a['calibration']['ece']:.4f}")],
        [
            "NLL / Brier",
            *both(lambda a: f"{a['calibration']['nll']:.3f} / {a['calibration']['brier']:.3f}"),
        ],
        [
            "mean corruption top-1 (11 x 5)",
            *both(lambda a: _pct(a["corruptions"]["mean_accuracy"])),
        ],
    ]
    c = vs.get("corruption")
    if c:
        out.append(
            [
                "corruption error vs baseline (CE / relative CE)",
                "1.000 / 1.000",
                f"{c['mean_ce']:.3f} / "
                + ("-" if c["mean_relative_ce"] is None else f"{c['mean_relative_ce']:.3f}"),
            ]
        )
    out += [
        [
            "p50 / p99 / max ms (batch 1)",
            *both(
                lambda a: (
                    f"{a['latency_ms_b1']['p50']:.3f} / {a['latency_ms_b1']['p99']:.3f} "
                    f"/ {a['latency_ms_b1']['max']:.3f}"
                )
            ),
        ],
        ["weight bytes", *both(lambda a: f"{a['weight_bytes']:,}")],
        [
            "peak memory, fresh process (MB)",
            *both(
                lambda a: (
                    f"{a['memory']['peak_rss_bytes'] / 1e6:.1f} (file + session "
                    f"{a['memory']['artifact_bytes'] / 1e6:.1f})"
                )
            ),
        ],
        [
            "CPU-ms per inference, batch 1 (proxy)",
            *both(lambda a: f"{1e3 * a['energy']['cpu_s_per_inference']:.3f}"),
        ],
        [
            "joules per inference (RAPL)",
            *both(
                lambda a: (
                    "null (not readable)"
                    if a["energy"]["joules_per_inference"] is None
                    else f"{a['energy']['joules_per_inference']:.5f}"
                )
            ),
        ],
    ]
    return out


def render(record: dict[str, Any]) -> str:
    """The Markdown table, the CPU line and the RAPL reason."""
    lines = ["| | baseline | final |", "|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows(record)]
    energy = record["final"]["audit"].get("energy")
    lines += ["", f"- measured on {cpu_line(record)}; {record['data']['test']} test images"]
    if energy and not energy["rapl"]["readable"]:
        lines.append(f"- RAPL: {energy['rapl']['reason']}")
    return "\n".join(lines)


def search_rows(search_dir: Path, data_dir: str | None, reuse: bool) -> list[list[str]]:
    """Per finished trial of a search folder: order, top-1, largest class drop,
    disagreement, ECE, mean corruption top-1, relative CE."""
    from pqd.pipeline import audit_run

    search = json.loads((search_dir / "search.json").read_text(encoding="utf-8"))
    out = []
    for t in search["trials"]:
        if t["status"] != "done":
            continue
        folder = search_dir / t["dir"]
        record = json.loads((folder / "record.json").read_text(encoding="utf-8"))
        if not (reuse and "corruptions" in record["final"].get("audit", {})):
            record = audit_run(folder, data_dir=data_dir, progress=False)
        f = record["final"]["audit"]
        vs = f["vs_baseline"]
        rel = vs["corruption"]["mean_relative_ce"]
        out.append(
            [
                t["kind"],
                t["label"],
                str(t["seed"]),
                _pct(f["accuracy"]),
                f"{vs['largest_class_drop']['points']:+.2f}",
                _pct(vs["disagreement"]["fraction"]),
                f"{f['calibration']['ece']:.4f}",
                _pct(f["corruptions"]["mean_accuracy"]),
                "-" if rel is None else f"{rel:.3f}",
            ]
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--run", type=Path, help="a 'pqd run' folder")
    where.add_argument("--search", type=Path, help="a 'pqd search' folder")
    ap.add_argument("--data-dir", default=None, help="folder holding the data sets")
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="print the audit already in record.json (no new measurement)",
    )
    args = ap.parse_args(argv)
    from pqd.errors import PqdError
    from pqd.pipeline import audit_run

    try:
        if args.search is not None:
            header = [
                "kind",
                "order",
                "seed",
                "top-1",
                "largest class drop (points)",
                "disagreement",
                "ECE",
                "corruption top-1",
                "relative CE",
            ]
            body = search_rows(args.search, args.data_dir, args.reuse)
            print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
            print("\n".join("| " + " | ".join(r) + " |" for r in body))
            return 0
        path = args.run / "record.json"
        record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        if not (args.reuse and record and "corruptions" in record["final"].get("audit", {})):
            record = audit_run(args.run, data_dir=args.data_dir, progress=False)
        print(render(record))
    except PqdError as exc:
        print(f"benchmarks/audit.py: error: {exc.line()}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
