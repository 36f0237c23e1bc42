"""The ``pqd`` command: run, search, plan, validate, sensitivity, report, audit, models.

    pqd run recipes/quickstart.yaml --out runs/quick [key.path=value ...]
    pqd search recipes/search-quickstart.yaml --out runs/search [--workers N]
    pqd plan recipes/resnet18-structured.yaml --latency-ms 1.5 --out runs/plan
    pqd validate recipes/quickstart.yaml
    pqd report runs/quick            # or a search folder: re-renders from search.json
    pqd audit runs/quick             # per-class damage, calibration, corruptions, memory
    pqd sensitivity recipes/quickstart.yaml --out runs/sens
    pqd models

Problems the user can fix end with one line ``pqd: error: ...`` and exit
status 2; an interrupted run exits with 130.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path
from typing import Any

from pqd._quiet import quiet_command
from pqd.errors import PqdError
from pqd.progress import show_phases


def _options(
    recipe: str | None = None,
    overrides: str | None = None,
    data: bool = False,
    progress: bool = False,
    executors: bool = False,
) -> list[argparse.ArgumentParser]:
    """Parent parsers holding the options several subcommands share, declared once.

    Args:
        recipe: help of the positional recipe argument (None: no recipe).
        overrides: help of the ``key.path=value`` overrides (None: no overrides; "" for none).
        data: add ``--data-dir``.
        progress: add ``--no-progress``.
        executors: add ``--executor``, ``--workers`` and ``--address``.

    Returns:
        The parents for ``add_parser(..., parents=...)``.
    """
    p = argparse.ArgumentParser(add_help=False)
    if recipe is not None:
        p.add_argument("recipe", help=recipe)
    if overrides is not None:
        p.add_argument("overrides", nargs="*", metavar="key.path=value", help=overrides or None)
    if data:
        p.add_argument(
            "--data-dir",
            default=None,
            help="folder holding the data set (wins over data.root, then PQD_DATA_DIR)",
        )
        if overrides is not None:
            p.add_argument(
                "--download",
                action="store_true",
                help="download a missing official data set (cifar10, cifar100, svhn) into "
                "the data folder (same as data.download=true)",
            )
    if executors:
        p.add_argument(
            "--executor", default="sequential", help="sequential (default), processes or ray"
        )
        p.add_argument(
            "--workers",
            type=int,
            default=None,
            help="train N trials at once in local processes (implies processes)",
        )
        p.add_argument(
            "--address",
            default=None,
            help="Ray cluster address (host:port, ray://host:port, auto or local)",
        )
    if progress:
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return [p]


# each subcommand: its help and the shared options it takes (keyword arguments of _options)
_COMMANDS: dict[str, tuple[str, dict[str, Any]]] = {
    "run": (
        "run a recipe: baseline, stages, export, measure",
        {
            "recipe": "YAML recipe",
            "overrides": "override recipe values, e.g. stages.0.sparsity=0.7",
            "data": True,
            "progress": True,
        },
    ),
    "search": (
        "run every stage order (and pairwise), rank, report",
        {
            "recipe": "YAML recipe with a search: section",
            "overrides": "override recipe values, e.g. search.total_epochs=6",
            "data": True,
            "progress": True,
            "executors": True,
        },
    ),
    "plan": (
        "the most accurate model under a latency budget on this CPU (measured)",
        {
            "recipe": "YAML recipe: the template (model, data, baseline, stages)",
            "overrides": "",
            "data": True,
            "progress": True,
            "executors": True,
        },
    ),
    "validate": (
        "check a recipe (schema, data, model, checkpoint, "
        "runtimes; no training) and print its resolved form",
        {"recipe": "YAML recipe", "overrides": "", "data": True},
    ),
    "sensitivity": (
        "accuracy drop of quantizing each layer alone (val split)",
        {
            "recipe": "YAML recipe (its first quantize stage sets the options)",
            "overrides": "",
            "data": True,
            "progress": True,
        },
    ),
    "report": (
        "re-render a run's report.md and report.html from record.json, or a search's "
        "reports from search.json",
        {},
    ),
    "audit": (
        "audit a run's deployed files beyond top-1: per-class "
        "damage, disagreement, calibration, corruptions, memory, CPU time",
        {"data": True, "progress": True},
    ),
    "models": ("list the model zoo", {}),
}


def _parser() -> argparse.ArgumentParser:
    # the module doc's first paragraph, without its reST markup (``pqd`` -> pqd)
    p = argparse.ArgumentParser(prog="pqd", description=__doc__.split("\n\n")[0].replace("``", ""))
    sub = p.add_subparsers(dest="command", required=True)
    cmd = {
        name: sub.add_parser(name, help=text, parents=_options(**shared) if shared else [])
        for name, (text, shared) in _COMMANDS.items()
    }
    cmd["run"].add_argument("--out", required=True, help="run folder (created)")
    again = cmd["run"].add_mutually_exclusive_group()
    again.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out even if the recipe changed: finished "
        "steps the change does not touch are kept (the same recipe "
        "resumes without this flag)",
    )
    again.add_argument(
        "--fresh",
        action="store_true",
        help="discard the run in --out (its checkpoints too) and start over",
    )
    se = cmd["search"]
    se.add_argument("--out", required=True, help="search folder (created; re-run to resume)")
    se.add_argument(
        "--fresh",
        action="store_true",
        help="retrain the baseline in --out when another recipe's finished baseline is there",
    )
    pl = cmd["plan"]
    pl.add_argument("--latency-ms", type=float, required=True, help="batch-1 p50 budget (ms)")
    pl.add_argument("--size-mb", type=float, default=None, help="weights budget (MB)")
    pl.add_argument("--threads", type=int, default=None, help="runtime threads (recipe's)")
    pl.add_argument(
        "--runtime",
        default=None,
        help="onnxruntime or openvino (default: the recipe's first runtime)",
    )
    pl.add_argument("-k", type=int, default=3, help="candidates trained for real (3)")
    pl.add_argument(
        "--validate",
        type=int,
        default=20,
        help="random whole candidates measured for the latency model's error (20)",
    )
    pl.add_argument("--out", required=True, help="plan folder (created; re-run to resume)")
    cmd["validate"].add_argument(
        "--quiet", action="store_true", help="print only the one-line summary"
    )
    cmd["sensitivity"].add_argument(
        "--out", default=None, help="folder for sensitivity.json (created)"
    )
    cmd["report"].add_argument("run_dir")
    cmd["audit"].add_argument("run_dir", help="a folder written by 'pqd run'")
    cmd["audit"].add_argument(
        "--cheap",
        action="store_true",
        help="only per-class, disagreement, calibration and latency tails "
        "(no corruption suite, memory or energy probe)",
    )
    # every subcommand named in the description, whatever is added later
    p.description = f"The pqd command: {', '.join(sub.choices)}."
    return p


def _executors(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of the options ``_options(data=True, progress=True,
    executors=True)`` declares, for :func:`pqd.search.run_search` and :func:`pqd.planner.plan`."""
    return {
        "data_dir": args.data_dir,
        "executor": args.executor,
        "workers": args.workers,
        "address": args.address,
        "progress": not args.no_progress,
    }


