"""The Python API: compress any ``nn.Module`` on data in memory (see ``import pqd``).

    import pqd
    result = pqd.compress(model, {"train": train_loader, "test": test_loader},
                          stages=[pqd.Prune(sparsity=0.5, epochs=2),
                                  pqd.Quantize(mode="ptq"), pqd.Distill(epochs=1)])
    result.model.eval()(images)            # the torch module final.onnx reproduces
    result.record["final"]["accuracy"], result.final_onnx

:func:`compress` is ``pqd run`` with the model and data given instead of named: the same
run folder (``record.json``, ``final.onnx``, ``report.md``, checkpoints; a killed call
continues when called again, a finished one is returned as it is), through the same stage
loop (:func:`pqd.apply_stages`). A model handed in is fine-tuned (:data:`FINE_TUNE`), not
trained from scratch.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from pqd.dataset import Dataset
    from pqd.resume import RunFolder
    from pqd.state import State

FINE_TUNE: dict[str, Any] = {"lr": 0.01, "schedule": "cosine", "warmup": 0.0}
"""What :func:`compress` changes in ``TrainSpec()`` for a model handed in (taken as trained,
``baseline_epochs=0``): a tenth of the from-scratch learning rate, cosine decay, no warmup.
A ``train`` argument overrides single fields (a dict) or all of them (a ``TrainSpec``)."""


class CompressResult:
    """What :func:`compress` returns.

    Attributes:
        record: the run's record (``record.json``: accuracy with its 95% interval, size,
            latency of baseline and final file, per-stage entries, paired comparison).
        run_dir: the run folder.
        data: the ``pqd.data.Dataset`` the run used (``pqd.measure(result.final_onnx,
            result.data)`` measures on the same test images).
        final_onnx: the deployable file (INT8 when a quantize stage ran; it takes images
            in [0, 1] and normalises inside).
        baseline_onnx: the FP32 file of the input model.
        state: the :class:`pqd.State` the stages left (``state.model`` is a PT2E graph once
            a quantize stage ran), loaded from the run folder on first use.
        model: the torch module ``final.onnx`` reproduces (:class:`pqd.artifact.Deployed`:
            INT8-converted after a quantize stage; ``.eval()`` works), on first use; it
            takes inputs as the model handed in did (normalised, where ``mean``/``std`` were
            given with the data).
    """

    def __init__(
        self,
        record: dict[str, Any],
        run_dir: Path,
        data: Dataset,
        load_state: Callable[[], Any],
        normalized: bool,
    ) -> None:
        self.record = record
        self.run_dir = run_dir
        self.data = data
        self.final_onnx = run_dir / "final.onnx"
        self.baseline_onnx = run_dir / "baseline.onnx"
        self._load_state = load_state
        self._normalized = normalized

    @cached_property
    def state(self) -> Any:
        from pqd._quiet import quiet

        with quiet():
            return self._load_state()

    @cached_property
    def model(self) -> Any:
        from pqd.artifact import torch_model

        if self._normalized:  # takes inputs as the model handed in took them
            return torch_model(self.state, mean=self.data.mean, std=self.data.std)
        return torch_model(self.state)

    def __repr__(self) -> str:
        final = self.record.get("final", {})
        return (
            f"CompressResult(run_dir={str(self.run_dir)!r}, accuracy="
            f"{final.get('accuracy')}, size_bytes={final.get('size_bytes')})"
        )


def _weights_digest(model: nn.Module) -> str:
    """The given model's architecture and weights (the run folder's fingerprints cannot see
    them)."""
    h = hashlib.sha256(repr(model).encode())
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _data_digest(data: Dataset) -> str:
    """The given images, labels and normalisation."""
    h = hashlib.sha256()
    for split in ("train", "val", "test"):
        for t in (getattr(data, f"{split}_x"), getattr(data, f"{split}_y")):
            for s in range(0, max(1, int(t.shape[0])), 4096):  # chunks: memory-mapped data
                h.update(t[s : s + 4096].contiguous().numpy().tobytes())
    h.update(repr((data.mean, data.std)).encode())
    return h.hexdigest()[:16]


def train_settings(train: TrainSpec | dict[str, Any] | None, given: bool) -> TrainSpec:
    """The run's training settings: ``train`` as a spec, or its fields over the defaults
    (:data:`FINE_TUNE` over ``TrainSpec()`` for a model handed in, ``given``)."""
    if isinstance(train, TrainSpec):
        return train
    return TrainSpec(**{**(FINE_TUNE if given else {}), **(train or {})})


def compress(
    model: nn.Module,
    data: Any,
    stages: Sequence[Any],
    out: str | Path | None = None,
    *,
    train: TrainSpec | dict[str, Any] | None = None,
    baseline_epochs: int = 0,
    seed: int = 0,
    device: str | torch.device = "cpu",
    export: ExportSpec | dict[str, Any] | None = None,
    measure: MeasureSpec | dict[str, Any] | None = None,
    forward_loop: Callable[[nn.Module], None] | None = None,
    name: str = "compress",
    progress: bool = False,
    fresh: bool = False,
) -> CompressResult:
    """Compress ``model`` with ``stages`` in order, export it to ONNX and measure it, as
    ``pqd run`` does: writes the run folder ``out`` and returns its record and model.

    Args:
        model: any ``nn.Module`` classifying float NCHW images (as ``data`` holds them; a
            normalisation ``mean``/``std`` goes inside the model and the file); not changed.
        data: a ``pqd.data.Dataset``; or ``{"train": ..., "val": ..., "test": ...}`` with
            each split as ``(images, labels)`` tensors (uint8, float in [0, 1], or float
            normalised: add ``"mean"``/``"std"``), a torch ``Dataset`` or a ``DataLoader``
            (:func:`pqd.data.from_tensors`). The test split is required (it is measured);
            without ``val``, a tenth of ``train`` is held out.
        stages: ``pqd.Prune(...)``, ``pqd.PruneChannels(...)``, ``pqd.Quantize(...)``,
            ``pqd.Distill(...)``, ``pqd.EarlyExit(...)`` (or their recipe dicts).
        out: the run folder (created). None: a folder under the temporary directory named
            after the inputs, so calling again with the same inputs returns the finished
            run. A killed call continues when called again; another call's run in ``out``
            is refused with what differs.
        train: training settings every stage starts from (recipe ``train``): a
            ``TrainSpec``, or a dict of fields over the defaults (:data:`FINE_TUNE` for a
            model taken as trained, ``TrainSpec()`` with ``baseline_epochs``).
        baseline_epochs: train ``model`` first for this many epochs (0: take it as given).
        seed: the run's seed.
        device: ``"cpu"``, ``"cuda"``, ``"auto"`` or a ``torch.device``.
        export: export settings (recipe ``export``: opset, deployment target, ...).
        measure: measurement settings (recipe ``measure``: runtimes, threads, batch sizes).
        forward_loop: for PTQ/QAT calibration, ``forward_loop(model)`` runs the model on
            batches of your choice (as your model takes them) instead of pqd's validation
            batches; it is not part of the run folder's fingerprint.
        name: the run's name in the record.
        progress: show progress bars.
        fresh: start over in ``out`` (remove an earlier run's files there).

    Returns:
        :class:`CompressResult` (``record``, ``model``, ``state``, ``final_onnx``,
        ``baseline_onnx``, ``run_dir``).
    """
    from pqd._quiet import quiet
    from pqd.data import as_dataset
    from pqd.engine import fresh_copies, wrap
    from pqd.errors import DataError
    from pqd.resume import RunFolder

    with quiet():
        data = as_dataset(data)
        if len(data.test_y) == 0:
            raise DataError(
                "pqd.compress measures the test split, which is empty",
                "pass data={'train': ..., 'test': (images, labels)} (or a DataLoader)",
            )
        net = wrap(model, data)
        if forward_loop is not None and net is not model:  # the user's loop feeds inputs
            forward_loop = _as_given(forward_loop, data.mean, data.std)  # as `model` takes
        recipe = _recipe_of(
            net,
            model,
            data,
            stages,
            name=name,
            seed=seed,
            device=str(device),
            train=train,
            baseline_epochs=baseline_epochs,
            export=export,
            measure=measure,
        )
        out_dir = Path(out) if out is not None else _default_out(recipe)
        folder = RunFolder.open(out_dir, recipe, fresh=fresh, api=True)
        template = fresh_copies(net)
        given = None if baseline_epochs > 0 else {"given": "the model passed to pqd.compress"}
        record = _run_or_load(
            recipe, folder, data, net, template, given, fresh, progress, forward_loop
        )
    shape = tuple(int(d) for d in data.train_x.shape[1:])
    return CompressResult(
        record,
        out_dir,
        data,
        lambda: final_state(out_dir, folder.steps, template, shape),
        normalized=net is not model,
    )


def _run_or_load(
    recipe: Recipe,
    folder: RunFolder,
    data: Dataset,
    net: nn.Module,
    template: Callable[[], nn.Module],
    source: dict[str, Any] | None,
    fresh: bool,
    progress: bool,
    forward_loop: Callable[[nn.Module], None] | None,
) -> dict[str, Any]:
    """The record of the run in ``folder``: read back when complete, else run (or
    continued) by :func:`pqd.pipeline.execute` from copies of ``net``."""
    from pqd.pipeline import check_runtimes, execute

    if folder.complete:
        return json.loads((folder.out / "record.json").read_text(encoding="utf-8"))
    check_runtimes(recipe)
    return execute(
        recipe,
        folder,
        data,
        lambda: _copy(net),
        template,
        progress=progress,
        fresh=fresh,
        source=source,
        forward_loop=forward_loop,
    )


def _recipe_of(
    net: nn.Module,
    model: nn.Module,
    data: Dataset,
    stages: Sequence[Any],
    *,
    name: str,
    seed: int,
    device: str,
    train: TrainSpec | dict[str, Any] | None,
    baseline_epochs: int,
    export: ExportSpec | dict[str, Any] | None,
    measure: MeasureSpec | dict[str, Any] | None,
) -> Recipe:
    """The recipe :func:`compress` runs (arguments as there): the model named by its class
    and keyed by its weights' and the data's digests, so the run folder knows them again."""
    from pqd.engine import as_specs

    kind = type(model)
    return Recipe.model_construct(
        name=name,
        seed=seed,
        device=device,
        model=ModelSpec(
            name=f"python:{kind.__module__}.{kind.__qualname__}",
            kwargs={"weights_sha256": _weights_digest(net), "data_sha256": _data_digest(data)},
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
        train=train_settings(train, given=baseline_epochs == 0),
        baseline=(
            BaselineSpec(epochs=baseline_epochs)
            if baseline_epochs > 0
            else BaselineSpec.model_construct(checkpoint=None, epochs=0, train=TrainOverride())
        ),
        stages=as_specs(stages),
        export=export if isinstance(export, ExportSpec) else ExportSpec(**(export or {})),
        measure=(measure if isinstance(measure, MeasureSpec) else MeasureSpec(**(measure or {}))),
        search=None,
    )


def _default_out(recipe: Recipe) -> Path:
    """The run folder of ``out=None``: the same inputs, the same folder."""
    return temp_folder(recipe.name, recipe.model_dump(mode="json"))


def temp_folder(name: str, inputs: Any) -> Path:
    """``<tmp>/pqd/<name>-<12 hex digits of the SHA-256 of inputs as sorted JSON>``."""
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / "pqd" / f"{name}-{key}"


def final_state(
    out: Path,
    steps: list[dict[str, Any]],
    fresh_model: Callable[[], nn.Module],
    shape: tuple[int, ...],
) -> State:
    """The state the run's last finished step left, loaded from its checkpoint.

    Args:
        out: the run folder.
        steps: its finished steps (``RunFolder.steps``: baseline first).
        fresh_model: builds fresh models like the run's.
        shape: one image's shape ``(C, H, W)`` (example inputs for rebuilding graphs).

    Returns:
        The :class:`pqd.State`.
    """
    from pqd.checkpoint import load_checkpoint
    from pqd.state import State
    from pqd.step_state import load_state

    if len(steps) <= 1:  # no stage: the baseline itself
        model = fresh_model()
        load_checkpoint(model, out / "baseline.safetensors")
        return State(model=model.eval())
    state = load_state(out / steps[-1]["checkpoint"], fresh_model, lambda: torch.rand(2, *shape))
    return state


def _as_given(
    loop: Callable[[nn.Module], None], mean: Sequence[float], std: Sequence[float]
) -> Callable[[nn.Module], None]:
    """``loop`` handed the wrapped model in the form the user's model had."""

    from pqd.models import Normalize

    def run(model: nn.Module) -> None:
        device = next(model.parameters(), torch.empty(0)).device
        loop(nn.Sequential(Normalize(mean, std, inverse=True).to(device), model))

    return run


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def plan(target: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """``pqd plan`` from Python: the most accurate candidate within a latency budget on
    this CPU (:mod:`pqd.planner`), for a recipe or for a model in memory.

    ``pqd.plan(recipe, latency_ms, out, **options)``: a ``Recipe`` or the path of its YAML
    file (:func:`pqd.planner.plan`). ``pqd.plan(model, data, latency_ms, out=None, *,
    stages=None, train=None, seed=0, **options)``: an ``nn.Module`` and its data
    (:func:`plan_model`).

    Returns:
        What ``plan.json`` holds (the pick under ``"pick"``).
    """
    from pqd.errors import PqdError

    try:
        if isinstance(target, nn.Module):
            return plan_model(target, *args, **kwargs)
        from pqd.planner import plan as plan_recipe

        return plan_recipe(target, *args, **kwargs)
    except PqdError as exc:  # the fix in this API's words, not the command's
        exc.fix = (exc.fix or "").replace("--latency-ms ", "latency_ms=")
        exc.problem = exc.problem.replace("--latency-ms ", "latency_ms=")
        exc.args = (exc.line(),)
        raise


def plan_model(
    model: nn.Module,
    data: Any,
    latency_ms: float,
    out: str | Path | None = None,
    *,
    stages: Sequence[Any] | None = None,
    train: TrainSpec | dict[str, Any] | None = None,
    seed: int = 0,
    name: str = "plan",
    **options: Any,
) -> dict[str, Any]:
    """Plan the channels (and precision) of a model in memory under ``latency_ms``: the same
    plan folder as ``pqd plan``, trained in this process.

    The model is taken as trained (fine-tuned with :data:`FINE_TUNE` over ``TrainSpec()``
    unless ``train`` says otherwise). Its data are written once to ``out/inputs/data.npz``
    (uint8 images, the train and validation splits together, the normalisation) and its
    weights to ``out/inputs/model.safetensors``; the plan's recipe names them, so it
    resumes, and its pick reruns, like any recipe's.

    Args:
        model: any ``nn.Module`` classifying images as ``data`` holds them (a normalisation
            ``mean``/``std`` goes in front of it); not changed.
        data: as :func:`compress` takes it; a test split is required (the pick is measured
            on it), the validation split (carved from train when absent) picks.
        latency_ms: the budget: batch-1 p50 of the exported file, in milliseconds.
        out: the plan folder; None: a folder under the temporary directory named after
            the inputs.
        stages: the stages every candidate runs after its channel pruning (default
            ``[pqd.Quantize()]``: INT8 QAT); a ``pqd.PruneChannels`` among them sets the
            pruning stage's own settings.
        train: training settings (a ``TrainSpec`` or a dict of fields over the defaults).
        seed: the plan's seed.
        name: the plan's name.
        **options: :func:`pqd.planner.plan`'s options (``k``, ``validate``, ``threads``,
            ``runtime``, ``size_mb``, ``progress``, ...); the executor is this process.

    Returns:
        What ``plan.json`` holds (the pick under ``"pick"``).
    """
    import copy

    from pqd._quiet import quiet
    from pqd.data import as_dataset
    from pqd.engine import as_specs
    from pqd.errors import DataError
    from pqd.models import Classifier
    from pqd.planner import plan as plan_recipe
    from pqd.recipe import QuantizeSpec, recipe_from_dict
    from pqd.registry import MODELS

    if "executor" in options and options["executor"] != "sequential":
        raise DataError(
            "a model in memory is planned in this process",
            "leave out executor= (or plan a recipe whose model pqd can build by name)",
        )
    options.pop("executor", None)
    with quiet():
        data = as_dataset(data)
        if not len(data.test_y) or not len(data.val_y):
            raise DataError(
                "pqd.plan needs a validation split (it picks) and a test split (it measures)",
                "pass data={'train': ..., 'test': ...} with val_size > 0 (or 'val': ...)",
            )
        inner = model.net if isinstance(model, Classifier) else model
        net = Classifier(inner, data.mean, data.std)  # what the recipe's model builds
        weights = _weights_digest(net)
        specs = as_specs(stages) if stages is not None else [QuantizeSpec()]
        settings = train_settings(train, given=True)
        inputs: list[Any] = [
            weights,
            _data_digest(data),
            [s.model_dump(mode="json") for s in specs],
        ]
        inputs += [settings.model_dump(mode="json"), seed, latency_ms]
        out_dir = Path(out) if out is not None else temp_folder(name, inputs)
        npz, ckpt = _write_inputs(out_dir / "inputs", data, net)
        model_name = f"given_{weights}"  # built in this process only, for this call
        MODELS[model_name] = lambda num_classes=None, **_: copy.deepcopy(inner)
        try:
            recipe = recipe_from_dict(
                {
                    "name": name,
                    "seed": seed,
                    "model": {"name": model_name},
                    "data": {"dataset": "npz", "root": str(npz), "val_size": len(data.val_y)},
                    "train": settings.model_dump(mode="json"),
                    "baseline": {"checkpoint": str(ckpt)},
                    "stages": [s.model_dump(mode="json") for s in specs],
                },
                "pqd.plan",
            )
            return plan_recipe(recipe, latency_ms, out_dir / "plan", **options)
        finally:
            MODELS.pop(model_name, None)


def _write_inputs(inputs: Path, data: Dataset, net: nn.Module) -> tuple[Path, Path]:
    """A model in memory's plan inputs, written once: the data (uint8 images, the train and
    validation splits together, the normalisation) and the weights.

    Returns:
        The paths of ``data.npz`` and ``model.safetensors``.
    """
    import numpy as np

    from pqd.checkpoint import save_checkpoint

    inputs.mkdir(parents=True, exist_ok=True)
    npz, ckpt = inputs / "data.npz", inputs / "model.safetensors"
    np.savez(
        npz,
        x_train=torch.cat([data.train_x, data.val_x]).numpy(),
        y_train=torch.cat([data.train_y, data.val_y]).numpy(),
        x_test=data.test_x.numpy(),
        y_test=data.test_y.numpy(),
        classes=np.array(list(data.classes), dtype=str),
        mean=np.array(data.mean, dtype=np.float64),
        std=np.array(data.std, dtype=np.float64),
    )
    if not _same_weights(ckpt, net):  # rewritten only when they changed: its bytes key trials
        save_checkpoint(net, ckpt, {"source": "the model passed to pqd.plan"})
    return npz, ckpt


def _same_weights(path: Path, model: nn.Module) -> bool:
    """``path`` holds exactly ``model``'s weights."""
    if not path.is_file():
        return False
    from pqd.checkpoint import read_state_dict

    saved = read_state_dict(path)
    now = model.state_dict()
    return saved.keys() == now.keys() and all(torch.equal(saved[k], now[k]) for k in now)
