"""``pqd plan`` against what a user does by hand, at budgets measured in the same run.

    python benchmarks/plan.py                                  # ResNet-18, CIFAR subset
    python benchmarks/plan.py --recipe recipes/quickstart.yaml # FastNet-Q8 (its prune stage
                                                               #  is kept; a prune_channels
                                                               #  stage is put first)
    python benchmarks/plan.py model.name=mypkg.nets:small_net  # a user model
    python benchmarks/plan.py --quick                          # smoke test: tiny net, seconds
    python benchmarks/plan.py --recipe recipes/plan-cifar10.yaml --results docs/results
                                            # the full-scale page: docs/results/plan-*.md

1. The dense model's INT8 file is exported and timed here (batch 1 p50, the recipe's runtime
   and threads); the budgets are ``--fractions`` (default 0.5 and 0.25) of it.
2. For each budget, ``pqd plan`` runs (the first budget trains the baseline, later budgets
   load its checkpoint and start from its sensitivity analysis and trained candidates, see
   ``share_work``; the latency tables are cached per machine, so later budgets measure no
   pieces).
3. By hand: uniform ``prune_channels`` at the smallest ratio (0.05 steps) whose whole file
   meets the budget when measured, then the recipe's other stages (e.g. INT8 QAT + KD) from
   the same baseline checkpoint, with the same total epochs as every plan candidate. When
   that ratio is the plan's own uniform reference, the plan's run of it is the hand-made
   run (the same training; not trained twice). Every other candidate the plan trained is
   compared with it too, image by image, Holm over those within the budget.
4. The pick's and the hand-made final files are timed side by side with the dense file,
   scaled to the dense p50 of step 1 (the VM drifts within a run), in several panels whose
   median counts (one panel can be off by more than the tolerance on a shared VM). Printed
   per budget: measured p50 of both and their spread over the panels, test top-1 of both,
   whether the pick (within the budget, 5% timing noise allowed) is at least as accurate,
   the latency model's error (median and worst), candidates estimated / trained, and the
   wall time.
5. Equal latency (``--no-iso`` skips it): the hand-made file uses less of the budget than the
   pick when the uniform steps jump (ResNet-18: ratio 0.45 ran over 0.5x, 0.5 well under),
   so ``pqd plan`` runs once more with the hand-made file's measured p50 as the budget, and
   that pick is timed beside the hand-made file. "At least as accurate at equal or lower
   latency" holds when the budget's pick or this one is at least as accurate as the
   hand-made run and at most 5% slower than its file.

A model that pqd cannot build or plan (e.g. ``module:callable`` that is not importable)
ends with one line ``plan benchmark: error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 0.05  # timing noise a file may run over its budget and still meet it, as the pick
QUICK = [
    "model.name=tiny_resnet",
    "data.limit_train=256",
    "data.limit_test=64",
    "data.val_size=64",
    "baseline.epochs=1",
    "train.batch_size=32",
    "train.amp='off'",
    "stages.0.epochs=1",
    "stages.0.round_to=2",
    "stages.1.epochs=0",
    "stages.2.epochs=0",
    "export.parity_samples=32",
    "export.compress=false",
    "measure.warmup=2",
    "measure.repeats=20",
]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from pqd.checkpoint import atomic_write_text
    from pqd.latency_model.model import LEVELS
    from pqd.pipeline import run as run_recipe
    from pqd.planner import PlanError, plan
    from pqd.planner.latency import (
        files_against_dense,
        ratio_steps,
        setup_latency_model,
        uniform_by_measurement,
    )
    from pqd.recipe import load_recipe, recipe_from_dict

    t0 = time.perf_counter()
    overrides = [*(QUICK if args.quick else []), *args.overrides]
    recipe = load_recipe(args.recipe, overrides)
    out = Path(args.out)
    levels = (0.5, 1.0) if args.quick else LEVELS
    timing = {"warmup": 2, "repeats": 20, "rounds": 2} if args.quick else None
    runtime = next((r for r in recipe.measure.runtimes if r != "auto"), "onnxruntime")
    setup = setup_latency_model(
        recipe,
        runtime,
        recipe.measure.threads,
        levels,
        data_dir=args.data_dir,
        cache_dir=args.cache_dir,
        timing=timing,
    )
    base_data, index, precision, pc, lm = (
        setup.base_data,
        setup.index,
        setup.precision,
        setup.stage,
        setup.lm,
    )
    threads = recipe.measure.threads
    # what the dense p50 depends on: a run into the same --out continues only with these
    inputs = {
        "recipe": recipe.name,
        "model": recipe.model.name,
        "runtime": runtime,
        "threads": threads,
        "precision": precision,
        "quick": bool(args.quick),
    }
    dense = args.dense_ms or earlier_dense_ms(out, inputs) or lm.measure({"dense": {}})["dense"]
    before = earlier_wall_s(out, inputs)  # a continued run adds the time of those before it
    print(f"dense {precision.upper()} p50: {dense:.3f} ms ({runtime}, {threads} threads)")
    rows: list[dict[str, Any]] = []

    def summary() -> dict[str, Any]:
        return {
            "dense_ms": dense,
            "dense_inputs": inputs,
            "rows": rows,
            "wall_s": round(before + time.perf_counter() - t0, 1),
        }

    def save() -> None:  # after each budget: a run stopped later keeps what it measured
        # by atomic rename, as pqd writes: a copy of the folder made with hard links (cp -al)
        # keeps its own bench.json
        atomic_write_text(out / "bench.json", json.dumps(summary(), indent=1))

    out.mkdir(parents=True, exist_ok=True)
    save()  # the dense p50 first: a run stopped in its first budget continues at its budgets
    first: Path | None = None  # the first budget's plan folder: later ones start from it
    for frac in args.fractions:
        budget = frac * dense
        row: dict[str, Any] = {"fraction": frac, "budget_ms": round(budget, 4)}
        folder = out / f"plan-{frac:g}"
        if first is not None:
            share_work(first, folder)
        first = first or folder
        try:
            result = plan(
                recipe,
                budget,
                folder,
                k=args.k,
                validate=args.validate,
                n_random=200 if args.quick else 2000,
                levels=levels,
                dense_ms=dense,
                data_dir=args.data_dir,
                cache_dir=args.cache_dir,
                timing=timing,
                progress=not args.no_progress,
            )
        except PlanError as exc:
            row["plan_error"] = exc.line()
            rows.append(row)
            save()
            continue
        finally:  # later budgets load this baseline instead of training their own
            trained = folder / "baseline" / "baseline.safetensors"
            if recipe.baseline.checkpoint is None and trained.is_file():
                shared = f"baseline.checkpoint={trained.resolve()}"
                recipe = load_recipe(args.recipe, [*overrides, shared])
        pick = result["pick"]
        v = result["latency_model"]["validation"] or {}
        row.update(
            counts=result["counts"],
            model_error={"median": v.get("median_error"), "worst": v.get("worst_error")},
            pick={
                "ratios": pick["ratios"],
                "val": pick["val_accuracy"],
                "test": pick["accuracy"],
                "uniform_reference": pick.get("uniform_reference"),
            },
        )
        # by hand: uniform ratio meeting the budget, same stages, same baseline checkpoint
        ratio, _ = uniform_by_measurement(
            lm, budget, ratio_steps(pc.get("max_ratio", 0.9)), 0.05, dense_ms=dense
        )
        reference = uniform_trained(result, ratio)
        if reference is not None:  # the planner trained this very run: not twice
            hand_dir = folder / reference["dir"]
            record = json.loads((hand_dir / "record.json").read_text(encoding="utf-8"))
        else:
            hand = json.loads(json.dumps(base_data))
            hand["name"] = f"{recipe.name}-hand-{frac:g}"
            stage = hand["stages"][index]
            stage.pop("ratios", None)
            stage["ratio"] = ratio
            hand["baseline"] = {
                **hand["baseline"],
                "checkpoint": str(folder.resolve() / "baseline" / "baseline.safetensors"),
            }
            hand_dir = out / f"hand-{frac:g}-ratio-{ratio:g}"
            record = run_recipe(
                recipe_from_dict(hand, "hand-made"),
                hand_dir,
                data_dir=args.data_dir,
                progress=not args.no_progress,
            )
        # one panel with the dense file, on the scale of the dense p50 the budget was set from
        # (the VM drifts within a run), timed as the planner times whole files
        dense_file = folder / result["dense_file"]
        finals = {"pick": folder / pick["dir"] / "final.onnx", "hand": hand_dir / "final.onnx"}
        timed = files_against_dense(lm, finals, dense_file, dense)
        row["final_dense_raw_ms"] = timed.dense_raw_ms
        row["hand"] = {
            "ratio": ratio,
            "val": record["final"].get("val_accuracy"),
            "test": record["final"]["accuracy"],
            "planner_reference": reference is not None,
        }
        row["planned"] = planned_vs_hand(result, folder, hand_dir)
        for name in ("pick", "hand"):
            row[name]["p50_ms"] = timed.ms[name]
            row[name]["raw_p50_ms"] = timed.ms[name] * timed.dense_raw_ms / dense
            row[name]["spread"] = timed.spread[name]
        row["pick_within_budget"] = row["pick"]["p50_ms"] <= budget * (1 + TOLERANCE)
        row["more_accurate_within_budget"] = (
            row["pick_within_budget"] and row["pick"]["test"] >= row["hand"]["test"]
        )
        row["paired"] = paired_vs_hand(folder / pick["dir"], hand_dir)
        row["pick_wins"] = row["pick"]["test"] >= row["hand"]["test"] and row["pick"][
            "p50_ms"
        ] <= row["hand"]["p50_ms"] * (1 + TOLERANCE)
        if args.iso:  # the planner asked for the hand-made file's own latency
            row["iso"] = iso_row(
                args, recipe, out, frac, row, hand_dir, folder, dense_file, dense, lm
            )
        rows.append(row)
        save()
    return summary()


def uniform_trained(result: dict[str, Any], ratio: float) -> dict[str, Any] | None:
    """The plan's trained uniform reference when it pruned every channel group at ``ratio``
    (the hand-made ratio, measured again here) and finished: the same stages, epochs and
    baseline checkpoint as the hand-made run, so it is that run; None otherwise."""
    for entry in result.get("trained", []):
        ref = entry.get("uniform_reference")
        if ref is not None and abs(ref - ratio) < 1e-9 and entry.get("status") == "done":
            return entry
    return None


def planned_vs_hand(result: dict[str, Any], folder: Path, hand_dir: Path) -> list[dict[str, Any]]:
    """Every candidate the plan trained and measured besides its uniform reference, against
    the hand-made run on the same test images: its per-group pruning ratios (``uniform``
    when they are all one ratio: the planner also trains uniform networks at other ratios),
    validation and test top-1, p50 from the plan's final panel (ms, on the dense p50's
    scale) and the paired comparison (:func:`paired_vs_hand`). The pick is one of them only
    when it beat the uniform reference on validation; these say whether any planned network
    was better on the test images (:func:`planned_family` judges them)."""
    rows = []
    for entry in result.get("trained", []):
        if entry.get("uniform_reference") is not None or entry.get("status") != "done":
            continue
        ratios = entry.get("ratios") or {}
        rows.append(
            {
                "dir": entry["dir"],
                "ratios": ratios,
                "uniform": len(set(ratios.values())) == 1,
                "val": entry.get("val_accuracy"),
                "test": entry["accuracy"],
                "p50_ms": entry["measured_ms"],
                "paired": paired_vs_hand(folder / entry["dir"], hand_dir),
            }
        )
    return rows


def planned_family(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The budget's candidates of :func:`planned_vs_hand` judged as one family: those within
    the budget (``within``: p50 at most ``TOLERANCE`` over it, as the pick) and compared
    image by image get the McNemar p adjusted over them (Holm, ``p_holm``) and a
    ``verdict`` from it; those over the budget are listed but left out of the family.

    Returns:
        One dict per candidate: the candidate's fields and ``within``, ``p_holm`` and
        ``verdict`` (None when left out).
    """
    from pqd.stats import holm, paired_verdict

    judged = [
        {**c, "within": c["p50_ms"] <= row["budget_ms"] * (1 + TOLERANCE)}
        | {"p_holm": None, "verdict": None}
        for c in row.get("planned", [])
    ]
    family = [c for c in judged if c["within"] and c.get("paired")]
    for c, p in zip(family, holm([c["paired"]["p_value"] for c in family]), strict=True):
        a, b = c["paired"]["a_only"], c["paired"]["b_only"]
        c["p_holm"] = p
        c["verdict"] = paired_verdict(a, b, p, "candidate", "uniform by hand")
    return judged


