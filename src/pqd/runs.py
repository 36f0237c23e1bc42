"""Trials as run folders, and the executors that train them: what ``pqd search`` and
``pqd plan`` share.

A trial is an ordinary, fully resolved recipe keyed by a hash of what decides its result
(:func:`trial_key`); its folder is ``done``, ``trained``, ``partial`` (stopped while
training: it continues) or ``missing`` (:func:`folder_status`). An :class:`Executor` trains
trials in this process, in local worker processes, or as Ray tasks; measuring stays on the
driver, one run at a time.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import socket
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pqd.errors import PqdError
from pqd.recipe import Recipe, recipe_from_dict, stable_dump

KEY_VERSION = 1  # bump when a change makes old trial folders unusable
EXECUTORS = ("sequential", "processes", "ray")
TRIAL_FILE = "trial.json"
TRIALS_FILE = "trials.json"  # in a search folder: the current recipe's trial folders


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


def search_progress(out: Path) -> str | None:
    """How far the search in ``out`` has come, in words (``pqd report`` before search.json
    exists): its trials by state, and where each stopped one continues
    (:func:`pqd.resume.unfinished_text`).

    Args:
        out: a ``pqd search`` folder.

    Returns:
        None when ``out`` holds no search (no baseline or trial folders).
    """
    from pqd.resume import unfinished_text

    if not (out / "baseline" / TRIAL_FILE).is_file():
        return None
    base = folder_status(out / "baseline", _key(out / "baseline"))
    if base != "done":
        stopped = unfinished_text(out / "baseline")
        return "the baseline is not finished" + (f" ({stopped})" if stopped else "")
    states: dict[str, int] = {}
    stopped_at = []
    try:  # the current recipe's trials (other recipes' trial folders are kept beside them)
        listed = json.loads((out / TRIALS_FILE).read_text(encoding="utf-8"))
        folders = [out / str(t["folder"]) for t in listed]
    except (OSError, ValueError, KeyError, TypeError):
        folders = [t.parent for t in sorted((out / "trials").glob(f"*/{TRIAL_FILE}"))]
    for folder in folders:
        state = folder_status(folder, _key(folder))
        if state not in ("done", "trained") and (folder / "failed.json").is_file():
            state = "failed"  # (in the last invocation; a re-run tries it again)
        states[state] = states.get(state, 0) + 1
        text = unfinished_text(folder) if state == "partial" else None
        if text and "stopped after" in text:
            stopped_at.append(f"{folder.name}: {text}")
    words = {
        "done": "done",
        "trained": "trained (awaiting measurement)",
        "partial": "begun",
        "missing": "not begun",
        "failed": "failed",
    }
    counts = ", ".join(f"{states[k]} {w}" for k, w in words.items() if states.get(k))
    total = sum(states.values())
    return f"{states.get('done', 0)} of {total} trials done ({counts})" + "".join(
        f"; {t}" for t in stopped_at
    )


def _key(folder: Path) -> str:
    try:
        return str(json.loads((folder / TRIAL_FILE).read_text(encoding="utf-8")).get("key"))
    except (OSError, ValueError, AttributeError):
        return ""


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


def reset_folder(folder: Path, trial: Trial) -> None:
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


def start_from_siblings(folder: Path, trial: Trial, siblings: list[Path]) -> list[str]:
    """Start a fresh trial folder from the most finished stages another trial shares with
    it (:func:`pqd.resume.shared_steps`): a pairwise run A->B is the first two stages of the
    permutation A->B->C, with the same seeds, so it is not trained twice; at least one stage
    must be shared (the baseline alone is only loaded).

    Args:
        folder: the trial's folder, just reset (holding no progress).
        trial: the trial.
        siblings: the other trials' folders of the same search.

    Returns:
        The names of the steps taken over (empty: none was shared).
    """
    from pqd.resume import PROGRESS, RunFolder, shared_steps

    if (folder / PROGRESS).exists():
        return []  # begun already: it continues on its own
    best: tuple[Path, list[dict[str, Any]]] | None = None
    for sibling in siblings:
        steps = shared_steps(sibling, trial.recipe)
        if len(steps) >= 2 and (best is None or len(steps) > len(best[1])):
            best = sibling, steps
    if best is None:
        return []
    try:
        RunFolder.adopt(folder, trial.recipe, *best)
    except OSError:  # (a full disk): the trial trains those stages itself
        reset_folder(folder, trial)
        return []
    return [str(e["step"]) for e in best[1]]


class Sharing:
    """Which trial a free worker of the process executor takes next, so that trials share
    stages (:func:`start_from_siblings`) without workers sitting idle: one per search run
    (it caches each trial's step fingerprints by key).

    Args:
        finished: trials whose folders hold their finished steps (appended to as trials
            finish).
    """

    START, LATER, WAIT = 0, 1, 2

    def __init__(self, finished: list[Trial]) -> None:
        self.finished = finished
        self._prints: dict[str, list[str]] = {}

    def prints(self, trial: Trial) -> list[str]:
        """The trial's step fingerprints (:func:`pqd.fingerprint.fingerprints`)."""
        from pqd.fingerprint import fingerprints

        if trial.key not in self._prints:
            self._prints[trial.key] = fingerprints(trial.recipe)
        return self._prints[trial.key]

    def shared(self, a: Trial, b: Trial) -> int:
        """How many leading steps (the baseline, then stages) ``a`` and ``b`` compute the
        same: 0 when even the baselines differ, 2 or more when a stage is shared."""
        n = 0
        for x, y in zip(self.prints(a), self.prints(b), strict=False):
            if x != y:
                break
            n += 1
        return n

    def level(self, trial: Trial, folder: Path, running: list[Trial]) -> int:
        """``WAIT``: a running trial trains every step of ``trial`` (a pairwise run A->B
        while A->B->C trains): it takes them over once that one finishes. ``LATER``: a
        running trial trains some of its stages that no finished one offers: started only
        when no ``START`` trial is left for a free worker. ``START`` otherwise, and always
        for a trial begun before (its folder has progress)."""
        from pqd.resume import PROGRESS

        if (folder / PROGRESS).exists():
            return self.START
        offered = max((self.shared(trial, t) for t in self.finished), default=0)
        best = max((self.shared(trial, t) for t in running), default=0)
        if best < max(2, offered + 1):
            return self.START
        return self.WAIT if best == len(self.prints(trial)) else self.LATER


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


class Executor:
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

    def __enter__(self) -> Executor:
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
        starting: Callable[[Trial, Path], None] | None = None,
        order: Callable[[Trial, Path, list[Trial]], int] | None = None,
    ) -> None:
        """Train every job; ``done(trial, folder, result)`` runs here as each one finishes.
        ``local_first``: run in this process even for the process executor (the baseline).
        ``starting(trial, folder)`` runs here just before a job starts (local executors:
        sequentially, each after the jobs before it finished; processes, as a worker takes
        it). ``order(trial, folder, running)`` (:meth:`Sharing.level`): the process executor
        gives a free worker the first job at level 0 (start), else the first at level 1
        (later), and holds level-2 jobs (wait) back while the trials running now decide
        it."""
        if not jobs:
            return
        if self.kind == "sequential" or (local_first and self.kind == "processes"):
            for trial, folder in jobs:
                if starting is not None:
                    starting(trial, folder)
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
            self._run_processes(jobs, done, starting, order)
        else:
            self._run_ray(jobs, done)

    def _run_processes(
        self,
        jobs: list[tuple[Trial, Path]],
        done: Callable[[Trial, Path, dict[str, Any]], None],
        starting: Callable[[Trial, Path], None] | None,
        order: Callable[[Trial, Path, list[Trial]], int] | None,
    ) -> None:
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait

        workers = min(self.workers, len(jobs))
        threads = max(1, (os.cpu_count() or 1) // workers)
        pool = ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context("spawn")
        )
        queue = list(jobs)
        running: dict[Future[dict[str, Any]], tuple[Trial, Path]] = {}
        try:
            while queue or running:
                while queue and len(running) < workers:  # the next job by its level
                    busy = [t for t, _ in running.values()]
                    levels = [0 if order is None else order(t, f, busy) for t, f in queue]
                    if min(levels) >= 2 and running:
                        break  # every job waits for a running one
                    job = queue[levels.index(min(levels))]
                    queue.remove(job)
                    trial, folder = job
                    if starting is not None:
                        starting(trial, folder)
                    fut = pool.submit(
                        train_trial,
                        trial.recipe.model_dump(mode="json"),
                        str(folder),
                        self.data_root,
                        False,
                        threads,
                    )
                    running[fut] = job
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in finished:
                    trial, folder = running.pop(fut)
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