def _cmd_run(args: argparse.Namespace) -> int:
    from pqd.pipeline import run
    from pqd.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    check_out(args.out)
    record = run(
        recipe,
        Path(args.out),
        data_dir=args.data_dir,
        progress=not args.no_progress,
        resume=args.resume,
        fresh=args.fresh,
    )
    from pqd.report import (
        SUMMARY_HEADER,
        paired_text,
        parity_warnings,
        points_text,
        seconds_text,
        speed_text,
        summary_rows,
        table,
    )

    cmp_ = record["comparison"]
    print(table(SUMMARY_HEADER, summary_rows(record)))
    print(
        f"\nfinal vs baseline ({record['final']['runtime']}): "
        f"{speed_text(cmp_['speedup_batch1_p50'])} at batch 1, {cmp_['size_ratio']:.2f}x "
        f"smaller, accuracy {points_text(-cmp_['accuracy_drop_points'])}; "
        f"{seconds_text(record['timing_s'])} in all"
    )
    if cmp_.get("paired"):
        print(paired_text(cmp_["paired"]))
    out = Path(args.out)
    print(f"wrote {out / 'record.json'}, {out / 'report.md'} and {out / 'report.html'}")
    for line in parity_warnings(record):
        print(f"pqd: warning: {line}", file=sys.stderr)
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from pqd.recipe import load_recipe
    from pqd.report import (
        PAIR_HEADER,
        SEARCH_HEADER,
        derived_order_text,
        pairwise_rows,
        parity_failed_text,
        search_rows,
        table,
    )
    from pqd.search import run_search

    recipe = load_recipe(args.recipe, args.overrides)
    check_out(args.out)
    search = run_search(recipe, Path(args.out), **_executors(args), fresh=args.fresh)
    print(table(SEARCH_HEADER, search_rows(search)))
    if parity := parity_failed_text(search):
        print(f"\n{parity}")
    if search.get("pairwise"):
        print()
        print(table(PAIR_HEADER, pairwise_rows(search)))
    print()
    print(derived_order_text(search).replace("**", ""))
    runs = search["runs"]
    print(
        f"{runs['unique_runs']} runs ({runs['trained_now']} trained now, {runs['reused']} "
        f"reused, {runs['failed']} failed); {search['timing_s']['total']:.0f} s in all"
    )
    out = Path(args.out)
    print(f"wrote {out / 'search.json'}, {out / 'report.html'} and {out / 'report.md'}")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from pqd.latency_model import validation_text
    from pqd.planner import plan
    from pqd.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    check_out(args.out)
    result = plan(
        recipe,
        args.latency_ms,
        Path(args.out),
        size_mb=args.size_mb,
        threads=args.threads,
        runtime=args.runtime,
        k=args.k,
        validate=args.validate,
        **_executors(args),
    )
    p, c = result["pick"], result["counts"]
    v = result["latency_model"]["validation"]
    if v:
        print(f"latency model error over {v['n']} random candidates: {validation_text(v)}")
    print(
        f"{c['estimated']} candidates estimated, {c['feasible']} feasible, {c['trained']} trained"
    )
    print(
        f"pick: {p['measured_ms']:.3f} ms (budget {args.latency_ms:g}; dense "
        f"{result['dense_ms']:.3f}), val top-1 {100 * (p['val_accuracy'] or 0):.2f}%, "
        f"test top-1 {100 * p['accuracy']:.2f}%"
    )
    out = Path(args.out)
    written = ", ".join(str(out / f) for f in ("plan.json", "report.md", "report.html"))
    print(f"wrote {written} and {out / 'pick.yaml'}")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from pqd.pipeline import preflight
    from pqd.recipe import dump_recipe, load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    epochs = sum(s.epochs for s in recipe.stages)
    from pqd.progress import plural

    base = (
        f"checkpoint {recipe.baseline.checkpoint}"
        if recipe.baseline.checkpoint
        else plural(recipe.baseline.epochs, "baseline epoch")
    )
    passed, failed = preflight(recipe, args.data_dir)
    if not args.quiet:
        print(dump_recipe(recipe), end="")
    for exc in failed:
        print(f"pqd: error: {exc.line()}", file=sys.stderr)
    if failed:
        return 2
    print(
        f"ok: {args.recipe}: {recipe.model.name} on {recipe.data.dataset}, {base}, "
        f"stages {recipe.order()} ({plural(epochs, 'epoch')})"
    )
    if not args.quiet:
        for line in passed:
            print(f"  checked {line}")
    if recipe.search is not None:
        from pqd.search import search_plan_text

        print(search_plan_text(recipe))
    return 0


