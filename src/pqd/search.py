"""``pqd search``: run a recipe's stages in every order, decide pairwise order wins, rank.

    search = run_search(load_recipe("recipes/search-quickstart.yaml"), "runs/search")

A search recipe is a normal recipe plus a ``search:`` section (:class:`pqd.recipe.SearchSpec`).
Every trial is an ordinary, fully resolved pqd recipe that loads the search's ONE shared
baseline checkpoint (trained once into ``DIR/baseline/`` by the normal pipeline, or the
recipe's ``baseline.checkpoint``), with the same data and seed(s) for every order:

- permutations: every order of the n stages (n! runs per seed); position i of every order
  gets ``budget[i]`` % of ``total_epochs`` (:func:`allocate_epochs`);
- pairwise (Order of Compression): for each pair A, B the two-stage runs A->B and B->A
  (n(n-1) runs per seed). Each gets the epochs of the FIRST TWO positions of the permutation
  allocation, so A->B is exactly the A->B prefix that the permutation A->B->C starts with
  (same epochs, same per-stage seeds); the winner (:func:`decide_pair`) gives an edge
  "A before B", and :func:`topological_order` sorts the graph or reports the cycle;
- references: each stage alone with all ``total_epochs`` (prune only, quantize only...).

Trials train (and export) through an executor: in this process (sequential, the default),
in ``workers`` local processes, or as one Ray task each. Measuring always happens here, on
the driver, one run at a time and never while a trial trains: each trial's ``record.json``
is completed by :func:`pqd.pipeline.measure_run`, and at the end every deployed artifact is
timed once more in one interleaved latency panel (batch 1), so that the ranking and the
frontier compare latencies taken side by side rather than minutes apart.

Each run folder is keyed by a hash of its resolved recipe (:func:`trial_key`, with the
baseline checkpoint's content hash and the data folder in place of paths): re-running the
same command reuses finished trials (measuring those trained but not yet measured) and
redoes missing, half-finished and failed ones. A trial that fails with a PqdError (e.g. its
loss diverged) is reported as failed and loses its pairwise comparison; the search goes on.

Writes ``DIR/search.json`` (per-trial summaries with paths to their records, the groups
over seeds, ranking, pairwise table, derived order or cycle, Pareto set, run counts),
``report.md``, ``report.html`` (self-contained) and ``plots/*.png``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import math
import os
import shutil
import socket
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pqd.errors import PqdError, RecipeError
from pqd.recipe import Recipe, recipe_from_dict, stable_dump
from pqd.stats import compare_over_seeds, decide, holm, seed_summary, wilson_interval

SEARCH_VERSION = 2
KEY_VERSION = 1  # bump when a change makes old trial folders unusable
EXECUTORS = ("sequential", "processes", "ray")
TRIAL_FILE = "trial.json"
SEARCH_FILE = "search.json"
SIZE_TOLERANCE = 0.01  # artifacts within 1% in bytes count as the same size on the frontier


# ---------------------------------------------------------------------------- planning


def allocate_epochs(total: int, budget: Sequence[float]) -> list[int]:
    """Split ``total`` epochs over positions by ``budget`` percentages (largest remainder).

    The result always sums to ``total``; leftover epochs go to the positions with the largest
    fractional share, earlier positions first on ties. ``[20, 40, 40]`` of 5 -> ``[1, 2, 2]``.
    """
    weight = float(sum(budget))
    if total < 0 or weight <= 0 or any(b < 0 for b in budget):
        raise ValueError(f"cannot split {total} epochs by {list(budget)}")
    shares = [total * b / weight for b in budget]
    epochs = [math.floor(s + 1e-9) for s in shares]
    rest = total - sum(epochs)
    by_remainder = sorted(range(len(shares)), key=lambda i: (-(shares[i] - epochs[i]), i))
    for i in by_remainder[:rest]:
        epochs[i] += 1
    return epochs


def search_budget(recipe: Recipe) -> tuple[int, list[float]]:
    """``(total_epochs, budget)`` of a search recipe, defaults filled in."""
    spec = recipe.search
    if spec is None:
        raise PqdError(
            f"recipe {recipe.name!r} has no search: section",
            "add search: {total_epochs: ..., budget: [...]} or use 'pqd run'",
        )
    n = len(recipe.stages)
    total = (
        spec.total_epochs if spec.total_epochs is not None else sum(s.epochs for s in recipe.stages)
    )
    budget = list(spec.budget) if spec.budget is not None else [100.0 / n] * n
    return total, budget


def order_label(order: Sequence[str]) -> str:
    """``prune -> quantize``; ``baseline`` for the empty order."""
    return " -> ".join(order) if order else "baseline"


def short_label(order: Sequence[str]) -> str:
    """``P>Q>D`` (stage initials); ``base`` for the empty order."""
    return ">".join(s[0].upper() for s in order) if order else "base"


@dataclass(frozen=True)
class Trial:
    """One entry of the search: a kind, a stage order, a seed, and the run that gives it.

    Entries whose resolved recipes are equal share one run (same ``key``, same folder): with
    two stages, the pairwise run A->B is the permutation A->B.
    """

    kind: str  # baseline | permutation | pairwise | reference
    order: tuple[str, ...]
    seed: int
    epochs: tuple[int, ...]
    recipe: Recipe
    key: str

    @property
    def group(self) -> str:
        """Id shared by the seeds of one kind and order, e.g. ``permutation:prune>quantize``."""
        return "baseline" if self.kind == "baseline" else f"{self.kind}:{'>'.join(self.order)}"

    @property
    def folder(self) -> str:
        """Run folder relative to the search folder."""
        if self.kind == "baseline":
            return "baseline"
        return f"trials/{'-'.join(self.order)}-s{self.seed}-{self.key[:10]}"


def trial_key(recipe: Recipe, checkpoint_digest: str | None, data_root: str) -> str:
    """Hash of everything that decides a run's result: the resolved recipe (without its name,
    with the baseline checkpoint's content hash in place of its path) and the data folder."""
    data = stable_dump(recipe)  # fields at their defaults left out: new ones change nothing
    data.pop("name", None)
    data.pop("search", None)
    data.get("data", {}).pop("download", None)  # where the files came from, not what they are
    if not data.get("data"):
        data.pop("data", None)  # all at defaults: as if never written
    if data.get("baseline", {}).get("checkpoint"):
        data["baseline"]["checkpoint"] = checkpoint_digest
    blob = json.dumps(
        {"v": KEY_VERSION, "recipe": data, "data_root": data_root},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def baseline_trial(recipe: Recipe, data_root: str) -> Trial:
    """The shared baseline as a run without stages (trained, or loaded from a checkpoint)."""
    data = recipe.model_dump(mode="json")
    data.pop("search", None)
    data.update(name=f"{recipe.name}-baseline", stages=[])
    base = recipe_from_dict(data, "search baseline")
    ckpt = base.baseline.checkpoint
    digest = file_digest(ckpt) if ckpt and Path(ckpt).is_file() else ckpt
    return Trial(
        "baseline",
        (),
        recipe.seed,
        (recipe.baseline.epochs,) if not ckpt else (),
        base,
        trial_key(base, digest, data_root),
    )


def trial_recipe(
    recipe: Recipe,
    order: Sequence[int],
    epochs: Sequence[int],
    seed: int,
    checkpoint: str,
    name: str,
) -> Recipe:
    """The search recipe's stages ``order`` (indices) with ``epochs`` per position, ``seed``,
    loading ``checkpoint``; PTQ stages keep 0 epochs (they calibrate only)."""
    data = recipe.model_dump(mode="json")
    data.pop("search", None)
    stages = []
    for i, e in zip(order, epochs, strict=True):
        stage = dict(data["stages"][i])
        if not (stage["stage"] == "quantize" and stage.get("mode") == "ptq"):
            stage["epochs"] = int(e)
        stages.append(stage)
    data.update(name=name, seed=seed, stages=stages)
    data["baseline"] = {**data["baseline"], "checkpoint": checkpoint}
    try:
        return recipe_from_dict(data, f"search trial {name}")
    except RecipeError as exc:
        raise RecipeError(
            f"search: trial {order_label([recipe.stages[i].stage for i in order])} with "
            f"epochs {list(epochs)} is not a valid recipe ({exc.problem})",
            "raise search.total_epochs or the budget share of that position",
        ) from None


def plan_trials(
    recipe: Recipe, checkpoint: str, checkpoint_digest: str, data_root: str
) -> list[Trial]:
    """Every trial entry of the search, in run order: permutations, pairwise, references."""
    spec = recipe.search
    assert spec is not None
    total, budget = search_budget(recipe)
    n = len(recipe.stages)
    names = [s.stage for s in recipe.stages]
    alloc = allocate_epochs(total, budget)
    plans: list[tuple[str, tuple[int, ...], list[int]]] = []
    if spec.mode in ("permutations", "both"):
        plans += [("permutation", p, alloc) for p in itertools.permutations(range(n))]
    if spec.mode in ("pairwise", "both"):
        plans += [("pairwise", p, alloc[:2]) for p in itertools.permutations(range(n), 2)]
    if spec.references:
        plans += [("reference", (i,), [total]) for i in range(n)]
    trials = []
    for seed in spec.seeds:
        for kind, idx, epochs in plans:
            order = tuple(names[i] for i in idx)
            name = f"{recipe.name}-{'-'.join(order)}-s{seed}"
            r = trial_recipe(recipe, idx, epochs, seed, checkpoint, name)
            trials.append(
                Trial(
                    kind, order, seed, tuple(epochs), r, trial_key(r, checkpoint_digest, data_root)
                )
            )
    return trials


# ---------------------------------------------------------------------------- decisions


def decide_pair(
    ab_done: bool,
    ba_done: bool,
    comparison: dict[str, Any] | None,
    p_adjusted: float | None,
    lat_ab: float | None,
    lat_ba: float | None,
    spec: Any,
) -> tuple[str | None, str]:
    """Which order of a pair wins: ``"ab"``, ``"ba"`` or ``None`` (tie), and what decided.

    Accuracy decides when the paired comparison of A->B against B->A on the same test
    images (:func:`pqd.stats.compare_over_seeds`) is significant at ``spec.alpha`` after
    Holm's correction over the pairs (``p_adjusted``), holds across seeds where the seeds
    spread more than the images explain, and is at least ``spec.min_effect_points``
    (:func:`pqd.stats.decide`). Otherwise a batch-1 p50 latency (ms) lower by more than the
    fraction ``spec.tie_latency`` wins; otherwise the pair ties.

    Args:
        ab_done: the A->B runs finished (on at least one seed).
        ba_done: the B->A runs finished.
        comparison: A->B against B->A, or None without per-image predictions.
        p_adjusted: the comparison's Holm-adjusted McNemar p-value.
        lat_ab: A->B's batch-1 p50 (ms), or None.
        lat_ba: B->A's batch-1 p50 (ms), or None.
        spec: the recipe's ``search`` section.

    Returns:
        ``(winner, decided_by)``.
    """
    if not ab_done or not ba_done:
        if not ab_done and not ba_done:
            return None, "both runs failed"
        return ("ba" if not ab_done else "ab"), "the other run failed"
    if comparison is not None and p_adjusted is not None:
        verdict = decide(comparison, p_adjusted, spec.alpha, spec.min_effect_points / 100.0)
        if verdict != "tie":
            return ("ab" if verdict == "a" else "ba"), "accuracy"
    if lat_ab is not None and lat_ba is not None and max(lat_ab, lat_ba) > 0:
        rel = (lat_ba - lat_ab) / max(lat_ab, lat_ba)
        if abs(rel) > spec.tie_latency:
            return ("ab" if rel > 0 else "ba"), "latency"
    return None, "tie" if comparison is not None else "tie (no per-image predictions)"


def paired_groups(
    a: list[dict[str, Any]], b: list[dict[str, Any]], correct: dict[str, np.ndarray]
) -> dict[str, Any] | None:
    """Group a against group b on the same test images, seed by seed.

    Args:
        a: group a's trial entries (one per seed; ``key``, ``seed``, ``status``).
        b: group b's trial entries.
        correct: per-image correctness (bool) by trial key.

    Returns:
        :func:`pqd.stats.compare_over_seeds` over the seeds both finished with predictions,
        or None when there is no such seed.
    """
    by_seed = {e["seed"]: e for e in b if e.get("status") == "done" and e["key"] in correct}
    pairs = [
        (correct[e["key"]], correct[by_seed[e["seed"]]["key"]])
        for e in a
        if e.get("status") == "done" and e["key"] in correct and e["seed"] in by_seed
    ]
    return compare_over_seeds(pairs) if pairs else None


def holm_adjusted(comparisons: Sequence[dict[str, Any] | None]) -> list[float | None]:
    """Holm-adjusted McNemar p-values of a family of comparisons, in their order; None where
    a comparison is missing (it is not part of the family)."""
    adjusted = iter(holm([float(c["p_value"]) for c in comparisons if c is not None]))
    return [None if c is None else next(adjusted) for c in comparisons]


def topological_order(nodes: Sequence[str], edges: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """Sort ``nodes`` so that every edge ``(a, b)`` ("a before b") points forward.

    Returns ``{"order": [...] or None, "unique": bool, "cycle": [[a, b], ...] or None}``.
    With a cycle no order is given and ``cycle`` lists the edges of one cycle; ``unique`` is
    False when some nodes could swap places (ties leave pairs without an edge). Ties between
    free nodes are broken by their position in ``nodes``.
    """
    succ: dict[str, list[str]] = {v: [] for v in nodes}
    indeg = dict.fromkeys(nodes, 0)
    for a, b in edges:
        succ[a].append(b)
        indeg[b] += 1
    order, unique = [], True
    free = [v for v in nodes if indeg[v] == 0]
    while free:
        unique = unique and len(free) == 1
        v = free.pop(0)
        order.append(v)
        for w in succ[v]:
            indeg[w] -= 1
            if indeg[w] == 0:
                free.append(w)
        free.sort(key=list(nodes).index)
    if len(order) == len(nodes):
        return {"order": order, "unique": unique, "cycle": None}
    left = {v for v in nodes if v not in order}
    pred = {v: [a for a, b in edges if b == v and a in left] for v in left}
    # every node left has a predecessor left: walk back until a node repeats
    walk, v = [], next(v for v in nodes if v in left)
    while v not in walk:
        walk.append(v)
        v = pred[v][0]
    cycle = list(reversed(walk[walk.index(v) :]))
    return {
        "order": None,
        "unique": False,
        "cycle": [[cycle[i], cycle[(i + 1) % len(cycle)]] for i in range(len(cycle))],
    }


def pareto_front(
    points: Sequence[tuple[float, float, float]],
    latency_tolerance: float = 0.0,
    size_tolerance: float = 0.0,
) -> list[int]:
    """Indices of the Pareto-optimal points among ``(accuracy, size, latency)`` tuples.

    Higher accuracy, smaller size and lower latency are better. A point is dominated when
    another is at least as good in all three and better in one; latencies (sizes) within
    the fraction ``latency_tolerance`` (``size_tolerance``) of each other count as equal,
    so timing noise and a few bytes of file metadata decide nothing.
    """

    def dominates(j: tuple[float, float, float], i: tuple[float, float, float]) -> bool:
        ts, tl = size_tolerance, latency_tolerance
        no_worse = j[0] >= i[0] and j[1] <= i[1] * (1 + ts) and j[2] <= i[2] * (1 + tl)
        better = j[0] > i[0] or j[1] < i[1] * (1 - ts) or j[2] < i[2] * (1 - tl)
        return no_worse and better

    return [
        i
        for i, p in enumerate(points)
        if not any(dominates(q, p) for j, q in enumerate(points) if j != i)
    ]


# ---------------------------------------------------------------------------- trial folders


def folder_status(folder: Path, key: str) -> str:
    """``done`` (record.json measured), ``trained`` (exported, awaiting measurement),
    ``partial`` (this key's run, stopped while training: it continues from its last
    finished step and epoch) or ``missing`` (absent or another key's: to be redone)."""
    from pqd.pipeline import PENDING_FILE, REFERENCE_FILE

    try:
        if json.loads((folder / TRIAL_FILE).read_text(encoding="utf-8")).get("key") != key:
            return "missing"
    except (OSError, ValueError):
        return "missing"
    try:
        record = json.loads((folder / "record.json").read_text(encoding="utf-8"))
        if "p50" in record["final"]["latency_ms"] and "accuracy" in record["final"]:
            return "done"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    needed = (PENDING_FILE, REFERENCE_FILE, "baseline.onnx", "final.onnx")
    if all((folder / f).is_file() for f in needed):
        return "trained"
    from pqd.resume import PROGRESS

    return "partial" if (folder / PROGRESS).is_file() else "missing"


def refuse_other_baseline(folder: Path, key: str) -> None:
    """Raise a one-line PqdError when ``folder`` holds a finished, measured baseline of a
    recipe other than ``key``'s: training this recipe's baseline would delete it (and
    orphan the trials trained from it). A half-finished one is simply redone."""
    try:
        old = json.loads((folder / TRIAL_FILE).read_text(encoding="utf-8")).get("key")
    except (OSError, ValueError, AttributeError):
        return
    if isinstance(old, str) and old != key and folder_status(folder, old) == "done":
        raise PqdError(
            f"{folder} holds the finished baseline of another search recipe (key {old}; "
            f"this recipe's is {key}): training this one there would delete it",
            "use another --out, or --fresh to retrain the baseline in this folder "
            "(trial folders are kept per recipe)",
        )


def _reset_folder(folder: Path, trial: Trial) -> None:
    from pqd.checkpoint import atomic_write_text

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    atomic_write_text(
        folder / TRIAL_FILE,
        json.dumps(
            {
                "key": trial.key,
                "name": trial.recipe.name,
                "order": list(trial.order),
                "seed": trial.seed,
                "epochs": list(trial.epochs),
            },
            indent=2,
        ),
    )


def train_trial(
    recipe_data: dict[str, Any],
    out_dir: str,
    data_dir: str | None,
    progress: bool = False,
    threads: int | None = None,
) -> dict[str, Any]:
    """Train and export one run into ``out_dir`` without measuring it (executor entry point).

    A :class:`PqdError` (e.g. the loss diverged) is returned as ``{"ok": False, "error"}``
    so the search goes on and reports the failed trial.
    """
    import torch

    from pqd._quiet import quiet_command
    from pqd.pipeline import run

    quiet_command()
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    info = {"host": socket.gethostname(), "threads": torch.get_num_threads()}
    try:
        run(
            recipe_from_dict(recipe_data, "trial"),
            out_dir,
            data_dir=data_dir,
            progress=progress,
            measure=False,
            resume=True,  # the key matched: the steps whose fingerprints match are kept
        )
    except PqdError as exc:
        return {
            **info,
            "ok": False,
            "error": exc.line(),
            "problem": exc.problem,
            "fix": exc.fix,
            "seconds": round(time.perf_counter() - t0, 2),
        }
    return {**info, "ok": True, "seconds": round(time.perf_counter() - t0, 2)}


def _ray_train_trial(
    recipe_data: dict[str, Any], data_dir: str | None, checkpoint: bytes | None
) -> dict[str, Any]:
    """Ray task: train one run in a temporary folder and return it as tar bytes, so the
    driver needs no file system shared with the cluster. The baseline checkpoint travels as
    bytes when the node does not hold the driver's path."""
    import ray

    cpus = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1) or 1)
    tmp = Path(tempfile.mkdtemp(prefix="pqd-trial-"))
    try:
        original = recipe_data["baseline"].get("checkpoint")
        local = original
        if checkpoint is not None and original and not Path(original).is_file():
            local = str(tmp / "baseline-checkpoint.safetensors")
            Path(local).write_bytes(checkpoint)
            recipe_data = {
                **recipe_data,
                "baseline": {**recipe_data["baseline"], "checkpoint": local},
            }
        result = train_trial(recipe_data, str(tmp / "run"), data_dir, False, max(1, cpus))
        if local != original:  # the records name the driver's checkpoint path
            for name in ("pending.json", "recipe.yaml"):
                path = tmp / "run" / name
                if path.is_file():
                    path.write_text(
                        path.read_text(encoding="utf-8").replace(
                            json.dumps(local)[1:-1], json.dumps(original)[1:-1]
                        ),
                        encoding="utf-8",
                    )
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            tar.add(tmp / "run", arcname=".")
        return {**result, "files": buf.getvalue()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _safe_extract(data: bytes, dest: Path) -> None:
    """Unpack a run folder sent back by a Ray task: plain files and folders inside ``dest``."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for m in tar.getmembers():
            if not (m.isfile() or m.isdir()) or m.name.startswith("/") or ".." in m.name:
                raise PqdError(
                    f"a Ray task returned an unsafe path {m.name!r}",
                    "check the cluster's pqd installation",
                )
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:  # Python < 3.10.12 / 3.11.4: the members were checked above
            tar.extractall(dest)


# ---------------------------------------------------------------------------- executors


def check_executor(executor: str, workers: int | None, address: str | None) -> str:
    """Validate the executor choice; ``--workers N`` alone means local processes."""
    if executor == "sequential" and workers is not None and workers > 1:
        executor = "processes"
    if executor not in EXECUTORS:
        raise PqdError(
            f"unknown executor {executor!r}", f"use one of {', '.join(EXECUTORS)} (--executor)"
        )
    if workers is not None and workers < 1:
        raise PqdError(
            f"--workers {workers} is not a number of processes", "give --workers 1 or more"
        )
    if address is not None and executor != "ray":
        raise PqdError(
            f"--address is for the Ray executor, but the executor is {executor}",
            "add --executor ray or drop --address",
        )
    if executor == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise PqdError(
                "--executor ray needs the ray package, which is not installed",
                "pip install 'pqd[ray]' (or pip install ray), or use --workers N",
            ) from None
    return executor


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast (one line) when a ``host:port`` Ray address does not answer."""
    if address in ("auto", "local"):
        return
    target = address.split("://", 1)[-1]
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise PqdError(
            f"Ray address {address!r} is not of the form host:port",
            "give e.g. --address 10.0.0.5:6379, ray://host:10001 or local",
        )
    fix = (
        "start it with 'ray start --head' and pass its address, or use --address local "
        "for a Ray instance on this machine"
    )
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s) as sock:
            sock.settimeout(timeout_s)
            sock.sendall(_HTTP2_PREFACE)
            head = b""
            while len(head) < 9:
                chunk = sock.recv(9 - len(head))
                if not chunk:
                    break
                head += chunk
    except TimeoutError:
        head = b""
    except OSError as exc:
        raise PqdError(
            f"cannot reach the Ray cluster at {address} ({exc.strerror or exc})", fix
        ) from None
    if len(head) < 9 or head[3] != 0x04:  # a gRPC server answers with a SETTINGS frame
        raise PqdError(
            f"{address} answers, but not as a Ray cluster (no gRPC reply within {timeout_s:g} s)",
            f"check the port (Ray's default is 6379); {fix}",
        )


