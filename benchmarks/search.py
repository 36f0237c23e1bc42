"""The order search table: run the shipped search and print its summary.

    python benchmarks/search.py                   # runs pqd search recipes/search-quickstart.yaml
    python benchmarks/search.py --from runs/search   # the table of a finished search

Prints, from the search's search.json: one row per order (full orders ranked by the
criterion, single-technique references, two-stage pairwise runs, the baseline) with test
top-1, MB on disk, batch-1 p50 latency from the search's interleaved latency panel and the
speedup over the FP32 baseline in that panel; the pairwise table; the derived order (or the
cycle); run counts of the pairwise method vs the full permutation search; the wall time.
A re-run with the same --out resumes: finished trials are reused. ``--results DIR`` writes
the page and its JSON (claims, verdict, best and pairwise order); ``--readme`` also writes
the verdict paragraph into the README's order block (between its markers); ``--compare
DIR/other.json`` adds what carries over from another search's results (e.g. the ViT search
beside the CNN one).
"""

from __future__ import annotations

import argparse
import datetime
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
    "top-1 ± sd [95% CI]",
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
    from pqd.report.search import (
        ORDER_PAIR_HEADER,
        PAIR_HEADER,
        derived_order_text,
        order_pair_rows,
        order_pairs_note,
        pairwise_rows,
        unresolved_text,
    )
    from pqd.report.text import ci_text

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
                f"{100 * g['accuracy_mean']:.2f}%{sd} {ci_text(g.get('accuracy_ci'))}".strip(),
                f"{g['size_bytes'] / 1e6:.3f}",
                f"{g['latency_p50_ms']:.3f}",
                f"{g['speedup_vs_baseline']:.2f}x",
                f"{100 * g['sparsity']:.0f}%",
                "yes" if g.get("pareto") else "",
            ]
        )
    lines = _table(HEADER, rows)
    if search.get("order_pairs"):
        lines += ["", order_pairs_note(search), ""]
        lines += _table(ORDER_PAIR_HEADER, order_pair_rows(search))
    if search.get("pairwise"):
        lines += ["", *_table(PAIR_HEADER, pairwise_rows(search))]
        unresolved = unresolved_text(search)
        if unresolved:
            lines += ["", *[f"- {line}" for line in unresolved]]
    runs = search["runs"]
    pm, ps = runs["pairwise_method"], runs["permutation_search"]
    panel, t = search["latency_panel"], search.get("timing_s", {})
    lines += [
        "",
        f"- {derived_order_text(search).replace('**', '')}",
        f"- pairwise method: {pm['runs']} two-stage runs ({pm['epochs']} epochs); full "
        f"permutation search: {ps['runs']} runs ({ps['epochs']} epochs)",
        f"- {runs['unique_runs']} runs in all ({runs['trained_now']} trained in the last "
        f"invocation, {runs['reused']} reused); the last invocation took "
        f"{t.get('total', 0):.0f} s (training {t.get('train', 0):.0f} s, measuring "
        f"{t.get('measure', 0):.0f} s, latency panel {t.get('panel', 0):.0f} s)"
        + (f"; command wall time {wall_s:.0f} s" if wall_s else "")
        + (
            f"; training over every invocation {t['steps']['once'] / 3600:.1f} h, a stage "
            f"that trials share counted once ({t['steps']['every'] / 3600:.1f} h had every "
            "trial trained its own; wall time, pauses included)"
            if t.get("steps")
            else ""
        ),
        f"- latency: {panel['runtime']}, {panel['threads']} threads, batch 1, all artifacts "
        f"timed side by side on {panel['cpu']}; {search['data']['test']} test images"
        + (" (a subset of the official test split)" if search["data"].get("subset_note") else ""),
        "",
        "Published claims, judged by this search's paired tests:",
        *claims_text(search),
        "",
        "In one paragraph: " + verdict(search),
    ]
    return "\n".join(lines)