def candidate_text(c: dict[str, Any]) -> str:
    """``"uniform 0.4"`` or ``"planned, keeps 0.25-1 of each group's channels"``."""
    ratios = list((c.get("ratios") or {}).values())
    if ratios and len(set(ratios)) == 1:
        return f"uniform {ratios[0]:g}"
    keeps = [1 - r for r in ratios] or [1.0]
    return f"planned, keeps {min(keeps):.2g}-{max(keeps):.2g} of each group's channels"


def candidate_line(fraction: float, c: dict[str, Any]) -> str:
    """One page line on a candidate of :func:`planned_family` against uniform by hand."""
    from pqd.report.text import paired_text

    paired = {**c["paired"], "verdict": c["verdict"] or "not judged"}
    return (
        f"- {fraction:g}x, {candidate_text(c)}: p50 {c['p50_ms']:.3f} ms"
        + ("" if c["within"] else " (over the budget: outside the family)")
        + (f", validation {100 * c['val']:.2f}%" if c.get("val") is not None else "")
        + f"; {paired_text(paired, 'candidate', 'uniform by hand')}"
        + (f", Holm p = {c['p_holm']:.3g}" if c["p_holm"] is not None else "")
    )


def earlier_run(out: Path, inputs: dict[str, Any]) -> dict[str, Any] | None:
    """What an earlier run of the benchmark into ``out`` saved (its ``bench.json``) when it
    ran with the same ``inputs`` (recipe, model, runtime, threads, precision, --quick); None
    when ``out`` holds no readable run, or one of other inputs (a note says so)."""
    try:
        earlier = json.loads((out / "bench.json").read_text(encoding="utf-8"))
        before = earlier.get("dense_inputs")
    except (OSError, ValueError, AttributeError):
        return None
    if before != inputs:
        print(f"{out} holds a run with other inputs ({before}): the dense p50 is measured anew")
        return None
    return earlier


