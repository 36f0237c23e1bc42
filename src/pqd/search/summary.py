"""What a search wrote, summed up: the interleaved latency panel, per-trial results,
groups over seeds, the analysis (ranking, pairwise table, order, frontier) and
``search.json``."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pqd.errors import PqdError
from pqd.measurement.latency import graph_signature, identical_graph_spread
from pqd.recipe import Recipe, SearchSpec
from pqd.resume import RunFolderError, read_progress
from pqd.runs import Trial, folder_status
from pqd.search.decide import order_pairs, pairwise_table, pareto_front, rank_against_best
from pqd.search.trials import allocate_epochs, order_label, say, search_budget, short_label
from pqd.stats import seed_summary, wilson_interval

SEARCH_VERSION = 2
SEARCH_FILE = "search.json"
SIZE_TOLERANCE = 0.01  # artifacts within 1% in bytes count as the same size on the frontier


# ---------------------------------------------------------------------------- summary


def latency_panel(
    paths: dict[str, Path], spec: Any, *, rounds: int = 10, progress: bool = True
) -> dict[str, dict[str, float]]:
    """Batch-1 latency (ms) of every artifact, timed here in interleaved rounds, one call at
    a time, on the recipe's primary runtime and threads."""
    from pqd.measurement.latency import time_files

    stats = time_files(
        paths,
        spec.runtimes[0],
        spec.threads,
        warmup=spec.warmup,
        repeats=spec.repeats,
        rounds=rounds,
        progress=progress,
        desc="latency panel (batch 1)",
    )
    return {
        name: {"p50": round(st.p50, 4), "p90": round(st.p90, 4), "mean": round(st.mean, 4)}
        for name, st in stats.items()
    }


def _trial_result(
    trial: Trial,
    record: dict[str, Any] | None,
    error: str | None,
    panel: dict[str, dict[str, float]],
    base_p50: float | None,
    graph: str | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "group": trial.group,
        "kind": trial.kind,
        "order": list(trial.order),
        "label": order_label(trial.order),
        "seed": trial.seed,
        "epochs": list(trial.epochs),
        "key": trial.key,
        "dir": trial.folder,
    }
    if record is None:
        return {**out, "status": "failed", "error": error or "no record"}
    f = record["final"]
    lat = panel.get(trial.key)
    return {
        **out,
        "status": "done",
        "record": f"{trial.folder}/record.json",
        "accuracy": f["accuracy"],
        "val_accuracy": f.get("val_accuracy"),
        "size_bytes": f["size_bytes"],
        "precision": f["precision"],
        "sparsity": f["sparsity"],
        "macs": f["macs"],
        "bitops": f["bitops"],
        "parity_ok": f.get("parity_ok", True),
        "parity_problems": f.get("parity_problems", []),
        "latency_ms": lat,
        "graph": graph,
        "record_latency_ms": {"p50": f["latency_ms"]["p50"], "p90": f["latency_ms"]["p90"]},
        "speedup_vs_baseline": (round(base_p50 / lat["p50"], 3) if lat and base_p50 else None),
        "train_seconds": round(
            sum(record["timing_s"].get(k, 0.0) for k in ("baseline", "stages", "export")), 1
        ),
        "audit": audit_summary(record),
    }


def audit_summary(record: dict[str, Any]) -> dict[str, Any] | None:
    """A trial's audit in brief (:mod:`pqd.measurement.audit`): largest per-class drop vs the
    baseline (points) and its class, disagreement (fraction), ECE, mean corruption top-1."""
    a = record["final"].get("audit")
    if not a or "vs_baseline" not in a:
        return None
    worst = a["vs_baseline"]["largest_class_drop"] or {}
    return {
        "worst_class_drop_points": worst.get("points"),
        "worst_class": worst.get("class"),
        "disagreement": a["vs_baseline"]["disagreement"]["fraction"],
        "ece": a["calibration"]["ece"],
        "corruption_accuracy": a.get("corruptions", {}).get("mean_accuracy"),
    }


