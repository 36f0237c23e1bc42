"""pqd's house: imports point down the layers, and there is no import circle. The graph
holds every import of every module, those inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx  # (a torch dependency)

SRC = Path(__file__).resolve().parents[1] / "src"

# lower layers first; a module may import its own layer and the ones above it in this list
LAYERS: list[tuple[str, ...]] = [
    (
        "pqd.errors",
        "pqd._quiet",
        "pqd._version",
        "pqd.recipe",
        "pqd.recipe_docs",
        "pqd.checkpoint",
        "pqd.state",
        "pqd.registry",
        "pqd.stats",
        "pqd.progress",
        "pqd.cache",
    ),  # data and contracts, statistics, progress lines, the cache folder
    ("pqd.dataset",),  # the in-memory data set, splits
    ("pqd.folder",),  # image folders (decoded once into a memory-mapped cache)
    (
        "pqd.data",
        "pqd.models",
        "pqd.train",
        "pqd.average",
        "pqd.measurement.env",
        "pqd.target",
        "pqd._pt2e_cache",
    ),  # data, nets, training
    ("pqd.measurement",),  # measuring files: accuracy, parity, size, latency, the audit
    ("pqd.quant",),  # PT2E, calibration, sensitivity
    ("pqd.onnx_export",),  # ONNX files
    ("pqd.prune",),  # importance, masks, surgery
    ("pqd.latency_model",),  # measured per-layer tables of the target CPU (pqd plan)
    ("pqd.exits",),  # exit heads, exit files, runtime and measurement
    ("pqd.artifact",),  # export/measure/torch_model of the Python API
    ("pqd.context",),  # what a stage reads
    ("pqd.stages",),  # one thin apply per file
    ("pqd.engine", "pqd.resume", "pqd.step_state", "pqd.fingerprint"),  # stage loop, run folders
    ("pqd.markdown",),  # report text pieces
    ("pqd.pipeline", "pqd.record", "pqd.report", "pqd.report_audit"),  # pqd run, records
    ("pqd.runs",),  # trials as run folders, and which share stages
    ("pqd.executors",),  # what trains trials: this process, local processes, Ray
    ("pqd.api", "pqd.search", "pqd.planner"),  # pqd.compress, pqd search, pqd plan
    ("pqd.cli", "pqd"),  # the command, the package
]
# what a stage module may not import: its siblings and whatever runs stages
RUNS_STAGES = (
    "pqd.stages",
    "pqd.pipeline",
    "pqd.resume",
    "pqd.search",
    "pqd.cli",
    "pqd.engine",
    "pqd.api",
)


def module_names() -> dict[str, Path]:
    out = {}
    for path in (SRC / "pqd").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph() -> nx.DiGraph:
    """Module -> imported pqd module, for every import statement anywhere in the file."""
    mods = module_names()
    graph = nx.DiGraph()
    for name, path in mods.items():
        graph.add_node(name)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # ``from pkg import submodule`` imports the submodule; else the module itself
                targets = [
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                    for a in node.names
                ]
            for target in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph.add_edge(name, target)
    return graph


def layer_of(module: str) -> int:
    best = (-1, -1)  # (prefix length, layer): the most specific entry wins
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best[0]:
                best = (len(prefix), i)
    assert best[1] >= 0, f"{module} is in no layer: add it to LAYERS"
    return best[1]


def test_the_graph_sees_imports_inside_functions() -> None:
    graph = import_graph()
    # pipeline imports the exits' measuring only inside a function (an early-exit run)
    assert graph.has_edge("pqd.pipeline.finish", "pqd.exits.measure")
    assert graph.number_of_edges() > 150


def test_no_import_circle() -> None:
    circles = [sorted(c) for c in nx.strongly_connected_components(import_graph()) if len(c) > 1]
    assert circles == []


def test_imports_point_down_the_layers() -> None:
    up = [f"{a} -> {b}" for a, b in import_graph().edges if layer_of(b) > layer_of(a)]
    assert up == []


def test_a_stage_imports_no_sibling_stage_nor_what_runs_it() -> None:
    graph = import_graph()
    stages = [m for m in graph if m.startswith("pqd.stages.")]
    assert sorted(m.rsplit(".", 1)[1] for m in stages) == [
        "distill",
        "early_exit",
        "prune",
        "prune_channels",
        "quantize",
    ]
    bad = [
        f"{a} -> {b}"
        for a in stages
        for b in graph.successors(a)
        if any(b == p or b.startswith(p + ".") for p in RUNS_STAGES)
    ]
    assert bad == []


def private_imports_across_packages() -> list[str]:
    """``from pqd.a.b import _name`` where the importer is outside package ``pqd.a``."""
    bad = []
    for name, path in module_names().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.ImportFrom) and node.module and node.level == 0):
                continue
            here, there = name.split(".")[:2], node.module.split(".")[:2]
            if there[0] != "pqd" or here == there:
                continue
            bad += [f"{name} <- {node.module}.{a.name}" for a in node.names if _private(a.name)]
    return bad


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_private_name_is_imported_across_packages() -> None:
    assert private_imports_across_packages() == []


def package_graph() -> nx.DiGraph:
    """The import graph between pqd's top-level modules and packages, without what other
    arrows imply (its transitive reduction)."""
    graph = nx.DiGraph()
    for a, b in import_graph().edges:
        pa, pb = ".".join(a.split(".")[:2]), ".".join(b.split(".")[:2])
        graph.add_nodes_from((pa, pb))
        if pa != pb:
            graph.add_edge(pa, pb)
    return nx.transitive_reduction(graph)


def mermaid() -> str:
    """docs/architecture.md's drawing of :func:`package_graph` (a Mermaid flowchart, top
    layer first)."""
    graph = package_graph()
    short = {n: n.removeprefix("pqd.").lstrip("_") for n in graph}
    lines = ["```mermaid", "flowchart TD"]
    for node in sorted(graph, key=lambda n: (-layer_of(n), n)):
        lines.append(f"    {short[node]}[{node}]")
    for a, b in sorted(graph.edges, key=lambda e: (-layer_of(e[0]), e)):
        lines.append(f"    {short[a]} --> {short[b]}")
    return "\n".join([*lines, "```"])


def test_the_architecture_page_draws_the_graph_as_it_is() -> None:
    page = (SRC.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    assert mermaid() in page, "redraw it: python tests/test_layers.py > the graph block"


def test_the_rules_can_fail() -> None:
    """The checks above see a forbidden edge and a circle when one is there."""
    graph = import_graph()
    graph.add_edge("pqd.onnx_export", "pqd.stages.quantize")
    assert layer_of("pqd.stages.quantize") > layer_of("pqd.onnx_export")
    graph.add_edge("pqd.stages.quantize", "pqd.onnx_export")
    assert any(
        len(c) > 1 and "pqd.onnx_export" in c for c in nx.strongly_connected_components(graph)
    )


if __name__ == "__main__":  # the drawing for docs/architecture.md
    print(mermaid())
