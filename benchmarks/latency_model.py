"""How well ``pqd plan``'s latency model predicts whole files, in the field's unit.

    python benchmarks/latency_model.py                     # FastNet-Q8, recipes/plan-cifar10.yaml
    python benchmarks/latency_model.py -n 50 --recipe recipes/quickstart.yaml
    python benchmarks/latency_model.py --render            # the page again from its JSON
    python benchmarks/latency_model.py --quick             # smoke test: tiny net, seconds

Builds the recipe's latency model as ``pqd plan`` does (the per-layer pieces measured on this
CPU or read from the machine's cache, the overhead fit on uniform and mixed whole files:
:func:`pqd.planner.latency.setup_latency_model`), then draws ``-n`` random candidates
(every channel group at a random keep level), exports each whole as it ships (INT8 QDQ for a
recipe with a quantize stage) and times them interleaved on the recipe's runtime and
threads at batch 1 (:meth:`pqd.latency_model.LatencyModel.validate`).

Reports the share of candidates whose predicted p50 lies within +-10% of the measured one,
with its 95% Wilson interval, the unit nn-Meter (Zhang et al., MobiSys 2021: 99.0% on a
Cortex-A76 CPU) and LitePred (Feng et al., NSDI 2024: 98.9% over 85 edge platforms) report;
also the median and worst relative error. Those figures are for their devices and kernels,
not this CPU: the comparison is in unit, not in kind. Writes
``docs/results/latency-model-<recipe name>.json`` and renders the ``.md`` page from it.
Random candidates are untrained: a file's latency depends on its widths, not its weights.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
PUBLISHED = (
    ("nn-Meter (MobiSys 2021)", "Cortex-A76 CPU, TFLite", 0.990),
    ("LitePred (NSDI 2024)", "85 edge platforms, mean", 0.989),
)
QUICK = ["model.name=tiny_cnn", "data.limit_train=256", "data.limit_test=64", "data.val_size=64"]


def _log(msg: str) -> None:
    print(f"[latency-model] {msg}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace, recipe: Any, shown: str) -> dict[str, Any]:
    """Build ``recipe``'s latency model, validate it on ``args.n`` random whole candidates and
    return the benchmark's JSON."""
    from pqd._version import __version__
    from pqd.latency_model import LEVELS
    from pqd.measurement.env import environment
    from pqd.planner.latency import setup_latency_model

    runtime = args.runtime or next(
        (r for r in recipe.measure.runtimes if r != "auto"), "onnxruntime"
    )
    threads = args.threads or recipe.measure.threads
    t0 = time.perf_counter()
    setup = setup_latency_model(
        recipe,
        runtime,
        threads,
        (0.5, 1.0) if args.quick else LEVELS,
        data_dir=args.data_dir,
        cache_dir=args.cache_dir,
        timing={"warmup": 2, "repeats": 20, "rounds": 2} if args.quick else None,
        say=_log,
    )
    built_s = time.perf_counter() - t0
    _log(f"timing {args.n} random whole candidates against the model's predictions")
    v = setup.lm.validate(n=args.n, seed=args.seed, panels=args.panels)
    env = environment(threads)
    return {
        "name": recipe.name,
        "model": recipe.model.name,
        "precision": setup.precision,
        "runtime": runtime,
        "threads": threads,
        "seed": args.seed,
        "latency_model": setup.lm.describe(),
        "validation": v,
        "published": [{"source": s, "device": d, "within_10": w} for s, d, w in PUBLISHED],
        "seconds": {
            "build": round(built_s, 1),
            "validate": round(time.perf_counter() - t0 - built_s, 1),
        },
        "cpu": env["cpu"],
        "cpu_flags": env["cpu_flags"],
        "libraries": env["libraries"],
        "pqd_version": __version__,
        "date": datetime.date.today().isoformat(),
        "command": shown,
    }


def _pieces_origin(lm: dict[str, Any]) -> str:
    """Where the model's pieces came from, in words."""
    now, total = lm["pieces_measured_now"], lm["pieces"]
    if now >= total:
        return "all timed in this run"
    if now == 0:
        return "all from this machine's cache"
    return f"{now} timed in this run, the rest from this machine's cache"