def earlier_wall_s(out: Path, inputs: dict[str, Any]) -> float:
    """The wall time (s) the earlier invocations of a run into ``out`` with the same
    ``inputs`` took (0 when none): the page's wall time covers every invocation."""
    try:
        return float((earlier_run(out, inputs) or {}).get("wall_s", 0.0))
    except (ValueError, TypeError):
        return 0.0


def earlier_dense_ms(out: Path, inputs: dict[str, Any]) -> float | None:
    """The dense p50 (ms) an earlier run of the benchmark into ``out`` set its budgets from,
    so that a stopped run continues at the same budgets (its plans and runs are kept in
    their folders); None when ``out`` holds no such run (:func:`earlier_run`)."""
    try:
        ms = float((earlier_run(out, inputs) or {})["dense_ms"])
    except (KeyError, ValueError, TypeError):
        return None
    print(f"continuing the run in {out}: budgets from its dense p50 (--dense-ms sets another)")
    return ms


def paired_vs_hand(pick_dir: Path, hand_dir: Path) -> dict[str, Any] | None:
    """The pick's and the hand-made final file compared on the same test images: each top-1
    with its 95% Wilson interval (``pick_ci``, ``hand_ci``), the difference pick - hand
    (fractions) with its paired-bootstrap interval, the exact McNemar p and the verdict.

    Returns:
        None when either run folder has no per-image predictions.
    """
    from pqd.record import load_predictions
    from pqd.stats import accuracy_summary, compare_paired

    a, b = load_predictions(pick_dir), load_predictions(hand_dir)
    if a is None or b is None:
        return None
    c = compare_paired(a["final"], b["final"], a["labels"])
    ci = {}
    for name, preds in (("pick", a), ("hand", b)):
        s = accuracy_summary(preds["final"] == preds["labels"])
        ci[f"{name}_ci"] = [s["ci_low"], s["ci_high"]]
    return {**c.as_dict(), **ci, "verdict": c.verdict("pick", "uniform by hand")}


