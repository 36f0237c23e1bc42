"""Run a multi-exit network's deployed files (:mod:`pqd.exits.export`) on onnxruntime or
OpenVINO, stopping at the first confident exit.

:class:`ExitRuntime` runs ``exits.onnx`` at batch 1 (one call per image) and otherwise the
part files in turn (fused exit files where written); larger batches are split as inputs
leave. :func:`all_exit_outputs` runs every exit on a whole split, what the thresholds are
calibrated and checked on.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from pqd.exits.export import MANIFEST_FORMAT, thresholds_of
from pqd.measurement.runtime import open_runner
from pqd.progress import bar


class ExitRuntime:
    """Run a manifest's files segment by segment, stopping at the first confident exit.

    ``thresholds`` overrides the manifest's (a threshold above 1 never exits: that head is
    not run at all); ``batch`` fixes the batch (OpenVINO compiles it static); ``fused``
    runs each exit's segment and head as one call (``exit_k.onnx``; the same graph).
    onnxruntime sessions are opened with ``spinning`` (default off: each session has its
    own busy-waiting workers, and several sessions called in turn fight over the cores).

        rt = ExitRuntime("runs/ee/exits/manifest.json")
        logits, exit_index = rt.run(x)        # x: float32 [N,C,H,W] in [0,1]
    """

    def __init__(
        self,
        manifest: str | Path,
        runtime: str = "onnxruntime",
        threads: int = 2,
        thresholds: Sequence[float] | None = None,
        batch: int | None = None,
        fused: bool = True,
        spinning: bool = False,
        graph: bool = True,
    ) -> None:
        path = Path(manifest)
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"{path}: not a pqd early-exit manifest")
        folder = path.parent
        self.runtime = runtime
        self.segments = [
            open_runner(runtime, folder / s["file"], threads, batch, spinning=spinning).run
            for s in self.manifest["segments"]
        ]
        self.heads = [
            open_runner(
                runtime, folder / h["file"], threads, batch, all_outputs=True, spinning=spinning
            ).run
            for h in self.manifest["heads"]
        ]
        self.fused = (
            [
                open_runner(
                    runtime, folder / f["file"], threads, batch, all_outputs=True, spinning=spinning
                ).run
                for f in self.manifest["fused"]
            ]
            if fused and self.manifest.get("fused")
            else None
        )
        self.thresholds = list(thresholds_of(self.manifest) if thresholds is None else thresholds)
        if len(self.thresholds) != len(self.heads):
            raise ValueError(f"{len(self.heads)} exits need {len(self.heads)} thresholds")
        entry = self.manifest.get("graph")
        # exits.onnx: run_one's path while the thresholds are its own
        self.graph: Callable[[np.ndarray], np.ndarray] | None = None
        self.graph_thresholds = thresholds_of(entry) if entry else None
        if graph and entry:
            self.graph = open_runner(
                runtime, folder / entry["file"], threads, batch, all_outputs=True
            ).run  # one session: spinning as final

    @property
    def uses_graph(self) -> bool:
        """Whether :meth:`run_one` runs ``exits.onnx`` (opened, and written for these
        thresholds) rather than the part files."""
        return self.graph is not None and self.thresholds == self.graph_thresholds

    @property
    def num_exits(self) -> int:
        """Early exits (heads)."""
        return len(self.heads)

    def _exit(self, k: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Segment ``k`` then head ``k``: (features, logits, confidence)."""
        if self.fused is not None:
            feats, logits, conf = self.fused[k](x)
            return feats, logits, conf
        feats = self.segments[k](x)
        logits, conf = self.heads[k](feats)
        return feats, logits, conf

    def run_one(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        """Batch-1 fast path: (logits [1, classes], exit index; ``num_exits`` = final); one
        call of ``exits.onnx`` when the runtime has it, else the part files in turn."""
        graph = self.graph
        if graph is not None and self.uses_graph:  # (uses_graph implies an opened graph)
            logits, where = graph(x)
            return logits, int(where[0])
        return self.run_files(x)

    def run_files(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        """Batch 1 through the part files in turn (fused exit files where written)."""
        for k, t in enumerate(self.thresholds):
            if t > 1.0:  # never exits here: skip the head
                x = self.segments[k](x)
                continue
            x, logits, conf = self._exit(k, x)
            if conf[0] >= t:
                return logits, k
        return self.segments[-1](x), len(self.heads)

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Any batch: (logits [N, classes], exit index per input); confident inputs leave,
        the rest go on as a smaller batch."""
        if len(x) == 1:
            logits, k = self.run_one(x)
            return logits, np.array([k])
        n = len(x)
        out = np.empty((n, int(self.manifest["num_classes"])), np.float32)
        where = np.full(n, len(self.heads), np.int64)
        idx = np.arange(n)
        for k, t in enumerate(self.thresholds):
            if t > 1.0:
                x = self.segments[k](x)
                continue
            x, logits, conf = self._exit(k, x)
            done = conf >= t
            out[idx[done]] = logits[done]
            where[idx[done]] = k
            idx, x = idx[~done], x[~done]
            if not len(idx):
                return out, where
        out[idx] = self.segments[-1](x)
        return out, where

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.run(x)[0]

    def run_all(self, x: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Every exit on the whole batch: (logits per exit + final, confidence per exit)."""
        logits, confs = [], []
        for k in range(len(self.heads)):
            x, lg, conf = self._exit(k, x)
            logits.append(lg)
            confs.append(conf)
        logits.append(self.segments[-1](x))
        return logits, confs

    def run_segments(self, x: np.ndarray) -> np.ndarray:
        """The segments back to back without heads (exits disabled, one call per segment)."""
        for seg in self.segments:
            x = seg(x)
        return x


def all_exit_outputs(
    rt: ExitRuntime,
    x_uint8: torch.Tensor,
    batch_size: int = 256,
    desc: str = "exits",
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(logits [exits+1, N, classes], confidences [exits, N]) of uint8 images."""
    logits: list[list[np.ndarray]] = []
    confs: list[list[np.ndarray]] = []
    steps = range(0, len(x_uint8), batch_size)
    for i in bar(steps, desc=desc, unit="batch", show=progress, leave=False):
        x = x_uint8[i : i + batch_size].float().div_(255.0).numpy()
        lg, cf = rt.run_all(x)
        logits.append(lg)
        confs.append(cf)
    n_exits = rt.num_exits
    lg_all = np.stack([np.concatenate([b[k] for b in logits]) for k in range(n_exits + 1)])
    cf_all = (
        np.stack([np.concatenate([b[k] for b in confs]) for k in range(n_exits)])
        if n_exits
        else np.zeros((0, len(x_uint8)), np.float32)
    )
    return lg_all.astype(np.float32), cf_all.astype(np.float32)