CLAIMS = (
    (
        "Prune-Quantize-Distill (Zhou & Shen, 2026)",
        "prune -> quantize -> distill is the best of the six orders",
        ("best", ("prune", "quantize", "distill")),
    ),
    (
        "Order of Compression (Shen et al., 2024)",
        "pairwise runs and a topological sort give distill -> prune -> quantize",
        ("edges", (("distill", "prune"), ("prune", "quantize"), ("distill", "quantize"))),
    ),
    (
        "Harma et al. (ICLR 2025)",
        "sparsify before quantize",
        ("edges", (("prune", "quantize"),)),
    ),
    (
        "Kim et al. (ICLR 2026)",
        "the weaker perturbation first: INT8 quantize before heavy pruning",
        ("edges", (("quantize", "prune"),)),
    ),
)


def _pair_row(search: dict, a: str, b: str) -> dict | None:
    for r in (search.get("pairwise") or {}).get("table", []):
        if {r["a"], r["b"]} == {a, b}:
            return r
    return None


def _pts(fraction: float) -> str:
    """Signed points with two decimals, never ``-0.00``."""
    return f"{round(100 * fraction, 2) + 0.0:+.2f}"


def _p(value: float) -> str:
    return "< 1e-6" if value < 1e-6 else f"{value:.3g}"


def _pair_stat(search: dict, a: str, b: str) -> str:
    """The paired statistic of "a before b" (a->b minus b->a), in points."""
    r = _pair_row(search, a, b)
    if r is None or not r.get("paired"):
        return f"{a} / {b}: not measured"
    from pqd.report.search import search_alpha, seed_disagreement_text

    p, sign = r["paired"], (1 if r["a"] == a else -1)
    lo, hi = sorted((sign * p["ci_low"], sign * p["ci_high"]))
    alpha = search_alpha(search)
    seen = dict(  # (said from a's side)
        p,
        per_seed=[sign * d for d in p.get("per_seed", [])],
        seed_ci=sorted(sign * x for x in p["seed_ci"]) if p.get("seed_ci") else None,
    )
    differ = None if r.get("decided_by") == "accuracy" else seed_disagreement_text(seen, alpha)
    return (
        f"{a} before {b}: {_pts(sign * p['difference'])} points "
        f"(95% CI {_pts(lo)} to {_pts(hi)}, McNemar p (Holm) {_p(p['p_holm'])}, "
        f"{p['seeds']} seed(s) x {p['n']} images" + (f"; a tie: {differ}" if differ else "") + ")"
    )


def claims(search: dict) -> list[dict]:
    """Each published claim: ``supported``, ``contradicted`` or ``undecided`` by this search's
    paired tests (a pairwise edge counts only where the accuracy test is significant after
    Holm's correction, not where latency broke an accuracy tie; the best order counts only
    where no other order ties with it)."""
    out = []
    # the claims are about accuracy: an edge that latency decided (the accuracies tied)
    # neither supports nor contradicts them
    edges = {
        (r["first"], r["b"] if r["first"] == r["a"] else r["a"])
        for r in (search.get("pairwise") or {}).get("table", [])
        if r.get("first") and r.get("decided_by") == "accuracy"
    }
    for source, text, (kind, what) in CLAIMS:
        if kind == "edges":
            pairs = list(what)
            if not search.get("pairwise"):
                verdict, stats = "undecided", ["pairwise runs not in this search"]
            else:
                agree = [pr for pr in pairs if pr in edges]
                against = [pr for pr in pairs if (pr[1], pr[0]) in edges]
                verdict = (
                    "contradicted"
                    if against
                    else "supported"
                    if len(agree) == len(pairs)
                    else "undecided"
                )
                stats = [_pair_stat(search, a, b) for a, b in pairs]
        else:
            groups = {tuple(g["order"]): g for g in search["groups"] if g["kind"] == "permutation"}
            g = groups.get(tuple(what))
            if g is None or not g.get("n"):
                verdict, stats = "undecided", ["that order was not measured"]
            else:
                others = [o for o in groups.values() if o is not g and o.get("n")]
                tied = [o["label"] for o in others if o.get("tied_with_best")]
                if g.get("rank") == 1:
                    verdict = "supported" if others and not tied else "undecided"
                else:
                    verdict = "undecided" if g.get("tied_with_best") else "contradicted"
                vs = g.get("vs_best")
                stats = [
                    f"rank {g.get('rank')} of {len(groups)}, {100 * g['accuracy_mean']:.2f}%"
                    + (
                        f"; the paired tests cannot tell it from {len(tied)} of the other "
                        f"{len(others)}: {', '.join(tied)}"
                        if g.get("rank") == 1 and tied
                        else ""
                    )
                    + (
                        f"; vs the best order {_pts(-vs['difference'])} points (95% CI "
                        f"{_pts(-vs['ci_high'])} to {_pts(-vs['ci_low'])}, McNemar p "
                        f"(Holm) {_p(vs['p_holm'])})"
                        if vs
                        else ""
                    )
                ]
        out.append({"source": source, "claim": text, "verdict": verdict, "statistics": stats})
    return out


