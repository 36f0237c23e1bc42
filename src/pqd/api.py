"""The Python API: compress any ``nn.Module`` on data in memory (see ``import pqd``).

    import pqd
    data = pqd.data.from_tensors(train=(x, y), val=(xv, yv), test=(xt, yt))
    result = pqd.compress(model, data, stages=[pqd.Prune(sparsity=0.5, epochs=2),
                                               pqd.Quantize(epochs=1), pqd.Distill(epochs=1)],
                          out="runs/nb")
    result.record["final"]["latency_ms"], result.final_onnx

:func:`compress` is ``pqd run`` with the model and data given instead of named: the same
run folder (``record.json``, ``final.onnx``, ``report.md``, checkpoints; a killed call
continues when called again), through the same stage loop (:func:`pqd.apply_stages`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from pqd.recipe import (
    BaselineSpec,
    DataSpec,
    ExportSpec,
    MeasureSpec,
    ModelSpec,
    Recipe,
    TrainOverride,
    TrainSpec,
)


@dataclass
class CompressResult:
    """What :func:`compress` returns.

    Attributes:
        record: the run's record (``record.json``: accuracy, size, latency of baseline and
            final artifact, per-stage entries).
        run_dir: the run folder.
        final_onnx: the deployable file (INT8 when a quantize stage ran).
        baseline_onnx: the FP32 file of the input model.
    """

    record: dict[str, Any]
    run_dir: Path
    final_onnx: Path
    baseline_onnx: Path


def _digest(model: nn.Module, data: Any) -> str:
    """What the run folder's fingerprints cannot see: the given weights and data."""
    h = hashlib.sha256(repr(model).encode())
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    for split in ("train", "val", "test"):
        for t in (getattr(data, f"{split}_x"), getattr(data, f"{split}_y")):
            for s in range(0, max(1, int(t.shape[0])), 4096):  # chunks: memory-mapped data
                h.update(t[s : s + 4096].contiguous().numpy().tobytes())
    h.update(repr((data.mean, data.std)).encode())
    return h.hexdigest()[:16]


def wrap(model: nn.Module, data: Any) -> nn.Module:
    """``model`` with the data's normalisation in front (a :class:`pqd.models.Classifier`),
    or ``model`` itself when the normalisation is the identity or already inside it."""
    from pqd.models import Classifier

    identity = all(m == 0.0 for m in data.mean) and all(s == 1.0 for s in data.std)
    if identity or isinstance(model, Classifier):
        return model
    return Classifier(model, data.mean, data.std)


def compress(
    model: nn.Module,
    data: Any,
    stages: Sequence[Any],
    out: str | Path,
    *,
    train: TrainSpec | dict[str, Any] | None = None,
    baseline_epochs: int = 0,
    seed: int = 0,
    device: str = "cpu",
    export: ExportSpec | dict[str, Any] | None = None,
    measure: MeasureSpec | dict[str, Any] | None = None,
    name: str = "compress",
    progress: bool = False,
    fresh: bool = False,
) -> CompressResult:
    """Compress ``model`` with ``stages`` in order, export it to ONNX and measure it, as
    ``pqd run`` does: writes the run folder ``out`` and returns its record.

    Args:
        model: any ``nn.Module`` classifying float NCHW images (in [0, 1], normalised by
            ``data.mean``/``data.std``, which go inside the model and the file); not changed.
        data: a ``pqd.data.Dataset`` (:func:`pqd.data.from_tensors`) with a test split;
            a torch ``Dataset`` of (image, label) pairs is taken as the train split.
        stages: ``pqd.Prune(...)``, ``pqd.PruneChannels(...)``, ``pqd.Quantize(...)``,
            ``pqd.Distill(...)``, ``pqd.EarlyExit(...)`` (or their recipe dicts).
        out: the run folder (created; a killed call continues when called again with the
            same model, data and settings; another call's run there is refused).
        train: training settings every stage starts from (recipe ``train``).
        baseline_epochs: train ``model`` first for this many epochs (0: take it as given).
        seed: the run's seed.
        device: ``cpu``, ``cuda`` or ``auto``.
        export: export settings (recipe ``export``: opset, deployment target, ...).
        measure: measurement settings (recipe ``measure``: runtimes, threads, batch sizes).
        name: the run's name in the record.
        progress: show progress bars.
        fresh: start over in ``out`` (remove an earlier run's files there).

    Returns:
        :class:`CompressResult` (``record``, ``run_dir``, ``final_onnx``, ``baseline_onnx``).
    """
    from pqd.data import from_tensors
    from pqd.engine import as_specs, fresh_copies
    from pqd.errors import DataError
    from pqd.pipeline import execute
    from pqd.resume import RunFolder

    if isinstance(data, torch.utils.data.Dataset):
        data = from_tensors(train=data)
    if len(data.test_y) == 0:
        raise DataError(
            "pqd.compress measures the test split, which is empty",
            "pass test=(images, labels) to pqd.data.from_tensors",
        )
    net = wrap(model, data)
    train_spec = train if isinstance(train, TrainSpec) else TrainSpec(**(train or {}))
    baseline_spec = (
        BaselineSpec(epochs=baseline_epochs)
        if baseline_epochs > 0
        else BaselineSpec.model_construct(checkpoint=None, epochs=0, train=TrainOverride())
    )
    kind = type(model)
    recipe = Recipe.model_construct(
        name=name,
        seed=seed,
        device=device,
        model=ModelSpec(
            name=f"python:{kind.__module__}.{kind.__qualname__}",
            kwargs={"given_sha256": _digest(net, data)},
        ),
        data=DataSpec.model_construct(
            dataset=data.name,
            root=None,
            image_size=data.image_size,
            val_size=len(data.val_y),
            test_size=len(data.test_y),
            on_bad_image=data.info.get("on_bad_image", "error"),
            download=False,
            augment=DataSpec().augment,
            limit_train=None,
            limit_test=None,
        ),
        train=train_spec,
        baseline=baseline_spec,
        stages=as_specs(stages),
        export=export if isinstance(export, ExportSpec) else ExportSpec(**(export or {})),
        measure=measure if isinstance(measure, MeasureSpec) else MeasureSpec(**(measure or {})),
        search=None,
    )
    out_dir = Path(out)
    folder = RunFolder.open(out_dir, recipe, fresh=fresh)
    if folder.complete:
        import json

        record = json.loads((out_dir / "record.json").read_text(encoding="utf-8"))
    else:
        from pqd.pipeline import check_runtimes

        check_runtimes(recipe)
        template = fresh_copies(net)
        record = execute(
            recipe,
            folder,
            data,
            lambda: _copy(net),
            template,
            progress=progress,
            fresh=fresh,
            source=None if baseline_epochs > 0 else {"given": "the model passed to pqd.compress"},
        )
    return CompressResult(
        record=record,
        run_dir=out_dir,
        final_onnx=out_dir / "final.onnx",
        baseline_onnx=out_dir / "baseline.onnx",
    )


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)