def _aggregate(entries: list[dict[str, Any]], test_images: int = 0) -> dict[str, Any]:
    ok = [e for e in entries if e["status"] == "done"]
    first = entries[0]
    out: dict[str, Any] = {
        "id": first["group"],
        "kind": first["kind"],
        "order": first["order"],
        "label": first["label"],
        "short": short_label(first["order"]),
        "epochs": first["epochs"],
        "seeds": [e["seed"] for e in entries],
        "n": len(ok),
        "failed": len(entries) - len(ok),
    }
    if not ok:
        return out

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    accs = [e["accuracy"] for e in ok]
    std = (
        math.sqrt(sum((a - mean(accs)) ** 2 for a in accs) / (len(accs) - 1))
        if len(accs) > 1
        else 0.0
    )
    lat = [e["latency_ms"] for e in ok if e["latency_ms"]]
    out.update(
        {
            "accuracy_mean": mean(accs),
            "accuracy_std": std,
            "accuracy_min": min(accs),
            "accuracy_max": max(accs),
            "size_bytes": round(mean([e["size_bytes"] for e in ok])),
            "latency_p50_ms": round(mean([x["p50"] for x in lat]), 4) if lat else None,
            "latency_p90_ms": round(mean([x["p90"] for x in lat]), 4) if lat else None,
            "precision": ok[0]["precision"],
            # the files' graph signature where every seed's file has the same one
            "graph": ok[0].get("graph") if len({e.get("graph") for e in ok}) == 1 else None,
            "sparsity": mean([e["sparsity"] for e in ok]),
            "parity_ok": all(e.get("parity_ok", True) for e in ok),
            "parity_problems": [p for e in ok for p in e.get("parity_problems", [])],
        }
    )
    if test_images:  # test-set noise: Wilson on the images of every seed pooled
        right = round(sum(accs) * test_images)
        lo, hi = wilson_interval(right, test_images * len(accs))
        out["accuracy_ci"] = [round(lo, 6), round(hi, 6)]
        if len(accs) > 1:
            out["over_seeds"] = seed_summary(accs, test_images)
    audits = [e["audit"] for e in ok if e.get("audit")]
    if len(audits) == len(ok):  # worst case over seeds; means of the rest
        drops = [a["worst_class_drop_points"] for a in audits]
        corr = [a["corruption_accuracy"] for a in audits]
        out["audit"] = {
            "worst_class_drop_points": max(d for d in drops if d is not None)
            if any(d is not None for d in drops)
            else None,
            "worst_class": max(audits, key=lambda a: a["worst_class_drop_points"] or 0.0)[
                "worst_class"
            ],
            "disagreement": mean([a["disagreement"] for a in audits]),
            "ece": mean([a["ece"] for a in audits]),
            "corruption_accuracy": mean(corr) if None not in corr else None,
        }
    return out