def claims_text(search: dict) -> list[str]:
    """One Markdown bullet per published claim with its verdict and statistic."""
    return [
        f"- {c['source']}, *{c['claim']}*: **{c['verdict']}** ({'; '.join(c['statistics'])})"
        for c in claims(search)
    ]


def verdict(search: dict) -> str:
    """The order question's answer in one paragraph, every figure from the page's tables:
    the best full order with its interval, which orders the paired tests cannot tell from
    it, the pairwise order (or why there is none) and each published claim's verdict."""
    from pqd.markdown import ordered_groups
    from pqd.report.search import derived_order_text
    from pqd.report.text import ci_text

    perms = [g for g in ordered_groups(search) if g["kind"] == "permutation" and g.get("n")]
    if not perms:
        return "No full order finished: the search has no answer yet."
    best = next(g for g in perms if g.get("rank") == 1)
    tied = [g["label"] for g in perms if g is not best and g.get("tied_with_best")]
    beaten = [g for g in perms if g is not best and not g.get("tied_with_best")]
    seeds, images = best["n"], search["data"]["test"]
    base = next((g for g in ordered_groups(search) if g["kind"] == "baseline"), None)
    base_text = (
        f"; the FP32 baseline {100 * base['accuracy_mean']:.2f}% {ci_text(base.get('accuracy_ci'))}"
        if base and base.get("accuracy_mean") is not None
        else ""
    )
    text = (
        f"Top full order by test top-1: **{best['label']}**, {100 * best['accuracy_mean']:.2f}% "
        f"{ci_text(best.get('accuracy_ci'))} ({seeds} seed{'s' if seeds != 1 else ''} x "
        f"{images:,} test images{base_text}). "
    )
    if tied:
        text += (
            f"The paired tests (exact McNemar pooled over seeds, Holm) cannot tell it from "
            f"{len(tied)} of the other {len(perms) - 1}: {', '.join(tied)}"
        )
        text += "; " if beaten else ". "
    else:
        text += f"It beats each of the other {len(perms) - 1} beyond noise"
        text += "; " if beaten else ". "
    if beaten:
        worst = min(beaten, key=lambda g: g["accuracy_mean"])
        vs = worst.get("vs_best") or {}
        text += (
            f"{len(beaten)} {'is' if len(beaten) == 1 else 'are'} worse, down to "
            f"{worst['label']} at {_pts(-vs.get('difference', 0.0))} points (95% CI "
            f"{_pts(-vs.get('ci_high', 0.0))} to {_pts(-vs.get('ci_low', 0.0))}). "
        )
    text += derived_order_text(search).replace("**", "") + " "
    text += "Published claims: " + "; ".join(
        f"{c['source'].split(' (')[0]}, {c['verdict']}" for c in claims(search)
    )
    return text + "."


def setup_text(search: dict) -> str:
    """The search in words: model, data (with the JPEG caveat for CIFAR-10's image
    folders), the stages, epochs per order and seeds."""
    from pqd.markdown import model_text

    recipe, data = search["recipe"], search["data"]
    model, spec = recipe["model"], recipe["search"]
    words = []
    for stage in recipe["stages"]:
        if stage["stage"] == "prune":
            words.append(f"prune {100 * stage.get('sparsity', 0.0):.0f}%")
        elif stage["stage"] == "quantize":
            words.append(f"INT8 {'QAT' if stage.get('mode') == 'qat' else stage.get('mode')}")
        else:
            words.append(stage["stage"])
    jpeg = recipe["data"]["dataset"] == "folder"
    seeds = len(spec["seeds"])
    budget = (
        "split " + "/".join(f"{b:g}" for b in spec["budget"]) + " % by position"
        if spec.get("budget")
        else "split evenly"
    )
    epochs = (
        f"{spec['total_epochs']} epochs per order"
        if spec.get("total_epochs")
        else "the stages' own epochs summed per order"
    )
    return (
        f"{model_text(model['name'], model.get('kwargs'))} on {data['train']:,} "
        f"training and {data['test']:,} test images"
        + (" (CIFAR-10 as JPEG files: close to, not equal to, the official images)" if jpeg else "")
        + f", every order of {' / '.join(words)}, {epochs} {budget}, "
        f"{seeds} seed{'s' if seeds != 1 else ''}"
    )