def share_work(src: Path, dest: Path) -> None:
    """Seed plan folder ``dest`` with what plan folder ``src`` computed for the same
    baseline: the sensitivity analysis (its file is keyed by the checkpoint's digest, the
    groups and the data, so a plan recomputes it when anything differs) and the trained
    candidates (a trial folder is named by the key of everything that decides its result, so
    a plan reuses one it chooses again, e.g. the uniform reference at the hand-made ratio,
    instead of training it twice)."""
    from pqd.planner import SENSITIVITY_FILE

    sens = src / SENSITIVITY_FILE
    if sens.is_file() and not (dest / SENSITIVITY_FILE).is_file():
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sens, dest / SENSITIVITY_FILE)
    for trial in sorted((src / "trials").glob("plan-*")):
        if (trial / "record.json").is_file() and not (dest / "trials" / trial.name).exists():
            # hard links: a finished trial is only read (pqd writes by atomic rename), and a
            # ResNet-18 trial holds 90 MB of baseline checkpoint and file
            shutil.copytree(trial, dest / "trials" / trial.name, copy_function=_link_or_copy)


def _link_or_copy(src: str, dest: str) -> None:
    try:
        os.link(src, dest)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dest)


def iso_row(
    args: argparse.Namespace,
    recipe: Any,
    out: Path,
    frac: float,
    row: dict[str, Any],
    hand_dir: Path,
    folder: Path,
    dense_file: Path,
    dense: float,
    lm: Any,
) -> dict[str, Any]:
    """``pqd plan`` at the hand-made file's measured p50 (equal latency), its pick timed
    beside the hand-made file: at least as accurate at equal or lower latency?"""
    from pqd.latency_model.model import LEVELS
    from pqd.planner import PlanError, plan
    from pqd.planner.latency import files_against_dense

    budget = row["hand"]["p50_ms"]
    iso_dir = out / f"plan-{frac:g}-iso"
    share_work(folder, iso_dir)
    try:
        result = plan(
            recipe,
            budget,
            iso_dir,
            k=args.iso_k or args.k,
            validate=0,
            n_random=200 if args.quick else 2000,
            levels=(0.5, 1.0) if args.quick else LEVELS,
            dense_ms=dense,
            data_dir=args.data_dir,
            cache_dir=args.cache_dir,
            timing={"warmup": 2, "repeats": 20, "rounds": 2} if args.quick else None,
            progress=not args.no_progress,
        )
    except PlanError as exc:
        return {"budget_ms": round(budget, 4), "plan_error": exc.line()}
    pick = result["pick"]
    paired = paired_vs_hand(iso_dir / pick["dir"], hand_dir)
    finals = {"pick": iso_dir / pick["dir"] / "final.onnx", "hand": hand_dir / "final.onnx"}
    timed = files_against_dense(lm, finals, dense_file, dense)
    p50, hand = timed.ms["pick"], timed.ms["hand"]
    return {
        "budget_ms": round(budget, 4),
        "test": pick["accuracy"],
        "val": pick["val_accuracy"],
        "uniform_reference": pick.get("uniform_reference"),
        "p50_ms": p50,
        "hand_p50_ms": hand,
        "spread": {"pick": timed.spread["pick"], "hand": timed.spread["hand"]},
        "trained": result["counts"]["trained"],
        "reused": result["counts"]["reused"],  # trained for the budget's plan already
        "wins": pick["accuracy"] >= row["hand"]["test"] and p50 <= hand * (1 + TOLERANCE),
        "paired": paired,
    }