# HTTP/2 client preface and an empty SETTINGS frame: Ray (GCS and Ray Client) speaks gRPC
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Send what is written to file descriptor 2 (Ray's C++ core and Python loggers print
    there while connecting) to /dev/null for the duration; pqd says what matters itself."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
            os.dup2(null.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
    finally:
        os.close(saved)


class _Executor:
    """Runs ``train_trial`` for a list of (trial, folder) pairs; ``local`` executors write
    into the folders directly, Ray returns each folder as bytes."""

    def __init__(
        self, kind: str, workers: int | None, address: str | None, data_root: str, progress: bool
    ) -> None:
        self.kind, self.data_root, self.progress = kind, data_root, progress
        self.workers = workers or (1 if kind == "sequential" else (os.cpu_count() or 1))
        self.address = address
        self._ray_started = False
        self.ray_gpus = 0.0

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        if self.kind == "processes":
            out["workers"] = self.workers
        if self.kind == "ray":
            out.update(address=self.address or "auto", gpus_per_trial=1 if self.ray_gpus else 0)
        return out

    def __enter__(self) -> _Executor:
        if self.kind == "ray":
            import ray

            if not ray.is_initialized():
                if self.address:
                    _check_reachable(self.address)
                kwargs: dict[str, Any] = {"log_to_driver": False}
                if self.address in (None, "local"):
                    kwargs["include_dashboard"] = False
                try:
                    with _quiet_stderr():
                        ray.init(address=self.address, **kwargs)
                except Exception as exc:  # ConnectionError, RuntimeError, ValueError...
                    raise PqdError(
                        f"cannot connect to Ray at {self.address or 'auto'} "
                        f"({type(exc).__name__}: {' '.join(str(exc).split())[:160]})",
                        "start the cluster with 'ray start --head' and pass its address, or "
                        "use --address local",
                    ) from None
                self._ray_started = True
            self.ray_gpus = float(ray.cluster_resources().get("GPU", 0))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._ray_started:
            import ray

            ray.shutdown()

    def run(
        self,
        jobs: list[tuple[Trial, Path]],
        done: Callable[[Trial, Path, dict[str, Any]], None],
        *,
        local_first: bool = False,
    ) -> None:
        """Train every job; ``done(trial, folder, result)`` runs here as each one finishes.
        ``local_first``: run in this process even for the process executor (the baseline)."""
        if not jobs:
            return
        if self.kind == "sequential" or (local_first and self.kind == "processes"):
            for trial, folder in jobs:
                done(
                    trial,
                    folder,
                    train_trial(
                        trial.recipe.model_dump(mode="json"),
                        str(folder),
                        self.data_root,
                        self.progress,
                    ),
                )
        elif self.kind == "processes":
            self._run_processes(jobs, done)
        else:
            self._run_ray(jobs, done)

    def _run_processes(
        self, jobs: list[tuple[Trial, Path]], done: Callable[[Trial, Path, dict[str, Any]], None]
    ) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        workers = min(self.workers, len(jobs))
        threads = max(1, (os.cpu_count() or 1) // workers)
        pool = ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context("spawn")
        )
        try:
            futures = {
                pool.submit(
                    train_trial,
                    t.recipe.model_dump(mode="json"),
                    str(f),
                    self.data_root,
                    False,
                    threads,
                ): (t, f)
                for t, f in jobs
            }
            for fut in as_completed(futures):
                trial, folder = futures[fut]
                done(trial, folder, fut.result())
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()

    def _run_ray(
        self, jobs: list[tuple[Trial, Path]], done: Callable[[Trial, Path, dict[str, Any]], None]
    ) -> None:
        import ray

        task = ray.remote(_ray_train_trial).options(
            num_cpus=1, num_gpus=1 if self.ray_gpus >= 1 else 0, max_retries=1
        )
        blobs: dict[str, Any] = {}
        pending = {}
        for trial, folder in jobs:
            ckpt = trial.recipe.baseline.checkpoint
            if ckpt and ckpt not in blobs:
                blobs[ckpt] = ray.put(Path(ckpt).read_bytes())
            ref = task.remote(
                trial.recipe.model_dump(mode="json"),
                self.data_root,
                blobs.get(ckpt) if ckpt else None,
            )
            pending[ref] = (trial, folder)
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                trial, folder = pending.pop(ready[0])
                result = ray.get(ready[0])
                _safe_extract(result.pop("files"), folder)
                done(trial, folder, result)
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise


# ---------------------------------------------------------------------------- the search


def _say(msg: str) -> None:
    print(f"pqd search: {msg}", file=sys.stderr, flush=True)


def run_search(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    data_dir: str | None = None,
    executor: str = "sequential",
    workers: int | None = None,
    address: str | None = None,
    progress: bool = True,
    fresh: bool = False,
) -> dict[str, Any]:
    """Run (or resume) the search of ``recipe`` into ``out_dir``; returns search.json's data.

    A finished baseline of another recipe in ``out_dir`` is refused (one line, nothing
    written) unless ``fresh``, which retrains the baseline there; trial folders are keyed by
    their recipe, so other recipes' trials stay where they are."""
    from pqd.pipeline import check_recipe_data, check_runtimes

    t_start = time.perf_counter()
    if recipe.search is None:
        search_budget(recipe)  # raises the one-line error
    executor = check_executor(executor, workers, address)
    check_runtimes(recipe)
    out = Path(out_dir).resolve()
    data_root = str(check_recipe_data(recipe, data_dir).path)
    base = baseline_trial(recipe, data_root)
    if not fresh:
        refuse_other_baseline(out / base.folder, base.key)
    stats = {"trained": 0, "reused": 0, "failed": 0, "measured": 0}
    results: dict[str, dict[str, Any]] = {}  # key -> train result (this invocation)
    timing = {"train": 0.0, "measure": 0.0}

    def measure(folder: Path) -> None:
        from pqd.pipeline import measure_run

        t0 = time.perf_counter()
        measure_run(
            folder,
            data_dir=data_root,
            progress=progress,
            where=f"driver ({socket.gethostname()}), sequential: one run at a time, "
            "never while a trial trains",
        )
        timing["measure"] += time.perf_counter() - t0
        stats["measured"] += 1

    with _Executor(executor, workers, address, data_root, progress) as ex:
        out.mkdir(parents=True, exist_ok=True)  # only once the executor is up: nothing is
        # left behind when it cannot start
        # ---- the shared baseline
        base_dir = out / base.folder
        status = folder_status(base_dir, base.key)
        if status in ("missing", "partial"):
            from pqd.progress import plural

            ckpt = recipe.baseline.checkpoint
            what = (
                f"loading {ckpt}" if ckpt else f"training {plural(recipe.baseline.epochs, 'epoch')}"
            )
            if status == "partial":  # stopped while training: it continues
                what = f"continuing ({what})"
            else:
                _reset_folder(base_dir, base)
            _say(f"baseline: {what} into {base_dir}")
            t0 = time.perf_counter()
            ex.run(
                [(base, base_dir)], lambda t, f, r: results.__setitem__(t.key, r), local_first=True
            )
            timing["train"] += time.perf_counter() - t0
            failure = results[base.key]
            if not failure["ok"]:
                raise PqdError(f"search baseline: {failure['problem']}", failure["fix"])
            stats["trained"] += 1
        else:
            stats["reused"] += 1
        if folder_status(base_dir, base.key) == "trained":
            measure(base_dir)
        checkpoint = base_dir / "baseline.safetensors"
        trials = plan_trials(recipe, str(checkpoint), file_digest(checkpoint), data_root)

        # ---- trials: unique runs, reuse finished ones
        runs: dict[str, Trial] = {}
        for t in trials:
            runs.setdefault(t.key, t)
        todo, to_measure = [], []
        for key, t in runs.items():
            st = folder_status(out / t.folder, key)
            if st == "done":
                stats["reused"] += 1
            elif st == "trained":
                to_measure.append(out / t.folder)
                stats["reused"] += 1
            else:
                todo.append((t, out / t.folder))
        _say(
            f"{len(trials)} trials ({_count(trials)}) in {len(runs)} runs, "
            f"{len(runs) - len(todo)} reused; executor {executor}"
        )

        n_todo = len(todo)

        def finished(trial: Trial, folder: Path, result: dict[str, Any]) -> None:
            results[trial.key] = result
            i = len([k for k in results if k != base.key])
            what = (
                f"{result['seconds']:.0f} s on {result['host']}"
                if result["ok"]
                else f"FAILED: {result['error']}"
            )
            _say(
                f"[{i}/{n_todo}] {trial.kind} {order_label(trial.order)} seed {trial.seed} "
                f"(epochs {'/'.join(map(str, trial.epochs))}): {what}"
            )
            if result["ok"]:
                stats["trained"] += 1
                if executor == "sequential":
                    measure(folder)  # nothing else runs now
                else:
                    to_measure.append(folder)
            else:
                stats["failed"] += 1
                from pqd.checkpoint import atomic_write_text

                atomic_write_text(folder / "failed.json", json.dumps(result, indent=2))

        for trial, folder in todo:
            if folder_status(folder, trial.key) == "missing":  # a stopped one continues
                _reset_folder(folder, trial)
        t0, m0 = time.perf_counter(), timing["measure"]
        ex.run(todo, finished)
        timing["train"] += time.perf_counter() - t0 - (timing["measure"] - m0)
        executor_info = ex.describe()
    # ---- measurement of everything trained elsewhere, one run at a time, then the panel
    for folder in to_measure:
        _say(f"measuring {folder.relative_to(out)}")
        measure(folder)
    t0 = time.perf_counter()
    search = summarize(recipe, out, base, trials, executor_info, progress=progress)
    timing["panel"] = time.perf_counter() - t0
    search["runs"].update(
        trained_now=stats["trained"], reused=stats["reused"], failed=stats["failed"]
    )
    search["timing_s"] = {
        "train": round(timing["train"], 1),
        "measure": round(timing["measure"], 1),
        "panel": round(timing["panel"], 1),
        "total": round(time.perf_counter() - t_start, 1),
    }
    write_search(search, out)
    return search


def _count(trials: Sequence[Trial]) -> str:
    kinds = [t.kind for t in trials]
    return ", ".join(
        f"{kinds.count(k)} {k}" for k in ("permutation", "pairwise", "reference") if k in kinds
    )


# ---------------------------------------------------------------------------- summary


def latency_panel(
    paths: dict[str, Path], spec: Any, *, rounds: int = 10, progress: bool = True
) -> dict[str, dict[str, float]]:
    """Batch-1 latency (ms) of every artifact, timed here in interleaved rounds, one call at
    a time, on the recipe's primary runtime and threads."""
    import onnx

    from pqd.measurement.latency import compare_latency
    from pqd.measurement.runtime import open_runner

    if not paths:
        return {}
    runtime = spec.runtimes[0]
    dims = onnx.load(str(next(iter(paths.values())))).graph.input[0].type.tensor_type.shape.dim
    shape = (1, *(int(d.dim_value) for d in dims[1:]))
    runners = {name: open_runner(runtime, p, spec.threads, batch=1) for name, p in paths.items()}
    stats = compare_latency(
        {name: r.run for name, r in runners.items()},
        shape,
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
    _say(f"latency panel: {len(records)} artifacts, batch 1, interleaved rounds")
    mspec = measure_spec(recipe)
    panel = latency_panel(
        {k: out / unique[k].folder / "final.onnx" for k in records}, mspec, progress=progress
    )
    base_p50 = panel[base.key]["p50"]
    from pqd.record import load_predictions

    correct: dict[str, np.ndarray] = {}
    for key in records:
        preds = load_predictions(out / unique[key].folder)
        if preds is not None:
            correct[key] = preds["final"] == preds["labels"]
    base_entry = _trial_result(base, records[base.key], None, panel, base_p50)
    base_entry["source"] = records[base.key]["baseline"]["source"]
    entries = [
        _trial_result(t, records.get(t.key), errors.get(t.key), panel, base_p50) for t in trials
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
    base_p50 = base_entry["latency_ms"]["p50"]
    groups_by_id: dict[str, list[dict[str, Any]]] = {}
    for e in [base_entry, *entries]:
        groups_by_id.setdefault(e["group"], []).append(e)
    correct = correct or {}
    groups = [_aggregate(es, data.get("test", 0)) for es in groups_by_id.values()]
    for g in groups:
        g["speedup_vs_baseline"] = (
            round(base_p50 / g["latency_p50_ms"], 3) if g.get("latency_p50_ms") else None
        )

    # ---- Pareto set over every measured group (baseline, orders, pairs, references)
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

    # ---- ranking of the permutations by the criterion
    perms = sorted(
        (g for g in groups if g["kind"] == "permutation" and g["n"]),
        key=lambda g: (-g["accuracy_mean"], g["latency_p50_ms"]),
    )
    _rank_against_best(perms, groups_by_id, correct, spec)

    names = [s.stage for s in recipe.stages]
    n = len(names)
    total, budget = search_budget(recipe)
    alloc = allocate_epochs(total, budget)
    by_id = {g["id"]: g for g in groups}
    pairwise = None
    if spec.mode in ("pairwise", "both"):
        pairwise = _pairwise(names, by_id, groups_by_id, correct, spec)
        pairwise.update(
            runs=n * (n - 1) * len(spec.seeds),
            epochs=n * (n - 1) * len(spec.seeds) * sum(alloc[:2]),
        )
    best = perms[0] if perms else None
    versus = []
    if best is not None:
        for g in groups:
            if g["kind"] == "reference" and g["n"]:
                versus.append(
                    {
                        "reference": g["id"],
                        "accuracy_points": round(
                            100 * (best["accuracy_mean"] - g["accuracy_mean"]), 2
                        ),
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
    kinds = [e["kind"] for e in entries]
    seeds = len(spec.seeds)
    env = environment(recipe.measure.threads)
    return {
        "search_version": SEARCH_VERSION,
        "pqd_version": __version__,
        "name": recipe.name,
        "recipe": recipe.model_dump(mode="json"),
        "stages": names,
        "criterion": {
            "metric": spec.criterion,
            "alpha": spec.alpha,
            "min_effect_points": spec.min_effect_points,
            "tie_latency": spec.tie_latency,
            "text": (
                "higher test top-1 wins when the paired comparison on the same test images "
                f"is significant at {spec.alpha:g} (exact McNemar pooled over seeds, Holm's "
                "correction over the pairs; where seeds spread more than the images explain, "
                "the per-seed t-interval must exclude 0 too)"
                + (
                    f" and at least {spec.min_effect_points:g} points"
                    if spec.min_effect_points
                    else ""
                )
                + "; otherwise batch-1 p50 latency lower by more than "
                f"{100 * spec.tie_latency:g}% wins; else the pair ties"
            ),
        },
        "allocation": {
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
        },
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
        "runs": {
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
        },
        "latency_panel": panel,
        "environment": env,
    }


def _rank_against_best(
    perms: list[dict[str, Any]],
    entries: dict[str, list[dict[str, Any]]],
    correct: dict[str, np.ndarray],
    spec: Any,
) -> None:
    """Rank the full orders (sorted best first) and mark those the best does not beat:
    paired comparisons of the best against each other order, Holm over them."""
    if not perms:
        return
    best = perms[0]
    others = [(g, paired_groups(entries[best["id"]], entries[g["id"]], correct)) for g in perms[1:]]
    adjusted = holm_adjusted([c for _, c in others])
    best.update(rank=1, tied_with_best=True)
    for rank, ((g, c), p_adj) in enumerate(zip(others, adjusted, strict=True), 2):
        g["rank"] = rank
        if c is None or p_adj is None:
            g["tied_with_best"] = True
            continue
        g["vs_best"] = {**c, "p_holm": round(p_adj, 6)}
        g["tied_with_best"] = decide(c, p_adj, spec.alpha, spec.min_effect_points / 100.0) != "a"


def _pairwise(
    names: list[str],
    groups: dict[str, dict[str, Any]],
    entries: dict[str, list[dict[str, Any]]],
    correct: dict[str, np.ndarray],
    spec: Any,
) -> dict[str, Any]:
    """The pairwise table, the win graph's edges, and the topological order or the cycle."""
    pairs = list(itertools.combinations(names, 2))
    comparisons = [
        paired_groups(
            entries.get(f"pairwise:{a}>{b}", []), entries.get(f"pairwise:{b}>{a}", []), correct
        )
        for a, b in pairs
    ]
    adjusted = holm_adjusted(comparisons)
    rows, edges, ties = [], [], []
    for (a, b), comp, p_adj in zip(pairs, comparisons, adjusted, strict=True):
        ab, ba = groups.get(f"pairwise:{a}>{b}", {}), groups.get(f"pairwise:{b}>{a}", {})
        winner, why = decide_pair(
            bool(ab.get("n")),
            bool(ba.get("n")),
            comp,
            p_adj,
            ab.get("latency_p50_ms"),
            ba.get("latency_p50_ms"),
            spec,
        )
        first = {"ab": a, "ba": b, None: None}[winner]
        if first is not None:
            edges.append([first, b if first == a else a])
        else:
            ties.append([a, b])
        rows.append(
            {
                "a": a,
                "b": b,
                "ab_accuracy": ab.get("accuracy_mean"),
                "ba_accuracy": ba.get("accuracy_mean"),
                "ab_accuracy_std": ab.get("accuracy_std"),
                "ba_accuracy_std": ba.get("accuracy_std"),
                "ab_p50_ms": ab.get("latency_p50_ms"),
                "ba_p50_ms": ba.get("latency_p50_ms"),
                "first": first,
                "decided_by": why,
                "margin_points": (
                    round(100 * (ab["accuracy_mean"] - ba["accuracy_mean"]), 2)
                    if ab.get("n") and ba.get("n")
                    else None
                ),
                "paired": None if comp is None else {**comp, "p_holm": round(p_adj or 1.0, 6)},
            }
        )
    topo = topological_order(names, [tuple(e) for e in edges])
    return {
        "table": rows,
        "edges": edges,
        "ties": ties,
        **topo,
        "edge_meaning": "an edge [a, b] means running a before b won (a->b beat b->a)",
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


def search_plan_text(recipe: Recipe) -> str:
    """One line for ``pqd validate``: how many runs the search makes, with which epochs."""
    spec = recipe.search
    assert spec is not None
    total, budget = search_budget(recipe)
    n = len(recipe.stages)
    alloc = allocate_epochs(total, budget)
    perms = math.factorial(n) if spec.mode != "pairwise" else 0
    pairs = n * (n - 1) if spec.mode != "permutations" else 0
    if perms and n == 2:
        pairs = 0  # with two stages the pairwise runs are the permutation runs
    per_seed = perms + pairs + (n if spec.references else 0)
    pairwise = f", pairwise runs {'/'.join(map(str, alloc[:2]))}" if pairs else ""
    return (
        f"search: {spec.mode}, {per_seed * len(spec.seeds)} runs + 1 baseline "
        f"({len(spec.seeds)} seed(s)); epochs per position {'/'.join(map(str, alloc))} of "
        f"{total}{pairwise}"
    )
