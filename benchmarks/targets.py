"""What the portable target costs: the quickstart built for ``portable`` (7-bit weights,
exact on every x86 CPU) and for ``x86-vnni`` (full 8-bit weights), side by side.

    python benchmarks/targets.py                    # ~12 min on 2 cores
    python benchmarks/targets.py --out runs/targets --recipe recipes/quickstart.yaml
    python benchmarks/targets.py --recipe recipes/cifar10.yaml --out runs/targets-cifar10 \
        --set baseline.checkpoint=runs/cifar10/baseline.safetensors --results docs/results
    python benchmarks/targets.py --recipe recipes/cifar10.yaml --results docs/results --render

Runs the recipe once per target: the first run trains the baseline and every stage; the
second reuses the first run's baseline and the steps before its first quantize stage (they
do not depend on the target: ``pqd run --resume``) and trains the rest with the other
weight range. Then, in ONE process: the FP32 file and both INT8 files timed in interleaved
rounds at batch 1, in panels that rotate which file goes first (p50: the median over
panels; the speed-up of each INT8 file over the same FP32 file, and their ratio), each
file's parity on this CPU (from its record), the int8 weight pairs that can saturate
without VNNI (read from the file), and its parity on AVX2 kernels (OpenVINO with
oneDNN capped at AVX2: the saturating ``vpmaddubsw`` path, on any newer x86 CPU).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("portable", "x86-vnni")


def _log(msg: str) -> None:
    print(f"[targets] {msg}", file=sys.stderr, flush=True)


def train(
    recipe: Path, out: Path, data_dir: str | None, overrides: list[str] | None = None
) -> dict[str, float]:
    """``pqd run`` once per target (the second resumes from a copy of the first's folder);
    returns each run's wall seconds as its record counts them (``timing_s.total`` plus the
    seconds continued steps carried from before a stop: a run finished before keeps its
    own figure)."""
    walls: dict[str, float] = {}
    for i, target in enumerate(TARGETS):
        folder = out / target
        cmd = [
            sys.executable,
            "-m",
            "pqd.cli",
            "run",
            str(recipe),
            "--out",
            str(folder),
            "--no-progress",
            *(overrides or []),
            f"export.target={target}",
        ]
        if data_dir:
            cmd += ["--data-dir", data_dir]
        if i > 0 and not (folder / "record.json").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            first = out / TARGETS[0]
            shutil.copytree(
                first, folder, ignore=shutil.ignore_patterns("*.onnx", "record.json", "report.md")
            )
            cmd.append("--resume")
        _log(f"pqd run, target {target}")
        if subprocess.run(cmd, cwd=ROOT).returncode != 0:
            raise SystemExit(f"benchmarks/targets.py: error: the {target} run failed")
        record = json.loads((folder / "record.json").read_text(encoding="utf-8"))
        carried = record.get("resume", {}).get("carried_seconds", {})  # before a stop
        walls[target] = round(float(record["timing_s"]["total"]) + sum(carried.values()), 1)
    return walls


def measure(
    out: Path, data_dir: str | None, threads: int, repeats: int, panels: int = 3
) -> dict[str, Any]:
    """One panel over the FP32 file and both INT8 files, plus saturation and AVX2 parity, and
    the two INT8 files compared image by image (paired bootstrap, exact McNemar)."""
    import numpy as np

    from pqd.measurement.env import environment
    from pqd.measurement.parity import parity
    from pqd.measurement.runtime import avx2_logits, open_runner
    from pqd.measurement.saturation import saturation
    from pqd.recipe import MeasureSpec
    from pqd.search.summary import latency_panel

    records = {t: json.loads((out / t / "record.json").read_text()) for t in TARGETS}
    data = run_data(records[TARGETS[0]], data_dir)
    paths = {
        "fp32": out / TARGETS[0] / "baseline.onnx",
        **{t: out / t / "final.onnx" for t in TARGETS},
    }
    spec = MeasureSpec(
        runtimes=["onnxruntime"], threads=threads, batch_sizes=[1], repeats=repeats, warmup=50
    )
    _log(f"latency panels: FP32 and both INT8 files, interleaved, {panels} orders")
    runs = []
    names = list(paths)
    for k in range(panels):  # rotate which file goes first; the median over panels
        order = names[k % len(names) :] + names[: k % len(names)]
        runs.append(latency_panel({n: paths[n] for n in order}, spec, progress=False))
    panel = {
        n: {
            "p50": float(np.median([r[n]["p50"] for r in runs])),
            "panels": [r[n]["p50"] for r in runs],
        }
        for n in names
    }
    x = data.test_x.float().div(255.0).numpy()
    rows: dict[str, Any] = {}
    for t in TARGETS:
        f = records[t]["final"]
        _log(f"{t}: the file on AVX2 kernels (OpenVINO, ONEDNN_MAX_CPU_ISA=AVX2)")
        native = open_runner("openvino", paths[t], threads).run
        reference = np.concatenate([native(x[i : i + 256]) for i in range(0, len(x), 256)])
        rows[t] = {
            "accuracy": f["accuracy"],
            "accuracy_ci": f.get("accuracy_ci"),
            "val_accuracy": f["val_accuracy"],
            "baseline_accuracy": records[t]["baseline"]["accuracy"],
            "p50_ms": panel[t]["p50"],
            "speedup": panel["fp32"]["p50"] / panel[t]["p50"],
            "parity": f["parity"],
            "parity_ok": f.get("parity_ok"),
            "saturation": saturation(paths[t]),
            "avx2_vs_native_openvino": parity(reference, avx2_logits(paths[t], x, threads)),
            "size_bytes": f["size_bytes"],
        }
    from pqd.record import load_predictions
    from pqd.stats import compare_paired

    preds = {t: load_predictions(out / t) for t in TARGETS}
    paired = None
    if all(p is not None for p in preds.values()):
        a, b = preds["portable"], preds["x86-vnni"]
        assert a is not None and b is not None
        c = compare_paired(a["final"], b["final"], a["labels"])
        paired = {**c.as_dict(), "verdict": c.verdict("portable", "8-bit")}
    return {
        "rows": rows,
        "paired": paired,
        "fp32_p50_ms": panel["fp32"]["p50"],
        "panels": panel,
        "environment": environment(threads),
        "data": data.summary(),
    }


def run_data(record: dict[str, Any], data_dir: str | None) -> Any:
    """The data set as the run loaded it: its recorded recipe's data section (folder, image
    size, splits, limits) through the pipeline's own loader (a ``pqd.data.Dataset``)."""
    from pqd.pipeline.inputs import recipe_data
    from pqd.recipe import recipe_from_dict

    recipe = recipe_from_dict(record["recipe"], "record.json")
    return recipe_data(
        recipe.model_copy(update={"data": recipe.data.model_copy(update={"download": False})}),
        data_dir,
    )


