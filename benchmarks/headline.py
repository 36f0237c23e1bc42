"""pqd's headline: a recipe's baseline against its compressed INT8 file, with the statistics.

    python benchmarks/headline.py                       # recipes/cifar10.yaml, the whole CIFAR-10
    python benchmarks/headline.py --recipe recipes/quickstart.yaml --out runs/quick
    python benchmarks/headline.py --render              # the page again from the stored JSON

Runs ``pqd run RECIPE --out OUT`` (a stopped run continues where it stopped: run the same
command again), then writes ``docs/results/<recipe name>.json`` from the run's record and
per-image predictions and renders ``docs/results/<recipe name>.md`` from that JSON:

- top-1 of both files on the test split with 95% Wilson intervals, on every runtime;
- final vs baseline on the same images: the difference with its paired-bootstrap 95%
  interval, the exact McNemar test, and the share of images whose predicted class differs;
- size on disk, batch-1 and batch-64 p50 and the speed-up of the INT8 file on every runtime
  (onnxruntime, OpenVINO when installed), timed side by side in one run;
- wall time per step (baseline, each stage, export, measure), the CPU model and flags, the
  versions, the date and the command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def summarize(record: dict[str, Any], command: str, wall_s: float | None) -> dict[str, Any]:
    """The benchmark's JSON from a run's record.json (no I/O)."""
    env = record["environment"]
    b, f = record["baseline"], record["final"]
    arts = {}
    for key, r in (("baseline", b), ("final", f)):
        arts[key] = {
            "precision": r["precision"],
            "size_bytes": r["size_bytes"],
            "sparsity": r["sparsity"],
            "runtimes": {
                rt: {
                    "accuracy": res["accuracy"],
                    "accuracy_ci": res.get("accuracy_ci"),
                    "p50_ms": {bs: v["p50"] for bs, v in res["latency_ms"]["batches"].items()},
                    "agreement_with_torch": res["parity"]["top1_agreement"],
                }
                for rt, res in r["runtimes"].items()
            },
        }
    speedups = {
        rt: {
            bs: round(p50 / arts["final"]["runtimes"][rt]["p50_ms"][bs], 3)
            for bs, p50 in res["p50_ms"].items()
            if bs in arts["final"]["runtimes"][rt]["p50_ms"]
        }
        for rt, res in arts["baseline"]["runtimes"].items()
        if rt in arts["final"]["runtimes"]
    }
    steps = {"baseline": record["timing_s"]["baseline"]}
    for s in record["stages"]:
        steps[f"{s['index'] + 1}. {s['name']}"] = s["seconds"]
    steps.update(export=record["timing_s"]["export"], measure=record["timing_s"]["measure"])
    return {
        "benchmark": "headline",
        "name": record["name"],
        "command": command,
        "date": datetime.date.today().isoformat(),
        "pqd_version": record["pqd_version"],
        "libraries": env.get("libraries", {}),
        "cpu": env["cpu"],
        "cpu_flags": [fl for fl in env["cpu_flags"] if fl in FLAGS],
        "threads": env["measure_threads"],
        "model": record["recipe"]["model"]["name"],
        "model_kwargs": record["recipe"]["model"].get("kwargs") or {},
        "order": record["order"],
        "data": {k: record["data"].get(k) for k in ("name", "root", "train", "val", "test")},
        "epochs": {
            "baseline": record["recipe"]["baseline"]["epochs"],
            **{s["name"]: s["config"]["epochs"] for s in record["stages"]},
        },
        "artifacts": arts,
        "paired": record["comparison"].get("paired"),
        "speedup": speedups,
        "size_ratio": record["comparison"]["size_ratio"],
        "seconds": steps,
        # steps stopped and continued: after which epoch, and whether their seconds count
        # the time before the stop (records that have carried_seconds) or this process only
        "continued": record.get("resume", {}).get("continued_after_epoch", {}),
        "carried": "carried_seconds" in record.get("resume", {}),
        "wall_s": None if wall_s is None else round(wall_s, 1),
        # the run over every process that worked on it (records from before: None)
        "run_s": record["timing_s"].get("all_processes"),
    }


def model_text(s: dict[str, Any]) -> str:
    """The model as the recipe builds it (:func:`pqd.markdown.model_text`)."""
    from pqd.markdown import model_text as text

    return text(s["model"], s.get("model_kwargs"))


def render(s: dict[str, Any]) -> str:
    """The results page (Markdown) from the benchmark's JSON."""
    from pqd.report.text import ci_text, paired_text

    jpeg = "jpg" in str(s["data"].get("root") or "")
    lines = [
        f"# Headline: {s['name']}",
        "",
        f"`{s['command']}` on {s['date']}: pqd {s['pqd_version']}, {s['cpu']} "
        f"({', '.join(s['cpu_flags'])}), {s['threads']} threads; "
        + ", ".join(f"{k} {v}" for k, v in sorted(s["libraries"].items())),
        "",
        f"{model_text(s)}, {' -> '.join(s['order'])}; {s['data']['train']} train / "
        f"{s['data']['val']} validation / {s['data']['test']} test images"
        + (
            " (CIFAR-10 as JPEG files: pixels differ from the official files by about 6/255, "
            "so accuracies are close to, not equal to, published CIFAR-10 figures)"
            if jpeg
            else ""
        )
        + "; epochs: "
        + ", ".join(f"{k} {v}" for k, v in s["epochs"].items())
        + ".",
        "",
        "| file | precision | runtime | top-1 [95% CI] | MB | p50 ms b1 | p50 ms b64 |"
        " speed-up b1 | speed-up b64 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key in ("baseline", "final"):
        a = s["artifacts"][key]
        for rt, r in a["runtimes"].items():
            up = s["speedup"].get(rt, {}) if key == "final" else {}
            lines.append(
                f"| {key} | {a['precision']} | {rt} | {100 * r['accuracy']:.2f}% "
                f"{ci_text(r['accuracy_ci'])} | {a['size_bytes'] / 1e6:.2f} | "
                f"{r['p50_ms'].get('1', float('nan')):.3f} | "
                f"{r['p50_ms'].get('64', float('nan')):.2f} | "
                + (f"{up['1']:.2f}x | " if "1" in up else "- | ")
                + (f"{up['64']:.2f}x |" if "64" in up else "- |")
            )
    lines += [""]
    if s["paired"]:
        p = s["paired"]
        lines.append(
            f"{paired_text(p)}; the two files' predicted classes differ on "
            f"{100 * p['disagreement']:.2f}% of the images."
        )
    lines += [
        "",
        f"{s['size_ratio']:.2f}x smaller on disk. Wall time per step (s): "
        + ", ".join(f"{k} {v:.0f}" for k, v in s["seconds"].items())
        + (
            f"; the run {s['run_s']:,.0f} s over every process that worked on it"
            if s.get("run_s") and s.get("wall_s") and s["run_s"] > 1.02 * s["wall_s"] + 5
            else ""
        )
        + (f"; this command {s['wall_s']:.0f} s" if s.get("wall_s") else "")
        + "."
        + (
            " Stopped and continued: "
            + ", ".join(f"{k} after epoch {v}" for k, v in s["continued"].items())
            + (
                " (its seconds include the time before the stop)."
                if s.get("carried")
                else " (its seconds count the last process only)."
            )
            if s.get("continued")
            else ""
        ),
        "",
        "Top-1: the file's own accuracy on the test split, run through the runtime; speed-up: "
        "the baseline file's p50 over the final file's, both timed side by side in one run.",
        "",
    ]
    return "\n".join(lines)


README_START = "<!-- headline: written by python benchmarks/headline.py --render -->"
README_END = "<!-- /headline -->"


def readme_block(s: dict[str, Any]) -> str:
    """The README's headline table: both files on onnxruntime, the paired comparison, and
    one line with pqd's version, the date, the CPU and its flags, and the command."""
    from pqd.report.text import ci_text, paired_text

    base, final = s["artifacts"]["baseline"], s["artifacts"]["final"]
    rt = "onnxruntime" if "onnxruntime" in final["runtimes"] else next(iter(final["runtimes"]))
    rows = [
        "| file | top-1 [95% CI] | MB | p50 ms, batch 1 | speed-up |",
        "|---|---|---|---|---|",
    ]
    for key, a in (("baseline (FP32)", base), (f"final ({final['precision'].upper()})", final)):
        r = a["runtimes"][rt]
        up = s["speedup"].get(rt, {}).get("1") if a is final else None
        rows.append(
            f"| {key} | {100 * r['accuracy']:.2f}% {ci_text(r['accuracy_ci'])} | "
            f"{a['size_bytes'] / 1e6:.2f} | {r['p50_ms'].get('1', float('nan')):.3f} | "
            + (f"{up:.2f}x |" if up else "- |")
        )
    lines = [
        README_START,
        f"{model_text(s)} on the whole CIFAR-10 (JPEG files: close to, not equal to, the official"
        f" images), {' -> '.join(s['order'])}, {rt}:",
        "",
        *rows,
        "",
        (paired_text(s["paired"]) + "." if s["paired"] else ""),
        "",
        f"pqd {s['pqd_version']}, {s['date']}, {s['cpu']} ({', '.join(s['cpu_flags'])}), "
        f"{s['threads']} threads: `{s['command']}` ([the page](docs/results/{s['name']}.md)).",
        README_END,
    ]
    return "\n".join(lines)


def write_readme(s: dict[str, Any], readme: Path) -> None:
    """Replace the README's headline block (between its markers) with :func:`readme_block`."""
    text = readme.read_text(encoding="utf-8")
    start, end = text.index(README_START), text.index(README_END) + len(README_END)
    readme.write_text(text[:start] + readme_block(s) + text[end:], encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "cifar10.yaml")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "cifar10")
    ap.add_argument("--render", action="store_true", help="only render the stored JSON")
    ap.add_argument("--results", type=Path, default=RESULTS, help="where JSON and page go")
    ap.add_argument("--data-dir", default=None, help="the data folder (else the recipe's)")
    ap.add_argument("overrides", nargs="*", metavar="key.path=value")
    args = ap.parse_args(argv)
    from pqd.errors import PqdError
    from pqd.recipe import load_recipe

    try:
        name = load_recipe(args.recipe, args.overrides).name
    except PqdError as exc:
        print(f"benchmarks/headline.py: error: {exc.line()}", file=sys.stderr)
        return 2
    json_path = args.results / f"{name}.json"
    if not args.render:
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "pqd.cli", "run", str(args.recipe), "--out", str(args.out)]
        cmd += ["--no-progress", "--resume", *args.overrides]
        if args.data_dir:
            cmd += ["--data-dir", args.data_dir]
        if subprocess.run(cmd, cwd=ROOT).returncode != 0:
            return 1
        record = json.loads((args.out / "record.json").read_text(encoding="utf-8"))
        shown = " ".join(
            ["python benchmarks/headline.py"]
            + ([f"--recipe {args.recipe}"] if args.recipe != ap.get_default("recipe") else [])
            + args.overrides
        )
        summary = summarize(record, shown, time.perf_counter() - t0)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if not json_path.is_file():
        print(f"benchmarks/headline.py: error: {json_path} not found; run without --render")
        return 2
    summary = json.loads(json_path.read_text(encoding="utf-8"))
    page = render(summary)
    json_path.with_suffix(".md").write_text(page, encoding="utf-8")
    if args.results == RESULTS and name == "cifar10":  # the README's headline
        write_readme(summary, ROOT / "README.md")
    print(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
