"""The routine of the benchmarks that write a results page: run and keep the JSON, or with
``--render`` read the kept JSON back; then write the page from it and print it.

Not a benchmark itself; ``benchmarks/jpeg_cost.py`` and ``benchmarks/ceiling.py`` use it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def footer(r: dict[str, Any]) -> list[str]:
    """A page's last lines from its JSON: the CPU and flags, threads, torch; date, command."""
    env = r["environment"]
    return [
        f"- {env['cpu']} ({', '.join(env['cpu_flags'])}); torch threads "
        f"{env['torch_threads']}; torch {env['libraries'].get('torch', '?')}.",
        f"- {r['date']}; `{r['command']}`",
        "",
    ]


def publish(
    script: str,
    name: str,
    results: Path,
    render_only: bool,
    run: Callable[[], dict[str, Any]],
    render: Callable[[dict[str, Any]], str],
) -> int:
    """Write ``results/NAME.json`` (unless ``render_only``) and ``results/NAME.md``.

    Args:
        script: the benchmark's file name, for its error lines.
        name: the page's name.
        results: the folder of the JSON and the page.
        render_only: read the JSON there instead of running.
        run: measures and returns the JSON (a :class:`pqd.errors.PqdError` becomes one line).
        render: the page (Markdown) from the JSON.

    Returns:
        The exit status: 0, or 2 after a bad input.
    """
    path = results / f"{name}.json"
    if render_only:
        if not path.is_file():
            raise SystemExit(f"benchmarks/{script}: error: no {path}; fix: run it first")
        result = json.loads(path.read_text())
    else:
        from pqd.errors import PqdError

        try:
            result = run()
        except PqdError as exc:
            print(f"benchmarks/{script}: error: {exc.line()}", file=sys.stderr)
            return 2
        results.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
    page = render(result)
    (results / f"{name}.md").write_text(page)
    print(page)
    return 0