def render(s: dict[str, Any]) -> str:
    """The Markdown page from the benchmark's JSON."""
    v = s["validation"]
    lo, hi = v["within_10_ci"]
    within = round(v["within_10"] * v["n"])
    rows = [
        "| predictor | device | within +-10% | [95% CI] | candidates |",
        "|---|---|---|---|---|",
        f"| pqd latency model ({s['precision'].upper()}, {s['runtime']}, {s['threads']} threads)"
        f" | {s['cpu']} | {100 * v['within_10']:.1f}% ({within} of {v['n']}) | "
        f"[{100 * lo:.1f}, {100 * hi:.1f}] | {v['n']} random |",
    ]
    rows += [
        f"| {p['source']} | {p['device']} | {100 * p['within_10']:.1f}% | - | published |"
        for p in s["published"]
    ]
    cands = ["| # | predicted ms | measured ms | error |", "|---|---|---|---|"]
    for i, c in enumerate(sorted(v["candidates"], key=lambda c: c["measured_ms"])):
        cands.append(
            f"| {i + 1} | {c['predicted_ms']:.4f} | {c['measured_ms']:.4f} | "
            f"{100 * c['error']:.1f}% |"
        )
    if "panel_agreement" in v:
        a_lo, a_hi = v["panel_agreement_ci"]
        agree = round(v["panel_agreement"] * v["n"])
        rows.append(
            f"| the measurement itself: panel 2 vs panel 1 | {s['cpu']} | "
            f"{100 * v['panel_agreement']:.1f}% ({agree} of {v['n']}) | "
            f"[{100 * a_lo:.1f}, {100 * a_hi:.1f}] | the same {v['n']} files |"
        )
    lm = s["latency_model"]
    names = [c["name"] for c in lm.get("calibration", [])]
    mixed = sum(n.startswith("mixed-") for n in names)
    return "\n".join(
        [
            f"# Latency model accuracy: {s['model']} ({s['name']})",
            "",
            f"`{s['command']}` on {s['date']}: pqd {s['pqd_version']}, {s['cpu']} "
            f"({', '.join(s['cpu_flags'])}), {s['runtime']} "
            f"{s['libraries'].get(s['runtime'], '')}, {s['threads']} threads, batch 1 p50.",
            "",
            *rows,
            "",
            f"Relative error over the {v['n']} candidates: median "
            f"{100 * v['median_error']:.1f}%, worst {100 * v['worst_error']:.1f}%. The model: "
            f"{lm['pieces']} measured pieces ({_pieces_origin(lm)}), overhead "
            f"{lm['overhead_ms']:.4f} ms, scale "
            f"{lm['scale']:.3f} fitted on {len(names) - mixed} uniform and {mixed} mixed-width "
            f"whole networks (other ones than these candidates); built in "
            f"{s['seconds']['build']:.0f} s, candidates exported and timed in "
            f"{s['seconds']['validate']:.0f} s.",
            "",
            "Each candidate keeps every channel group at a random level of the tables' grid "
            f"({', '.join(f'{x:g}' for x in lm['levels'])}); its file is exported whole, untrained "
            "(latency depends on the widths, not the weights), and timed interleaved with the "
            "others"
            + (
                f" in {v['panels']} panels, each with its own sessions and the files in the "
                "other order (measured: the median of the panels; the table's last row: how "
                "often two panels of the same files agree within +-10%, the ceiling for any "
                "predictor)"
                if "panels" in v
                else ""
            )
            + "; onnxruntime sessions are opened without spinning, as every panel of the "
            "model's is. The published figures are for other devices and kernels: the "
            "comparison is in unit, not in kind.",
            "",
            *cands,
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "plan-cifar10.yaml")
    ap.add_argument("-n", type=int, default=30, help="random whole candidates (default 30)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random candidates")
    ap.add_argument(
        "--panels",
        type=int,
        default=2,
        help="times each candidate is timed, each in its own panel (measured: their median)",
    )
    ap.add_argument("--runtime", default=None, help="else the recipe's first runtime")
    ap.add_argument("--threads", type=int, default=None, help="else the recipe's")
    ap.add_argument("--data-dir", default=None, help="the data folder (else the recipe's)")
    ap.add_argument("--cache-dir", default=None, help="latency cache (else PQD_CACHE_DIR)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="where JSON and page go")
    ap.add_argument("--render", action="store_true", help="only render the stored JSON")
    ap.add_argument("--quick", action="store_true", help="tiny net, coarse grid: a smoke test")
    ap.add_argument("overrides", nargs="*", metavar="key.path=value")
    args = ap.parse_args(argv)
    from pqd._quiet import quiet_command

    quiet_command()
    if args.n < 1:
        print("benchmarks/latency_model.py: error: -n must be at least 1; fix: e.g. -n 30")
        return 2
    from pqd.errors import PqdError
    from pqd.recipe import load_recipe

    try:
        recipe = load_recipe(args.recipe, [*(QUICK if args.quick else []), *args.overrides])
        json_path = args.results / f"latency-model-{recipe.name}.json"
        if not args.render:
            shown = " ".join(
                ["python benchmarks/latency_model.py"]
                + ([f"--recipe {args.recipe}"] if args.recipe != ap.get_default("recipe") else [])
                + ([f"-n {args.n}"] if args.n != ap.get_default("n") else [])
                + (["--quick"] if args.quick else [])
                + args.overrides
            )
            summary = run(args, recipe, shown)
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    except PqdError as e:
        print(f"benchmarks/latency_model.py: error: {e}", file=sys.stderr)
        return 2
    if not json_path.is_file():
        print(f"benchmarks/latency_model.py: error: {json_path} not found; run without --render")
        return 2
    page = render(json.loads(json_path.read_text(encoding="utf-8")))
    json_path.with_suffix(".md").write_text(page, encoding="utf-8")
    print(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