def summarize(
    recipe: Recipe,
    out: Path,
    base: Trial,
    trials: list[Trial],
    executor: dict[str, Any],
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """search.json's data from the finished run folders, with a fresh latency panel."""
    from pqd.pipeline import measure_spec
    from pqd.record import machine

    spec = recipe.search
    assert spec is not None
    unique = {base.key: base, **{t.key: t for t in trials}}
    records: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    for key, t in unique.items():
        folder = out / t.folder
        if folder_status(folder, key) == "done":
            records[key] = json.loads((folder / "record.json").read_text(encoding="utf-8"))
        else:
            failed = folder / "failed.json"
            errors[key] = (
                json.loads(failed.read_text(encoding="utf-8")).get("error", "?")
                if failed.is_file()
                else "not finished"
            )
    if base.key not in records:
        raise PqdError(
            f"the search baseline in {out / base.folder} has no record",
            "re-run the same 'pqd search' command",
        )
    say(f"latency panel: {len(records)} artifacts, batch 1, interleaved rounds")
    mspec = measure_spec(recipe)
    files = {k: out / unique[k].folder / "final.onnx" for k in records}
    panel = latency_panel(files, mspec, progress=progress)
    base_p50 = panel[base.key]["p50"]
    from pqd.record import load_predictions

    correct: dict[str, np.ndarray] = {}
    for key in records:
        preds = load_predictions(out / unique[key].folder)
        if preds is not None:
            correct[key] = preds["final"] == preds["labels"]
    graphs = {k: graph_signature(p) for k, p in files.items()}
    base_entry = _trial_result(base, records[base.key], None, panel, base_p50, graphs[base.key])
    base_entry["source"] = records[base.key]["baseline"]["source"]
    entries = [
        _trial_result(t, records.get(t.key), errors.get(t.key), panel, base_p50, graphs.get(t.key))
        for t in trials
    ]
    panel_info = {
        "runtime": mspec.runtimes[0],
        "threads": mspec.threads,
        "batch": 1,
        "warmup": recipe.measure.warmup,
        "repeats": recipe.measure.repeats,
        "rounds": 10,
        **machine(),
        "where": "driver, sequential: all deployed artifacts timed side by side in "
        "interleaved rounds after every trial finished",
    }
    return analyse(
        recipe,
        base_entry,
        entries,
        executor=executor,
        panel=panel_info,
        data=records[base.key]["data"],
        unique_runs=len(unique),
        correct=correct,
    )


def analyse(
    recipe: Recipe,
    base_entry: dict[str, Any],
    entries: list[dict[str, Any]],
    *,
    executor: dict[str, Any],
    panel: dict[str, Any],
    data: dict[str, Any],
    unique_runs: int,
    correct: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """search.json's data from per-trial results (no I/O): groups over seeds, Pareto set,
    ranking of the full orders, pairwise table with the derived order or cycle, run counts.

    Each entry holds ``group``, ``kind``, ``order``, ``label``, ``seed``, ``epochs``,
    ``key``, ``status`` and, when done, ``accuracy`` (fraction), ``size_bytes``,
    ``latency_ms`` (``{"p50", "p90"}`` in ms), ``precision`` and ``sparsity``. ``correct``
    holds each trial's per-image correctness on the test split by trial key: the pairwise
    decisions and the ties with the best order are paired tests on it (without it every
    accuracy comparison is a tie).
    """
    from pqd._version import __version__
    from pqd.measurement.env import environment

    spec = recipe.search
    assert spec is not None
    groups_by_id, groups = grouped(base_entry, entries, data.get("test", 0))
    same = [g for g in groups if g.get("graph") and g.get("latency_p50_ms")]
    floor = identical_graph_spread(
        {g["id"]: g["latency_p50_ms"] for g in same}, {g["id"]: g["graph"] for g in same}
    )
    panel = {**panel, "identical_graphs": floor}
    rule = criterion(spec, floor["spread"] if floor else 0.0)
    # every latency decision (pairs, ties with the best, Pareto) uses the tolerance the
    # panel allows: the recipe's, or the spread between groups of one graph where wider
    spec = spec.model_copy(update={"tie_latency": rule["latency_tolerance"]})
    correct = correct or {}
    pareto, flagged = mark_pareto(groups, spec)

    # ---- ranking of the permutations by the criterion
    perms = sorted(
        (g for g in groups if g["kind"] == "permutation" and g["n"]),
        key=lambda g: (-g["accuracy_mean"], g["latency_p50_ms"]),
    )
    between_orders = order_pairs(perms, groups_by_id, correct, spec)
    rank_against_best(perms, between_orders)

    names = [s.stage for s in recipe.stages]
    n = len(names)
    total, budget = search_budget(recipe)
    alloc = allocate_epochs(total, budget)
    by_id = {g["id"]: g for g in groups}
    pairwise = None
    if spec.mode in ("pairwise", "both"):
        pairwise = pairwise_table(names, by_id, groups_by_id, correct, spec)
        pairwise.update(
            runs=n * (n - 1) * len(spec.seeds),
            epochs=n * (n - 1) * len(spec.seeds) * sum(alloc[:2]),
        )
    best = perms[0] if perms else None
    versus = versus_references(best, groups, spec) if best is not None else []
    env = environment(recipe.measure.threads)
    return {
        "search_version": SEARCH_VERSION,
        "pqd_version": __version__,
        "name": recipe.name,
        "recipe": recipe.model_dump(mode="json"),
        "stages": names,
        "criterion": rule,
        "allocation": allocation(total, budget, alloc),
        "executor": executor,
        "data": data,
        "baseline": base_entry,
        "trials": entries,
        "groups": groups,
        "ranking": [g["id"] for g in perms],
        "best": best["id"] if best else None,
        "best_vs_references": versus,
        "pareto": pareto,
        "class_drop_flag": (
            None
            if spec.flag_class_drop is None
            else {"threshold_points": spec.flag_class_drop, "flagged": flagged}
        ),
        "pairwise": pairwise,
        "order_pairs": between_orders,
        "runs": run_counts(entries, n, len(spec.seeds), total, alloc, unique_runs),
        "latency_panel": panel,
        "environment": env,
    }


def step_seconds(folders: Sequence[Path]) -> dict[str, float]:
    """The training a search's run folders hold, from their step records (``progress.json``:
    each finished step's wall seconds, a continued step's with its time before the stop):
    ``once`` counts a step that trials share (the same fingerprint: trained once, taken
    over by the others) once, ``every`` counts it in every trial that holds it.

    Args:
        folders: the baseline's and the trials' run folders.

    Returns:
        ``{"once": s, "every": s}`` (seconds, including any time the processes were paused).
    """
    once: dict[str, float] = {}
    every = 0.0
    for folder in folders:
        try:
            steps = (read_progress(folder) or {})["steps"]
        except (RunFolderError, KeyError):
            continue
        for e in steps if isinstance(steps, list) else []:
            try:
                seconds = float(e["record"]["seconds"])
            except (KeyError, TypeError, ValueError):
                continue
            every += seconds
            once.setdefault(str(e.get("fingerprint")), seconds)
    return {"once": round(sum(once.values()), 1), "every": round(every, 1)}


def grouped(
    base_entry: dict[str, Any], entries: list[dict[str, Any]], test_images: int
) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]]]:
    """Trials grouped over seeds (the baseline first), each group aggregated with its
    speed-up over the baseline.

    Returns:
        Group id -> its trial entries, and the aggregated groups in the same order.
    """
    base_p50 = base_entry["latency_ms"]["p50"]
    groups_by_id: dict[str, list[dict[str, Any]]] = {}
    for e in [base_entry, *entries]:
        groups_by_id.setdefault(e["group"], []).append(e)
    groups = [_aggregate(es, test_images) for es in groups_by_id.values()]
    for g in groups:
        g["speedup_vs_baseline"] = (
            round(base_p50 / g["latency_p50_ms"], 3) if g.get("latency_p50_ms") else None
        )
    return groups_by_id, groups