def results_json(search: dict, command: str = "", date: str = "") -> dict:
    """What ``--results`` keeps beside the page: the claims, the verdict paragraph, the best
    full order and those the paired tests cannot tell from it, the pairwise order, the
    groups, and what the README's paragraph says besides (:func:`readme_block`): the setup,
    the CPU and its flags, pqd's version, the date and the command."""
    from pqd.markdown import ordered_groups
    from pqd.report.search import derived_order_text

    perms = [g for g in ordered_groups(search) if g["kind"] == "permutation" and g.get("n")]
    best = next((g for g in perms if g.get("rank") == 1), None)
    env = search["environment"]
    return {
        "name": search["name"],
        "model": search["recipe"]["model"]["name"],
        "setup": setup_text(search),
        "cpu": env["cpu"],
        "cpu_flags": [f for f in env["cpu_flags"] if f.startswith(("avx", "amx"))],
        "pqd_version": search.get("pqd_version", "?"),
        "date": date,
        "command": command,
        "claims": claims(search),
        "verdict": verdict(search),
        "best": best["label"] if best else None,
        "tied_with_best": [g["label"] for g in perms if g is not best and g.get("tied_with_best")],
        "pairwise_order": derived_order_text(search).replace("**", ""),
        "groups": search["groups"],
    }


def carries_over(search: dict, other: dict) -> list[str]:
    """Markdown: this search beside another's :func:`results_json` (its best order, pairwise
    order and each claim's verdict), and which verdicts hold in both."""
    here = results_json(search)
    a, b = f"{here['name']} ({here['model']})", f"{other['name']} ({other.get('model', '?')})"

    def best(r: dict) -> str:
        tied = r.get("tied_with_best") or []
        return (r["best"] or "none finished") + (
            f"; tied with it: {', '.join(tied)}" if tied else ""
        )

    rows = [
        ["best full order", best(here), best(other)],
        ["pairwise order", here["pairwise_order"], other["pairwise_order"]],
    ]
    theirs = {c["source"]: c["verdict"] for c in other["claims"]}
    same, differ = [], []
    for c in here["claims"]:
        there = theirs.get(c["source"], "not judged")
        rows.append([c["source"], c["verdict"], there])
        short = c["source"].split(" (")[0]
        if there == c["verdict"]:
            same.append(f"{short} ({c['verdict']})")
        else:
            differ.append(f"{short} ({c['verdict']} here, {there} there)")
    lines = [f"## What carries over from {b}", "", *_table(["", a, b], rows), ""]
    lines.append(
        "Same verdict in both: "
        + (", ".join(same) or "none")
        + ". Different: "
        + (", ".join(differ) or "none")
        + "."
    )
    return lines


README_START = (
    "<!-- order: written by python benchmarks/search.py --results docs/results --readme -->"
)
README_END = "<!-- /order -->"


def readme_block(results: dict, page: str) -> str:
    """The README's order verdict from :func:`results_json`: the setup, the paragraph of
    :func:`verdict`, and the line saying where and how it ran, with a link to the page."""
    return "\n".join(
        [
            README_START,
            f"The order question: {results['setup']}.",
            "",
            results["verdict"],
            "",
            f"pqd {results['pqd_version']}, {results['date']}, {results['cpu']} "
            f"({', '.join(results['cpu_flags'])}): `{results['command']}` "
            f"([the page]({page}): every interval and paired test).",
            README_END,
        ]
    )


