"""pqd's quickstart against the same job written by hand (benchmarks/handwritten.py).

    python benchmarks/vs_handwritten.py                # runs both (~20 min on 2 cores)
    python benchmarks/vs_handwritten.py --reuse        # only re-time existing artifacts

Runs ``pqd run recipes/quickstart.yaml`` and ``benchmarks/handwritten.py`` one after the
other (each timed as a whole command), then times all four artifacts (each job's FP32 and
INT8 ONNX file) in ONE interleaved ``compare_latency`` call on onnxruntime at batch 1 with 2
threads, and prints accuracy on the same test split, MB on disk, batch-1 p50/p90, each
job's INT8-over-FP32 speed-up, and the wall time of each command.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str]) -> float:
    """Run ``cmd`` from the repository root; its wall seconds (exits on failure)."""
    t0 = time.perf_counter()
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        sys.exit(f"vs_handwritten: error: {' '.join(cmd)} failed")
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "vs_handwritten")
    ap.add_argument("--reuse", action="store_true", help="do not re-run the jobs")
    ap.add_argument("--repeats", type=int, default=600)
    args = ap.parse_args()
    pqd_dir, hand_dir = args.out / "pqd", args.out / "handwritten"
    walls: dict[str, float | None] = {"pqd": None, "hand": None}
    if not args.reuse:
        walls["pqd"] = timed(
            [
                sys.executable,
                "-m",
                "pqd.cli",
                "run",
                "recipes/quickstart.yaml",
                "--out",
                str(pqd_dir),
                "--no-progress",
            ]
        )
        walls["hand"] = timed([sys.executable, "benchmarks/handwritten.py", "--out", str(hand_dir)])

    from pqd.measurement.artifacts import size_bytes
    from pqd.measurement.latency import compare_latency
    from pqd.measurement.runtime import open_runner

    record = json.loads((pqd_dir / "record.json").read_text())
    hand = json.loads((hand_dir / "result.json").read_text())
    files = {
        "pqd FP32": (pqd_dir / "baseline.onnx", record["baseline"]["accuracy"]),
        "pqd INT8": (pqd_dir / "final.onnx", record["final"]["accuracy"]),
        "hand-written FP32": (hand_dir / "fp32.onnx", hand["fp32_accuracy"]),
        "hand-written INT8": (hand_dir / "int8.onnx", hand["int8_accuracy"]),
    }
    runs = {
        name: open_runner("onnxruntime", path, threads=2).run for name, (path, _) in files.items()
    }
    stats = compare_latency(
        runs, (1, 3, 32, 32), warmup=100, repeats=args.repeats, rounds=10, desc="latency batch 1"
    )
    print("| artifact | top-1 (test) | MB | p50 ms (b1) | p90 ms (b1) | INT8 vs own FP32 |")
    print("|---|---|---|---|---|---|")
    for name, (path, acc) in files.items():
        own = stats[name.replace("INT8", "FP32")].p50 / stats[name].p50
        print(
            f"| {name} | {100 * acc:.2f}% | {size_bytes(path) / 1e6:.2f} | "
            f"{stats[name].p50:.3f} | {stats[name].p90:.3f} | "
            + (f"{own:.2f}x |" if "INT8" in name else "- |")
        )
    ratio = stats["hand-written INT8"].p50 / stats["pqd INT8"].p50
    print(
        f"\n- pqd's INT8 artifact is {ratio:.2f}x faster at batch 1 than the hand-written one "
        f"(p50, onnxruntime, 2 threads, {args.repeats} calls each in 10 interleaved rounds)"
    )
    print(
        f"- accuracy: pqd {100 * record['final']['accuracy']:.2f}% vs hand-written "
        f"{100 * hand['int8_accuracy']:.2f}% on the same {hand['test_images']} test images "
        "(a subset of CIFAR-10's test split)"
    )
    if walls["pqd"] is not None:
        print(
            f"- wall time: pqd {walls['pqd']:.0f} s vs hand-written {walls['hand']:.0f} s "
            "(whole commands, one after the other)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