def _cmd_sensitivity(args: argparse.Namespace) -> int:
    from pqd.pipeline import run_sensitivity
    from pqd.quant.sensitivity import format_table
    from pqd.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.out:
        check_out(args.out)
    result = run_sensitivity(
        recipe, args.out, data_dir=args.data_dir, progress=not args.no_progress
    )
    print(format_table(result))
    if args.out:
        print(f"wrote {Path(args.out) / 'sensitivity.json'}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from pqd.record import write_report

    if (Path(args.run_dir) / "search.json").is_file():
        from pqd.report import render_search_markdown, write_search_report
        from pqd.search import load_search

        search = load_search(args.run_dir)
        plots = write_search_report(search, Path(args.run_dir))
        print(render_search_markdown(search, list(plots)))
        return 0
    path = Path(args.run_dir) / "record.json"
    if not path.is_file():
        from pqd.runs import search_progress, unfinished_text

        searching = search_progress(path.parent)
        if searching is not None:
            raise PqdError(
                f"{path.parent} holds an unfinished search: {searching}",
                "run the same 'pqd search' command again to continue it (finished trials "
                "are kept), or wait for the running one",
            )
        running = unfinished_text(path.parent)
        if running is not None:
            raise PqdError(
                f"{path.parent} holds an unfinished run: {running}",
                "run the same 'pqd run' command again to continue it, or wait for the running one",
            )
        raise PqdError(
            f"{path} does not exist",
            "give a run folder written by 'pqd run' or a 'pqd search' folder",
        )
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        text = write_report(record, path.parent)
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise PqdError(
            f"{path} is not a complete pqd record ({type(exc).__name__}: {exc})",
            "re-run the recipe into that folder",
        ) from None
    print(text)
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from pqd.pipeline import audit_run
    from pqd.report import table
    from pqd.report_audit import audit_rows

    record = audit_run(
        args.run_dir, data_dir=args.data_dir, full=not args.cheap, progress=not args.no_progress
    )
    print(table(["", "baseline", "final"], audit_rows(record)))
    out = Path(args.run_dir)
    print(
        f"wrote the audit into {out / 'record.json'}, {out / 'report.md'} and {out / 'report.html'}"
    )
    return 0


def _cmd_models(_: argparse.Namespace) -> int:
    from pqd.models import model_names

    print("\n".join(model_names()))
    return 0


# disk full, quota, read-only or forbidden --out, file too large, --out is a file
_STORAGE_ERRNOS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.EFBIG,
    errno.EEXIST,
    errno.ENOTDIR,
}