def mark_pareto(groups: list[dict[str, Any]], spec: SearchSpec) -> tuple[list[str], list[str]]:
    """The Pareto set over every measured group (baseline, orders, pairs, references): each
    group gets ``pareto``, and frontier points that hurt one class by more than
    ``spec.flag_class_drop`` points get ``class_drop_flag``.

    Returns:
        The frontier's group ids and the flagged ones.
    """
    measured = [g for g in groups if g["n"]]
    front = pareto_front(
        [(g["accuracy_mean"], g["size_bytes"], g["latency_p50_ms"]) for g in measured],
        spec.tie_latency,
        SIZE_TOLERANCE,
    )
    for i, g in enumerate(measured):
        g["pareto"] = i in front
    pareto = [measured[i]["id"] for i in front]
    flagged = []
    if spec.flag_class_drop is not None:  # frontier points that hurt one class too much
        for i in front:
            drop = (measured[i].get("audit") or {}).get("worst_class_drop_points")
            if drop is not None and drop > spec.flag_class_drop:
                measured[i]["class_drop_flag"] = True
                flagged.append(measured[i]["id"])
    return pareto, flagged


def versus_references(
    best: dict[str, Any], groups: list[dict[str, Any]], spec: SearchSpec
) -> list[dict[str, Any]]:
    """The best order against each measured single-technique reference: accuracy
    (points), size ratio, speed-up and whether the best dominates it."""
    versus = []
    for g in groups:
        if g["kind"] == "reference" and g["n"]:
            versus.append(
                {
                    "reference": g["id"],
                    "accuracy_points": round(100 * (best["accuracy_mean"] - g["accuracy_mean"]), 2),
                    "size_ratio": round(g["size_bytes"] / best["size_bytes"], 3),
                    "speedup": round(g["latency_p50_ms"] / best["latency_p50_ms"], 3),
                    "best_dominates": pareto_front(
                        [
                            (g["accuracy_mean"], g["size_bytes"], g["latency_p50_ms"]),
                            (best["accuracy_mean"], best["size_bytes"], best["latency_p50_ms"]),
                        ],
                        spec.tie_latency,
                        SIZE_TOLERANCE,
                    )
                    == [1],
                }
            )
    return versus