def render(result: dict[str, Any]) -> str:
    """One Markdown table, a line per budget, the paired comparisons and the summary
    lines."""
    from pqd.planner.latency import FINAL_PANELS
    from pqd.report.text import ci_text, paired_text

    head = (
        "| budget | pick | pick p50 | pick top-1 | hand ratio | hand p50 | hand top-1 |"
        " more accurate within budget | plan at the hand's p50: pick p50 / hand p50, top-1 |"
        " at least as accurate at equal or lower latency | model error (median / worst) |"
        " estimated / trained |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in result["rows"]:
        budget = f"{r['fraction']:g}x = {r['budget_ms']:.3f} ms"
        if "plan_error" in r:
            lines.append(f"| {budget} | {r['plan_error']} |" + " |" * 10)
            continue
        p, h, e, c = r["pick"], r["hand"], r["model_error"], r["counts"]
        err = (
            f"{100 * e['median']:.1f}% / {100 * e['worst']:.1f}%"
            if e["median"] is not None
            else "-"
        )
        ref = p.get("uniform_reference")
        kind = f"uniform {ref:g}" if ref is not None else "planned"
        iso = r.get("iso")
        if iso is None:
            iso_cell, wins = "-", "yes" if r["pick_wins"] else "NO"
        elif "plan_error" in iso:
            iso_cell, wins = iso["plan_error"], "yes" if r["pick_wins"] else "NO"
        else:
            iso_kind = (
                f"uniform {iso['uniform_reference']:g}"
                if iso.get("uniform_reference") is not None
                else "planned"
            )
            iso_cell = (
                f"{iso_kind}: {iso['p50_ms']:.3f} / {iso['hand_p50_ms']:.3f} ms, "
                f"{100 * iso['test']:.2f}%"
            )
            wins = "yes" if (r["pick_wins"] or iso["wins"]) else "NO"
        within = "yes" if r.get("more_accurate_within_budget") else "NO"
        paired = r.get("paired") or {}
        pick_top1 = f"{100 * p['test']:.2f}% {ci_text(paired.get('pick_ci'))}".strip()
        hand_top1 = f"{100 * h['test']:.2f}% {ci_text(paired.get('hand_ci'))}".strip()
        lines.append(
            f"| {budget} | {kind} | {p['p50_ms']:.3f} ms | {pick_top1} | "
            f"{h['ratio']:g} | {h['p50_ms']:.3f} ms | {hand_top1} | {within} | "
            f"{iso_cell} | {wins} | {err} | {c['estimated']} / {c['trained']} |"
        )
    compared = [
        f"- {r['fraction']:g}x, {what}: {paired_text(c, a, 'uniform by hand')}"
        for r in result["rows"]
        for what, a, c in (
            ("the budget's pick", "pick", r.get("paired")),
            ("the plan at the hand-made file's p50", "pick", (r.get("iso") or {}).get("paired")),
        )
        if c
    ]
    if compared:
        lines += ["", "Image by image on the test images (pick minus uniform by hand):", *compared]
    planned = [
        candidate_line(r["fraction"], c)
        for r in result["rows"]
        if "plan_error" not in r
        for c in planned_family(r)
        if c.get("paired")
    ]
    if planned:
        lines += [
            "",
            "Every other candidate the plan trained, against uniform by hand on the test images "
            "(p50 from the plan's final panel; McNemar adjusted over a budget's candidates "
            "within it, Holm):",
            *planned,
        ]
    shared = [
        f"{r['fraction']:g}x" for r in result["rows"] if r.get("hand", {}).get("planner_reference")
    ]
    if shared:
        lines.append(
            f"\nAt {', '.join(shared)} the hand-made ratio is the plan's uniform reference: "
            "that run (same stages, epochs and baseline) is the hand-made one, trained once; "
            "where the pick is that reference, pick and hand-made are one run."
        )
    lines.append(
        f"\ndense p50 {result['dense_ms']:.3f} ms; wall time {result['wall_s']:.0f} s "
        "(every invocation of the run together)"
    )
    lines.append(
        "p50s are scaled to that dense p50 by the dense file timed in the same final panel: "
        + "; ".join(
            f"{r['fraction']:g}x: dense {r['final_dense_raw_ms']:.3f} ms, pick "
            f"{r['pick']['raw_p50_ms']:.3f} ms, hand {r['hand']['raw_p50_ms']:.3f} ms raw"
            for r in result["rows"]
            if "final_dense_raw_ms" in r
        )
    )
    lines.append(
        f"each p50 is the median of {FINAL_PANELS} such panels; spread over them "
        "((max - min) / median): "
        + "; ".join(
            f"{r['fraction']:g}x: pick {100 * r['pick']['spread']:.1f}%, hand "
            f"{100 * r['hand']['spread']:.1f}%"
            for r in result["rows"]
            if "spread" in r.get("pick", {})
        )
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", metavar="key.path=value")
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "resnet18-structured.yaml"))
    p.add_argument("--out", default="runs/bench-plan")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.25])
    p.add_argument("-k", type=int, default=3)
    p.add_argument("--validate", type=int, default=20)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--quick", action="store_true", help="tiny net, tiny data: a smoke test")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--dense-ms",
        type=float,
        default=None,
        help="the dense p50 the budgets are fractions of (default: the one of an earlier run "
        "in --out, which continues it: its budgets, candidates and runs; else measured now)",
    )
    p.add_argument("--iso-k", type=int, default=None, help="-k of the equal-latency plans (-k)")
    p.add_argument(
        "--no-iso",
        dest="iso",
        action="store_false",
        help="skip planning again at the hand-made file's own p50 (equal latency)",
    )
    p.add_argument(
        "--results",
        type=Path,
        default=None,
        help="also write DIR/plan-<recipe name>.json and the page .md from it (e.g. docs/results)",
    )
    p.add_argument(
        "--render", action="store_true", help="only redraw the page from --results' JSON"
    )
    args = p.parse_args(argv)
    from pqd._quiet import quiet_command

    quiet_command()  # third-party chatter off the terminal, as the `pqd` command keeps it
    if args.quick and "--validate" not in (argv or sys.argv):
        args.validate = 2
    if args.quick and args.out == p.get_default("out"):
        args.out += "-quick"  # (a smoke test does not continue the real run's folder)
    from pqd.errors import PqdError
    from pqd.recipe import load_recipe

    try:
        name = load_recipe(args.recipe, args.overrides).name + ("-quick" if args.quick else "")
        json_path = args.results / f"plan-{name}.json" if args.results else None
        if args.render:
            if json_path is None:
                raise PqdError("--render redraws a results page", "give --results DIR too")
            if not json_path.is_file():
                raise PqdError(f"{json_path} not found", "run without --render first")
            result = json.loads(json_path.read_text(encoding="utf-8"))
        else:
            result = {**run(args), **provenance(args, argv)}
    except PqdError as exc:
        print(f"plan benchmark: error: {exc.line()}", file=sys.stderr)
        return 2
    if not args.render:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    text = page(result)
    print(text)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        if not args.render:
            json_path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        json_path.with_suffix(".md").write_text(text + "\n", encoding="utf-8")
    return 0


