"""The executors that train trials (:mod:`pqd.runs`): in this process, in local worker
processes, or as Ray tasks; measuring stays on the driver, one run at a time.
"""

from __future__ import annotations

import contextlib
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
from pathlib import Path
from typing import Any

from pqd.errors import PqdError
from pqd.recipe import recipe_from_dict
from pqd.runs import Trial

EXECUTORS = ("sequential", "processes", "ray")


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
    recipe_data: dict[str, Any],
    data_dir: str | None,
    checkpoint: bytes | None,
    folder: bytes | None = None,
) -> dict[str, Any]:
    """Ray task: train one run in a temporary folder and return it as tar bytes, so the
    driver needs no file system shared with the cluster. The baseline checkpoint travels as
    bytes when the node does not hold the driver's path; ``folder`` (tar bytes) is what the
    run folder held when the task started: stages shared with another trial, or the steps
    and epochs of a stopped run, which the run continues after (the step fingerprints name
    the checkpoint by its bytes, so the moved file keeps them)."""
    import ray

    cpus = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1) or 1)
    tmp = Path(tempfile.mkdtemp(prefix="pqd-trial-"))
    try:
        if folder is not None:
            (tmp / "run").mkdir()
            _safe_extract(folder, tmp / "run")
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
            for name in ("pending.json", "recipe.yaml", "progress.json"):
                path = tmp / "run" / name
                if path.is_file():
                    path.write_text(
                        path.read_text(encoding="utf-8").replace(
                            json.dumps(local)[1:-1], json.dumps(original)[1:-1]
                        ),
                        encoding="utf-8",
                    )
            _rehash_progress(tmp / "run" / "progress.json")
        return {**result, "files": _pack(tmp / "run")}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _rehash_progress(path: Path) -> None:
    """Make a progress file's recipe hash that of its recipe again (after the checkpoint path
    in it went back to the driver's), so the driver reads it as its own run."""
    from pqd.fingerprint import sha

    if not path.is_file():
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict) and isinstance(data.get("recipe"), dict):
        data["recipe_sha256"] = sha(data["recipe"])
        path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def _swap_in(data: bytes, folder: Path) -> None:
    """Replace ``folder`` by the run folder a Ray task sent back (tar bytes), so the files the
    task removed (an epoch checkpoint, an old record) are gone here too: unpacked beside it,
    then renamed over it."""
    incoming = folder.with_name(folder.name + ".incoming")
    old = folder.with_name(folder.name + ".old")
    for stale in (incoming, old):
        shutil.rmtree(stale, ignore_errors=True)
    incoming.mkdir(parents=True)
    _safe_extract(data, incoming)
    if folder.exists():
        folder.rename(old)
    incoming.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def _pack(folder: Path) -> bytes:
    """A run folder as gzip tar bytes (what a Ray task receives and returns)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(folder, arcname=".")
    return buf.getvalue()


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
                "pip install -e '.[ray]' in pqd's checkout (or pip install ray), or use "
                "--workers N",
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
        ``starting(trial, folder)`` runs here just before a job starts (sequentially, each
        after the jobs before it finished; processes and Ray, as a slot takes it).
        ``order(trial, folder, running)`` (:meth:`Sharing.level`): the parallel executors
        give a free slot the first job at level 0 (start), else the first at level 1
        (later), and hold level-2 jobs (wait) back while the trials running now decide
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
            self._run_ray(jobs, done, starting, order)

    @staticmethod
    def _schedule(
        jobs: list[tuple[Trial, Path]],
        slots: Callable[[], int],
        submit: Callable[[Trial, Path], Any],
        wait_one: Callable[[list[Any]], tuple[Any, dict[str, Any]]],
        done: Callable[[Trial, Path, dict[str, Any]], None],
        starting: Callable[[Trial, Path], None] | None,
        order: Callable[[Trial, Path, list[Trial]], int] | None,
    ) -> None:
        """The loop of the parallel executors: up to ``slots()`` jobs at once, a free slot
        given to the queued job of the lowest ``order`` level (0 start, 1 later; 2 waits
        while a running trial decides it); ``submit`` starts one and returns its handle,
        ``wait_one(handles)`` returns a finished one's handle and result."""
        queue = list(jobs)
        running: dict[Any, tuple[Trial, Path]] = {}
        while queue or running:
            while queue and len(running) < slots():  # the next job by its level
                busy = [t for t, _ in running.values()]
                levels = [0 if order is None else order(t, f, busy) for t, f in queue]
                if min(levels) >= 2 and running:
                    break  # every job waits for a running one
                trial, folder = queue.pop(levels.index(min(levels)))
                if starting is not None:
                    starting(trial, folder)
                running[submit(trial, folder)] = (trial, folder)
            handle, result = wait_one(list(running))
            trial, folder = running.pop(handle)
            done(trial, folder, result)

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

        def submit(trial: Trial, folder: Path) -> Future[dict[str, Any]]:
            recipe = trial.recipe.model_dump(mode="json")
            return pool.submit(train_trial, recipe, str(folder), self.data_root, False, threads)

        def wait_one(futures: list[Future[dict[str, Any]]]) -> tuple[Any, dict[str, Any]]:
            fut = next(iter(wait(futures, return_when=FIRST_COMPLETED)[0]))
            return fut, fut.result()

        try:
            self._schedule(jobs, lambda: workers, submit, wait_one, done, starting, order)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()

    def _run_ray(
        self,
        jobs: list[tuple[Trial, Path]],
        done: Callable[[Trial, Path, dict[str, Any]], None],
        starting: Callable[[Trial, Path], None] | None,
        order: Callable[[Trial, Path, list[Trial]], int] | None,
    ) -> None:
        """As the processes, with as many trials at once as the cluster has GPUs (or CPUs),
        asked again as each slot frees (nodes may join): each task receives its run
        folder's files (stages shared with another trial) and returns the whole folder,
        which replaces it here before ``done``."""
        import ray

        task = ray.remote(_ray_train_trial).options(
            num_cpus=1, num_gpus=1 if self.ray_gpus >= 1 else 0, max_retries=1
        )

        def slots() -> int:
            resources = ray.cluster_resources()
            return max(1, int(resources.get("GPU" if self.ray_gpus >= 1 else "CPU", 1)))

        blobs: dict[str, Any] = {}
        folders: dict[Any, Path] = {}

        def submit(trial: Trial, folder: Path) -> Any:
            ckpt = trial.recipe.baseline.checkpoint
            if ckpt and ckpt not in blobs:
                blobs[ckpt] = ray.put(Path(ckpt).read_bytes())
            begun = folder.is_dir() and any(folder.iterdir())
            ref = task.remote(
                trial.recipe.model_dump(mode="json"),
                self.data_root,
                blobs.get(ckpt) if ckpt else None,
                _pack(folder) if begun else None,
            )
            folders[ref] = folder
            return ref

        def wait_one(refs: list[Any]) -> tuple[Any, dict[str, Any]]:
            ready, _ = ray.wait(refs, num_returns=1)
            result = ray.get(ready[0])
            # the task had every file of the folder: what it removed goes here too
            _swap_in(result.pop("files"), folders.pop(ready[0]))
            return ready[0], result

        try:
            self._schedule(jobs, slots, submit, wait_one, done, starting, order)
        except BaseException:
            for ref in folders:
                ray.cancel(ref, force=True)
            raise