def criterion(spec: SearchSpec, noise_floor: float = 0.0) -> dict[str, Any]:
    """search.json's ``criterion``: the pairwise decision rule, as data and in words.

    Args:
        spec: the recipe's ``search`` section.
        noise_floor: the latency panel's spread between groups whose files share one graph
            (mean p50 over seeds; fraction,
            :func:`pqd.measurement.latency.identical_graph_spread`); a latency difference
            must exceed it as well as ``spec.tie_latency``.

    Returns:
        ``metric``, ``alpha``, ``min_effect_points``, ``tie_latency`` (the recipe's),
        ``latency_noise_floor``, ``latency_tolerance`` (the larger of the two) and ``text``.
    """
    tolerance = max(spec.tie_latency, noise_floor)
    raised = (
        f" (the recipe's {100 * spec.tie_latency:g}% raised to the spread between results "
        "whose files share one graph in the latency panel)"
        if noise_floor > spec.tie_latency
        else ""
    )
    return {
        "metric": spec.criterion,
        "alpha": spec.alpha,
        "min_effect_points": spec.min_effect_points,
        "tie_latency": spec.tie_latency,
        "latency_noise_floor": noise_floor,
        "latency_tolerance": tolerance,
        "text": (
            "higher test top-1 wins when the paired comparison on the same test images "
            f"is significant at {spec.alpha:g} (exact McNemar pooled over seeds, Holm's "
            "correction over the pairs; where seeds spread more than the images explain, "
            "the per-seed t-interval must exclude 0 too)"
            + (f" and at least {spec.min_effect_points:g} points" if spec.min_effect_points else "")
            + "; otherwise batch-1 p50 latency lower by more than "
            f"{100 * tolerance:.3g}% wins{raised}; else the pair ties"
        ),
    }


def allocation(total: int, budget: list[int], alloc: list[int]) -> dict[str, Any]:
    """search.json's ``allocation``: the epochs of each kind of run."""
    return {
        "total_epochs": total,
        "budget": budget,
        "permutation_epochs": alloc,
        "pairwise_epochs": alloc[:2],
        "reference_epochs": total,
        "note": (
            "position i of every order gets budget[i] % of total_epochs; a pairwise "
            "run A->B gets the epochs of the first two positions, i.e. it is the "
            "A->B prefix of the permutation runs; a reference gets all of them"
        ),
    }


def run_counts(
    entries: list[dict[str, Any]],
    n: int,
    seeds: int,
    total: int,
    alloc: list[int],
    unique_runs: int,
) -> dict[str, Any]:
    """search.json's ``runs``: runs by kind, and what a permutation search and the pairwise
    method cost (runs, epochs) for ``n`` stages and ``seeds`` seeds."""
    kinds = [e["kind"] for e in entries]
    return {
        "permutation": kinds.count("permutation"),
        "pairwise": kinds.count("pairwise"),
        "reference": kinds.count("reference"),
        "baseline": 1,
        "unique_runs": unique_runs,
        "permutation_search": {
            "runs": math.factorial(n) * seeds,
            "epochs": math.factorial(n) * seeds * total,
        },
        "pairwise_method": {
            "runs": n * (n - 1) * seeds,
            "epochs": n * (n - 1) * seeds * sum(alloc[:2]),
        },
    }


def write_search(search: dict[str, Any], out: Path) -> None:
    """Write search.json, then the reports rendered from it."""
    from pqd.checkpoint import atomic_write_text
    from pqd.report import write_search_report

    atomic_write_text(out / SEARCH_FILE, json.dumps(search, indent=2))
    write_search_report(search, out)


def load_search(out: str | Path) -> dict[str, Any]:
    """The stored search.json of a search folder."""
    path = Path(out) / SEARCH_FILE
    try:
        search = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PqdError(
            f"{path} is not a readable search.json ({type(exc).__name__})",
            "re-run the same 'pqd search' command into that folder",
        ) from None
    if search.get("search_version") != SEARCH_VERSION:
        raise PqdError(
            f"{path} has search_version {search.get('search_version')!r}, "
            f"this pqd reads {SEARCH_VERSION}",
            "re-run 'pqd search' with this pqd",
        )
    return search