def provenance(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    """What the page names beside its figures: the command, the date, pqd's version, the
    machine (CPU, flags, libraries) and whether the images are the JPEG folders."""
    import datetime

    from pqd._version import __version__
    from pqd.measurement.env import environment
    from pqd.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    given = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--no-progress"]
    return {
        "name": recipe.name + ("-quick" if args.quick else ""),
        "command": " ".join(["python benchmarks/plan.py", *given]),
        "date": datetime.date.today().isoformat(),
        "pqd_version": __version__,
        "environment": environment(recipe.measure.threads),
        "folder_images": recipe.data.dataset == "folder",
    }


def page(result: dict[str, Any]) -> str:
    """The results page: what ran, where and when, then :func:`render`'s table."""
    if "command" not in result:
        return render(result)
    env = result["environment"]
    head = [
        f"# The planner against uniform pruning by hand: {result['name']}",
        "",
        f"`{result['command']}` on {result['date']}: pqd {result['pqd_version']}, "
        f"{env['cpu']} ({', '.join(env['cpu_flags']) or 'no VNNI/AVX-512 flags'}), "
        + ", ".join(f"{k} {v}" for k, v in env["libraries"].items())
        + (
            "; CIFAR-10 as JPEG files (pixels differ from the official files by about 6/255: "
            "accuracies are close to, not equal to, published figures)"
            if result.get("folder_images")
            else ""
        )
        + ".",
        "",
        "Budgets are fractions of the dense (unpruned) file's batch-1 p50, measured when the "
        "benchmark began (a stopped run continues at the same budgets). "
        "The pick is a planned network only when it beats the uniform reference on the "
        "validation images beyond noise (McNemar, Holm); by hand: uniform channel pruning at "
        "the smallest ratio whose file meets the budget, with the same stages and epochs.",
        "",
    ]
    return "\n".join([*head, render(result)])


if __name__ == "__main__":
    sys.exit(main())