def storage_error(exc: OSError) -> PqdError:
    """The one line for an OSError of :data:`_STORAGE_ERRNOS` while writing output: the real
    cause (a file where a folder should be, read-only, forbidden, or full) and its fix.

    Args:
        exc: the error, with the path it was writing in ``filename`` when known.

    Returns:
        The error to print.
    """
    where = f" {exc.filename}" if exc.filename else ""
    if exc.errno in (errno.EEXIST, errno.ENOTDIR):
        return PqdError(
            f"cannot write{where}: it or a folder above it is a file, not a folder",
            "choose an --out that is a folder (new or existing), not a file",
        )
    if exc.errno == errno.EROFS:
        return PqdError(
            f"cannot write{where}: the file system is read-only",
            "choose an --out on a writable file system",
        )
    if exc.errno in (errno.EACCES, errno.EPERM):
        return PqdError(
            f"cannot write{where}: permission denied",
            "choose an --out you may write to, or change the folder's permissions",
        )
    return PqdError(
        f"{os.strerror(exc.errno or errno.ENOSPC)} writing{where}",
        "free space or choose an --out on another disk, then run the same command "
        "again: finished steps are kept",
    )


def check_out(out: str | Path) -> None:
    """Refuse an ``--out`` that cannot become a writable folder, before any work is done
    (nothing is created here).

    Args:
        out: the ``--out`` path.
    """
    path = Path(os.path.abspath(Path(out).expanduser()))
    existing = next(p for p in (path, *path.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise storage_error(OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing)))
    if not os.access(existing, os.W_OK | os.X_OK):
        readonly = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
        code = errno.EROFS if readonly else errno.EACCES
        raise storage_error(OSError(code, os.strerror(code), str(existing)))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pqd`` console script."""
    quiet_command()
    show_phases()  # what pqd is doing and how far, with or without --no-progress
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may also follow options: `pqd run r.yaml --out X a.b=1`
    if (
        extra
        and hasattr(args, "overrides")
        and all("=" in e and not e.startswith("-") for e in extra)
    ):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "download", False):
        args.overrides = [*args.overrides, "data.download=true"]
    commands = {
        "run": _cmd_run,
        "search": _cmd_search,
        "plan": _cmd_plan,
        "validate": _cmd_validate,
        "sensitivity": _cmd_sensitivity,
        "report": _cmd_report,
        "models": _cmd_models,
        "audit": _cmd_audit,
    }
    try:
        return commands[args.command](args)
    except PqdError as exc:
        print(f"pqd: error: {exc.line()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pqd: interrupted (run the same command again to resume)", file=sys.stderr)
        return 130
    except OSError as exc:
        if exc.errno not in _STORAGE_ERRNOS:
            raise
        print(f"pqd: error: {storage_error(exc).line()}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