def write_readme(results: dict, readme: Path, page: str) -> bool:
    """Replace the README's order block (between its markers) with :func:`readme_block`;
    False (nothing written) when the README has no such block."""
    text = readme.read_text(encoding="utf-8")
    if README_START not in text or README_END not in text:
        return False
    start, end = text.index(README_START), text.index(README_END) + len(README_END)
    readme.write_text(text[:start] + readme_block(results, page) + text[end:], encoding="utf-8")
    return True


def _here(path: Path) -> str:
    """``path`` relative to the checkout where it is inside it, else its name."""
    try:
        return path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return path.name


def shown_command(args: argparse.Namespace, name: str) -> str:
    """The command that reproduces the page, for its header and the README: with ``--from``,
    the search of the shipped recipe of that name (a re-run reuses every finished trial)
    when there is one; no path outside the checkout."""
    parts = ["python benchmarks/search.py"]
    recipe = ROOT / "recipes" / f"{name}.yaml"
    if args.source is None:
        parts += [f"--recipe {_here(args.recipe)}", f"--out {_here(args.out)}"]
    elif recipe.is_file():
        parts += [f"--recipe recipes/{name}.yaml", f"--out runs/{name}"]
    else:
        parts.append(f"--from {_here(args.source)}")
    parts.append(f"--results {_here(args.results)}")
    if args.compare is not None:
        parts.append(f"--compare {_here(args.compare)}")
    if args.readme:
        parts.append("--readme")
    return " ".join(parts)


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
    ap.add_argument(
        "--results",
        type=Path,
        default=None,
        help="also write the page and the claims as DIR/<search name>.md and .json "
        "(e.g. docs/results)",
    )
    ap.add_argument(
        "--readme",
        action="store_true",
        help="with --results: write the verdict paragraph into README.md's order block",
    )
    ap.add_argument(
        "--compare",
        type=Path,
        default=None,
        help="another search's results JSON (e.g. docs/results/search-cifar10.json): the page "
        "says what carries over from it",
    )
    args = ap.parse_args(argv)
    if args.readme and args.results is None:
        ap.error("--readme writes the README's order paragraph from the results: give --results")
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
    search = json.loads(path.read_text(encoding="utf-8"))
    page = render(search, wall)
    if args.compare is not None:
        if not args.compare.is_file():
            print(f"benchmarks/search.py: error: {args.compare} not found", file=sys.stderr)
            return 2
        other = json.loads(args.compare.read_text(encoding="utf-8"))
        need = ("name", "claims", "best", "tied_with_best", "pairwise_order")
        if not isinstance(other, dict) or any(k not in other for k in need):
            print(
                f"benchmarks/search.py: error: {args.compare} is not a search's results JSON "
                "(need its name, claims, best and pairwise order); fix: write it anew with "
                "benchmarks/search.py --from THAT_SEARCH --results DIR",
                file=sys.stderr,
            )
            return 2
        page += "\n\n" + "\n".join(carries_over(search, other))
    print(page)
    if args.results is not None:
        command = shown_command(args, search["name"])
        results = results_json(search, command, datetime.date.today().isoformat())
        head = (
            f"# Order search: {search['name']}\n\n`{command}` on {results['date']}: pqd "
            f"{results['pqd_version']}, {results['cpu']} ({', '.join(results['cpu_flags'])}); "
            f"seeds {search['recipe']['search']['seeds']}"
            + (
                "; CIFAR-10 as JPEG files (pixels differ from the official files by about "
                "6/255: accuracies are close to, not equal to, published figures)"
                if search["recipe"]["data"]["dataset"] == "folder"
                else ""
            )
            + ".\n\n"
        )
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / f"{search['name']}.md").write_text(head + page + "\n", encoding="utf-8")
        (args.results / f"{search['name']}.json").write_text(
            json.dumps(results, indent=2) + "\n", encoding="utf-8"
        )
        if args.readme:
            readme, page_path = ROOT / "README.md", args.results / f"{search['name']}.md"
            try:
                link = page_path.resolve().relative_to(ROOT).as_posix()
            except ValueError:
                link = page_path.resolve().as_posix()
            if not write_readme(results, readme, link):
                print(
                    f"benchmarks/search.py: {readme} has no order block ({README_START} ... "
                    f"{README_END}): the README is unchanged",
                    file=sys.stderr,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
