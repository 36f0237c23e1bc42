"""The user guide holds together: a short README, links that lead somewhere, `pqd` command
lines the real parser accepts, and no commit hashes. Fast: reads files, builds the parser."""

from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path

import pytest

from pqd.cli import _parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
RESULTS = DOCS / "results"
CHANGELOG = ROOT / "CHANGELOG.md"

# Pages the benchmarks generate (`python benchmarks/headline.py`, `python
# benchmarks/train_speed.py`): linked before they are first run, so they may be missing.
MAY_BE_MISSING = {RESULTS / "cifar10.md", RESULTS / "train_speed.md"}

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE_CODE = re.compile(r"`([^`]+)`")
PQD_LINE = re.compile(r"^(?:\$\s+)?pqd\s+([a-z][\w-]*)(.*)$")
FLAG = re.compile(r"(?<![\w.=/-])(--?[A-Za-z][\w-]*)")
HEX_WORD = r"[0-9a-f]{7,12}"
COMMIT_HASH = re.compile(
    rf"\bcommits?\b\W{{0,3}}(?:at\s+|is\s+)?\b{HEX_WORD}\b|\b{HEX_WORD}\b\W{{0,3}}\bcommit",
    re.I,
)


def guide_pages() -> list[Path]:
    """README.md and every page under docs/ but the generated results pages."""
    pages = [README, *sorted(DOCS.rglob("*.md"))]
    return [p for p in pages if RESULTS not in p.parents]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {slug(m) for m in re.findall(r"^#{1,6}\s+(.*)$", text, flags=re.M)}


def rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


def test_there_is_a_guide() -> None:
    names = {rel(p) for p in guide_pages()}
    for stage in ("prune", "prune_channels", "quantize", "distill", "early_exit"):
        assert f"docs/stages/{stage}.md" in names
    for page in ("install", "quickstart", "python-api", "statistics", "architecture"):
        assert f"docs/{page}.md" in names


def test_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines: move detail into docs/"


def test_readme_keeps_the_ci_test_command() -> None:
    # .ci/run runs the README's test command
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    command = next(line for line in ci.splitlines() if line.startswith("python -m pytest"))
    assert f"\n{command}\n" in README.read_text(encoding="utf-8")


def test_relative_links_lead_to_files_and_headings() -> None:
    broken = []
    for page in guide_pages():
        text = FENCE.sub("", page.read_text(encoding="utf-8"))
        for target in LINK.findall(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                if dest not in MAY_BE_MISSING:
                    broken.append(f"{rel(page)}: {target} (no such file)")
                continue
            if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{rel(page)}: {target} (no such heading)")
    assert broken == []


def pqd_commands(text: str) -> list[str]:
    """Every `pqd <subcommand> ...` line: in fenced code blocks and in inline code."""
    found = []
    for block in FENCE.findall(text):
        found += [line.strip() for line in block.splitlines()]
    prose = FENCE.sub("", text)
    found += [" ".join(span.split()) for span in INLINE_CODE.findall(prose)]
    out = []
    for line in found:
        line = re.split(r"\s#", line, maxsplit=1)[0].strip()  # shell comments
        if PQD_LINE.match(line):
            out.append(line)
    return out


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = _parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_pqd_lines_use_real_subcommands_and_flags() -> None:
    subs = subcommands()
    bad, seen = [], 0
    for page in guide_pages():
        for line in pqd_commands(page.read_text(encoding="utf-8")):
            seen += 1
            name, rest = PQD_LINE.match(line).groups()  # type: ignore[union-attr]
            if name not in subs:
                bad.append(f"{rel(page)}: {line!r}: no subcommand {name!r}")
                continue
            options = subs[name]._option_string_actions
            for flag in FLAG.findall(rest):
                if flag not in options:
                    bad.append(f"{rel(page)}: {line!r}: pqd {name} has no {flag}")
    assert seen >= 20, f"only {seen} pqd command lines found: is the parsing broken?"
    assert bad == []


@pytest.mark.parametrize(
    ("line", "ok"),
    [
        ("pqd run recipes/quickstart.yaml --out runs/quick", True),
        ("pqd run r.yaml --out d stages.0.train.lr=0.005 --resume", True),
        ("pqd plan r.yaml --latency-ms 1.5 --out d -k 3", True),
        ("pqd run r.yaml --outt d", False),
        ("pqd audit d --fresh", False),
        ("pqd train r.yaml", False),
    ],
)
def test_the_command_check_can_fail(line: str, ok: bool) -> None:
    subs = subcommands()
    name, rest = PQD_LINE.match(line).groups()  # type: ignore[union-attr]
    known = name in subs and all(f in subs[name]._option_string_actions for f in FLAG.findall(rest))
    assert known is ok


def test_architecture_page_lists_the_layers_of_the_layer_test() -> None:
    """docs/architecture.md's layer table names the modules of tests/test_layers.py's
    LAYERS, layer by layer, in order (someone moving a layer updates both)."""
    spec = importlib.util.spec_from_file_location("_layers", ROOT / "tests" / "test_layers.py")
    assert spec is not None and spec.loader is not None
    layers_test = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(layers_test)
    documented = []
    for row in (DOCS / "architecture.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].isdigit():
            names = re.split(r"(?<=`):", cells[1], maxsplit=1)[0]
            documented.append(tuple(re.findall(r"`(pqd[\w.]*)`", names)))
    assert documented == [tuple(layer) for layer in layers_test.LAYERS]


def test_no_commit_hashes() -> None:
    # the README must name none; the changelog and the docs keep history without them too
    for page in [*guide_pages(), CHANGELOG]:
        text = page.read_text(encoding="utf-8")
        assert COMMIT_HASH.findall(text) == [], rel(page)


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("measured at commit 5caa9e9 on", True),
        ("run 2: commit f7d2455, the code as it is", True),
        ("at 786a2ce commit", True),
        ("the commit that introduced the sensitivity ranking", False),
        ("md5 aed563ecafb4bcc5654c597a421547b2", False),
    ],
)
def test_the_hash_check_can_fail(text: str, found: bool) -> None:
    assert bool(COMMIT_HASH.search(text)) is found


def test_recipe_reference_is_generated_from_the_schema() -> None:
    """docs/recipe-reference.md is what pqd.recipe_docs writes today (regenerate it with
    ``python -m pqd.recipe_docs docs/recipe-reference.md`` after a schema change)."""
    from pqd.recipe_docs import reference

    page = README.parent / "docs" / "recipe-reference.md"
    assert page.read_text(encoding="utf-8") == reference(), "stale: regenerate the page"
    for key in ("`sparsity`", "`freeze_after`", "`parity_min_agreement`", "`total_epochs`"):
        assert key in reference()  # every stage's and section's keys are on it
    assert not re.search(r"``|:(func|class|mod|meth|data):`", reference()), "reST on the page"


def test_docstring_rest_becomes_markdown() -> None:
    from pqd.recipe_docs import markdown

    doc = """Keys ``a`` and ``b``  (see :func:`pqd.x.f`, :class:`~pqd.Y`).

        Second line."""
    assert markdown(doc) == "Keys `a` and `b` (see `pqd.x.f`, `pqd.Y`). Second line."