def table(result: dict[str, Any]) -> str:
    """Markdown table (one row per target) and the two ratios the issue asks for."""
    from pqd.report.text import ci_text, paired_text

    header = [
        "target",
        "weights",
        "top-1 test",
        "top-1 val",
        "p50 ms (b1)",
        "vs FP32",
        "parity (this CPU, onnxruntime)",
        "pairs at risk",
        "AVX2 kernels vs this CPU",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = result["rows"]

    def agree(p: dict[str, Any]) -> str:
        return f"{100 * p['top1_agreement']:.2f}% (max {p['max_abs_logit_diff']:.3f})"

    for t, r in rows.items():
        lines.append(
            "| "
            + " | ".join(
                [
                    t,
                    "7-bit [-64, 63]" if t != "x86-vnni" else "8-bit [-128, 127]",
                    f"{100 * r['accuracy']:.2f}% {ci_text(r.get('accuracy_ci'))}".strip(),
                    f"{100 * r['val_accuracy']:.2f}%",
                    f"{r['p50_ms']:.3f}",
                    f"{r['speedup']:.2f}x",
                    agree(r["parity"]),
                    str(r["saturation"]["pairs_at_risk"]),
                    agree(r["avx2_vs_native_openvino"]),
                ]
            )
            + " |"
        )
    p, v = rows["portable"], rows["x86-vnni"]
    env = result["environment"]
    lines += [
        "",
        f"- portable keeps {100 * p['speedup'] / v['speedup']:.1f}% of the 8-bit file's "
        f"speed-up over FP32 ({p['speedup']:.2f}x vs {v['speedup']:.2f}x; FP32 "
        f"{result['fp32_p50_ms']:.3f} ms; p50 = median of "
        f"{len(result['panels']['fp32']['panels'])} interleaved panels of the three files, "
        "each with another file first)",
        (
            f"- {paired_text(result['paired'], 'portable', '8-bit')}"
            if result.get("paired")
            else f"- test top-1: portable {100 * (p['accuracy'] - v['accuracy']):+.2f} points "
            "vs 8-bit (no per-image predictions: not compared pairwise)"
        )
        + f" (baseline {100 * p['baseline_accuracy']:.2f}%; {result['data']['test']} test images"
        + (f"; {result['data']['subset_note']})" if result["data"].get("subset_note") else ")"),
        f"- {env['cpu']} ({', '.join(env['cpu_flags'])}); {env['measure_threads']} threads",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "quickstart.yaml")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "targets")
    ap.add_argument("--data-dir", default=None, help="else PQD_DATA_DIR or the recipe's root")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=600, help="timed calls per file and panel")
    ap.add_argument(
        "--panels",
        type=int,
        default=3,
        help="latency panels, each with another file first; p50 = their median",
    )
    ap.add_argument("--json", type=Path, help="write every number here")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="recipe override for both runs, e.g. --set seed=1 "
        "--set baseline.checkpoint=runs/targets/portable/baseline.safetensors",
    )
    ap.add_argument(
        "--results",
        type=Path,
        default=None,
        help="also write DIR/targets-<recipe name>.json and the page .md from it "
        "(e.g. docs/results)",
    )
    ap.add_argument(
        "--render", action="store_true", help="only render the page from --results' JSON"
    )
    args = ap.parse_args(argv)
    from pqd._version import __version__
    from pqd.errors import PqdError
    from pqd.recipe import load_recipe

    try:
        recipe = load_recipe(args.recipe, args.set)
    except PqdError as exc:
        print(f"benchmarks/targets.py: error: {exc.line()}", file=sys.stderr)
        return 2
    json_path = args.results / f"targets-{recipe.name}.json" if args.results else None
    if args.render:
        if json_path is None or not json_path.is_file():
            print(
                f"benchmarks/targets.py: error: {json_path} not found; fix: run without --render",
                file=sys.stderr,
            )
            return 2
        result = json.loads(json_path.read_text(encoding="utf-8"))
    else:
        t0 = time.perf_counter()
        walls = train(args.recipe, args.out, args.data_dir, args.set)
        result = measure(args.out, args.data_dir, args.threads, args.repeats, args.panels)
        result.update(walls_s=walls, wall_s=round(time.perf_counter() - t0, 1))
        result.update(
            name=recipe.name,
            command=" ".join(
                ["python benchmarks/targets.py"]
                + ([f"--recipe {args.recipe}"] if args.recipe != ap.get_default("recipe") else [])
                + [f"--set {o}" for o in args.set]
            ),
            date=datetime.date.today().isoformat(),
            pqd_version=__version__,
            folder_images=recipe.data.dataset == "folder",
        )
    page = render(result)
    print(page)
    if args.json and not args.render:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        if not args.render:
            json_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
        json_path.with_suffix(".md").write_text(page + "\n", encoding="utf-8")
    return 0


def render(result: dict[str, Any]) -> str:
    """The page: what ran, where and when, the table, and the wall times."""
    head = []
    if "command" in result:
        env = result["environment"]
        head = [
            f"# Deployment targets: portable (7-bit) vs 8-bit, {result['name']}",
            "",
            f"`{result['command']}` on {result['date']}: pqd {result['pqd_version']}, "
            f"{env['cpu']} ({', '.join(env['cpu_flags'])})"
            + (
                "; CIFAR-10 as JPEG files (pixels differ from the official files by about "
                "6/255: accuracies are close to, not equal to, published figures)"
                if result.get("folder_images")
                else ""
            )
            + ".",
            "",
        ]
    walls = result["walls_s"]
    return "\n".join(
        [
            *head,
            table(result),
            "- wall seconds of each run (its record.json): "
            + ", ".join(f"{k} {v:.0f} s" for k, v in walls.items())
            + f"; this command {result['wall_s']:.0f} s (a run finished before is not redone)",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
