"""The one baseline train-or-load and the one stage loop.

Every path that compresses a model goes through these two functions: :func:`pqd.compress`
and :func:`pqd.apply_stages` (the Python API), ``pqd run`` (:func:`pqd.pipeline.run`),
``pqd search``'s trials (which are ``pqd run``), ``pqd sensitivity``, the benchmarks and
the tests.

    model = baseline(model, data, train=TrainSpec(), epochs=30)       # or checkpoint="..."
    state = apply_stages(model, [PruneSpec(sparsity=0.5)], data)      # pqd.stages.State
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn
from pydantic import TypeAdapter

from pqd._quiet import quietly
from pqd.context import Context
from pqd.progress import phase, plural
from pqd.recipe import AugmentSpec, Recipe, StageSpec, TrainSpec, merge_train
from pqd.state import State

if TYPE_CHECKING:
    from pqd.dataset import Dataset
    from pqd.resume import RunFolder

StageHook = Callable[[int, Any, State, float], None]
"""``on_stage(index, spec, state, seconds)``: called after each stage (the pipeline
evaluates, checkpoints and records the step there)."""


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def stage_seed(seed: int, index: int) -> int:
    """Seed of stage ``index`` of a run seeded ``seed`` (distinct per stage)."""
    return seed + 1000 * (index + 1)


def frozen(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with no gradients: the default KD teacher."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def fresh_copies(model: nn.Module) -> Callable[[], nn.Module]:
    """A fresh-model factory for a user's model: copies of its architecture (taken now, on
    the CPU) whose layers get new initial weights (``reset_parameters``) from the current
    RNG, as a freshly built zoo model would."""
    template = copy.deepcopy(model).cpu()

    def build() -> nn.Module:
        fresh = copy.deepcopy(template)
        for m in fresh.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()
        return fresh

    return build


def as_specs(stages: Sequence[Any]) -> list[Any]:
    """Stage specs from spec objects (``pqd.Prune(...)``) or plain dicts (``{"stage": ...}``);
    a dict is validated as in a recipe."""
    adapter: TypeAdapter[Any] = TypeAdapter(StageSpec)
    return [s if not isinstance(s, dict) else adapter.validate_python(s) for s in stages]


@quietly
def baseline(
    model: nn.Module,
    data: Any,
    *,
    train: TrainSpec | dict[str, Any] | None = None,
    epochs: int = 0,
    checkpoint: str | Path | None = None,
    seed: int = 0,
    augment: AugmentSpec | dict[str, Any] | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    run: RunFolder | None = None,
) -> nn.Module:
    """Train ``model`` for ``epochs`` on the train split, or load ``checkpoint`` into it;
    in place (also returned), left on ``device`` in the contiguous memory format.

    Args:
        model: the model to train or fill.
        data: ``pqd.data.Dataset``, or what :func:`pqd.data.as_dataset` takes.
        train: training settings (a ``TrainSpec`` or a dict of its fields; default
            ``TrainSpec()``).
        epochs: training epochs (0 with no checkpoint: the model is taken as it is).
        checkpoint: a .safetensors or torch state_dict file to load instead of training.
        seed: seed of the data order and augmentation.
        augment: training augmentation (default: crop + flip).
        device: where to train (default CPU).
        progress: show progress bars.
        run: a :class:`pqd.resume.RunFolder`: per-epoch checkpoints, and a killed training
            continues after its last finished epoch.

    Returns:
        ``model`` (trained in place; where ``data`` has a normalisation, it trained behind
        it, as :func:`apply_stages` will run it).
    """
    from pqd.checkpoint import load_checkpoint
    from pqd.data import as_dataset
    from pqd.train import fit, prepare_model

    data = as_dataset(data)
    given, model = model, wrap(model, data)  # trained in place: the wrapper holds `given`
    train = _train_spec(train)
    augment = AugmentSpec(**augment) if isinstance(augment, dict) else augment
    device = torch.device(device) if device is not None else torch.device("cpu")
    model.to(device)
    if checkpoint:
        load_checkpoint(given, checkpoint)
        model.to(device)
    elif epochs > 0:
        ctx = Context(
            data=data,
            device=device,
            teacher=model,
            augment=augment or AugmentSpec(),
            progress=progress,
        )
        loader = ctx.loader("train", train.batch_size, seed=seed, augment=True, shuffle=True)
        prepare_model(model, train, device)
        start, on_epoch = None, None
        if run is not None:
            run.begin(0)  # (pqd run began it before loading the data: that time counts)
            start, on_epoch = run.epoch_hooks(0, model, {}, desc="baseline")
        fit(
            model,
            loader,
            train,
            epochs,
            device=device,
            desc="baseline",
            progress=progress,
            resume=start,
            on_epoch=on_epoch,
        )
    # torch's stub of Module.to lacks memory_format (it exists at runtime)
    model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    return given


def recipe_baseline(
    model: nn.Module,
    data: Any,
    recipe: Recipe,
    *,
    device: torch.device | str | None = None,
    checkpoint: str | Path | None = None,
    progress: bool = False,
    run: RunFolder | None = None,
) -> nn.Module:
    """:func:`baseline` as ``recipe`` asks for it: its baseline training settings, epochs
    and checkpoint, its seed and its augmentation.

    Args:
        model, data, device, progress, run: as :func:`baseline`.
        recipe: the job whose ``baseline`` section (and seed, data augmentation) is run.
        checkpoint: a file to load instead of the recipe's (e.g. a stopped run's own).

    Returns:
        ``model`` (trained or loaded in place).
    """
    return baseline(
        model,
        data,
        train=recipe.baseline_train(),
        epochs=recipe.baseline.epochs,
        checkpoint=checkpoint or recipe.baseline.checkpoint,
        seed=recipe.seed,
        augment=recipe.data.augment,
        device=device,
        progress=progress,
        run=run,
    )


def wrap(model: nn.Module, data: Dataset) -> nn.Module:
    """``model`` with the data's normalisation in front (a :class:`pqd.models.Classifier`),
    or ``model`` itself when the normalisation is the identity or already inside it (a zoo
    model is a Classifier)."""
    from pqd.models import Classifier

    identity = all(m == 0.0 for m in data.mean) and all(s == 1.0 for s in data.std)
    if identity or isinstance(model, Classifier):
        return model
    return Classifier(model, data.mean, data.std)


def _train_spec(train: TrainSpec | dict[str, Any] | None) -> TrainSpec:
    return train if isinstance(train, TrainSpec) else TrainSpec(**(train or {}))


def stage_context(
    stages: Sequence[Any],
    index: int,
    data: Dataset,
    teacher: nn.Module,
    *,
    train: TrainSpec,
    seed: int = 0,
    augment: AugmentSpec | None = None,
    device: torch.device | None = None,
    target: str = "portable",
    threads: int = 1,
    progress: bool = False,
    fresh_model: Callable[[], nn.Module] | None = None,
    run: RunFolder | None = None,
    forward_loop: Callable[[nn.Module], None] | None = None,
) -> Context:
    """The Context stage ``index`` of ``stages`` runs with (what it reads, nothing more):
    ``train`` merged with the stage's overrides, its seed, its label and whether it or a
    later stage quantizes. Arguments as :func:`apply_stages`."""
    spec = stages[index]
    return Context(
        data=data,
        device=device or torch.device("cpu"),
        teacher=teacher,
        train=merge_train(train, spec.train),
        seed=stage_seed(seed, index),
        augment=augment or AugmentSpec(),
        fresh_model=fresh_model,
        quantize_later=any(s.stage == "quantize" for s in stages[index:]),
        threads=threads,
        target=target,
        progress=progress,
        run=run,
        forward_loop=forward_loop,
        step=index + 1,
        desc=f"[{index + 1}/{len(stages)}] {spec.stage}",
    )


@quietly
def apply_stages(
    model: nn.Module,
    stages: Sequence[Any],
    data: Any,
    teacher: nn.Module | None = None,
    *,
    train: TrainSpec | dict[str, Any] | None = None,
    seed: int = 0,
    augment: AugmentSpec | dict[str, Any] | None = None,
    device: torch.device | str | None = None,
    target: str = "portable",
    threads: int = 1,
    progress: bool = False,
    fresh_model: Callable[[], nn.Module] | None = None,
    state: State | None = None,
    start: int = 0,
    run: RunFolder | None = None,
    on_stage: StageHook | None = None,
    forward_loop: Callable[[nn.Module], None] | None = None,
) -> State:
    """Apply ``stages`` in order to a copy of ``model`` (no export, no measurement).

    Stage ``i`` gets its own Context (:class:`pqd.stages.Context`): ``train`` merged with the
    stage's ``train`` overrides, seed ``seed + 1000 * (i + 1)`` (every RNG is seeded with it
    before the stage runs), whether it or a later stage quantizes, and the shared rest.

    Args:
        model: any ``nn.Module`` taking float NCHW images as ``data`` holds them: where
            ``data`` has a normalisation (``mean``/``std``), it goes in front of the model
            (:func:`wrap`; a zoo model has it inside already).
        stages: stage specs (``pqd.Prune(...)``, ``pqd.Quantize(...)``, ...) or recipe dicts.
        data: ``pqd.data.Dataset``, or what :func:`pqd.data.as_dataset` takes (splits as
            tensors, torch ``Dataset`` or ``DataLoader``; no test split needed).
        teacher: the KD teacher; default a frozen copy of ``model``.
        train: training settings every stage starts from (default ``TrainSpec()``).
        seed: the run's seed.
        augment: training augmentation (default crop + flip).
        device: where to train (default CPU).
        target: deployment target (:mod:`pqd.target`, resolved: ``portable`` or
            ``x86-vnni``): the INT8 weight range quantize stages train with.
        threads: measurement threads (latency-targeted channel pruning).
        progress: show progress bars.
        fresh_model: builds a fresh unpruned model like ``model`` (default: copies of
            ``model`` re-initialised, see :func:`fresh_copies`).
        state: continue from this state (with ``start``) instead of a copy of ``model``.
        start: index of the first stage to apply (the earlier ones made ``state``).
        run: a :class:`pqd.resume.RunFolder` for per-epoch checkpoints (None: none).
        on_stage: called as ``on_stage(index, spec, state, seconds)`` after each stage.
        forward_loop: calibration for quantize stages: ``forward_loop(model)`` runs the
            model (which takes what ``model`` takes) on the user's batches instead of pqd's
            validation batches.

    Returns:
        The final :class:`pqd.stages.State` (``state.model`` is a PT2E graph once a
        quantize stage ran; ``state.masks`` the pruning masks).
    """
    import pqd.stages  # noqa: F401  (fills the stage registry)
    from pqd.data import as_dataset
    from pqd.registry import STAGES
    from pqd.train import is_graph, prepare_model

    specs = as_specs(stages)
    data = as_dataset(data)
    model = wrap(model, data)  # the data's normalisation goes inside (and into the file)
    augment = AugmentSpec(**augment) if isinstance(augment, dict) else augment
    dev = torch.device(device) if device is not None else torch.device("cpu")
    base = _train_spec(train)
    if state is None:
        state = State(model=copy.deepcopy(model))
    teacher = teacher if teacher is not None else frozen(model)
    fresh_model = fresh_model or fresh_copies(model)
    for i in range(start, len(specs)):
        spec = specs[i]
        ctx = stage_context(
            specs,
            i,
            data,
            teacher,
            train=base,
            seed=seed,
            augment=augment,
            device=dev,
            target=target,
            threads=threads,
            progress=progress,
            fresh_model=fresh_model,
            run=run,
            forward_loop=forward_loop,
        )
        seed_everything(ctx.seed)
        t0 = time.perf_counter()
        if run is not None:
            run.begin(i + 1)
        state.info = {}
        if not is_graph(state.model):
            prepare_model(state.model, ctx.train, dev)
        phase(f"{ctx.desc}: starting ({plural(spec.epochs, 'epoch')})")
        state = STAGES[spec.stage](state, spec, ctx)
        phase(f"{ctx.desc}: done in {time.perf_counter() - t0:.0f} s")
        if on_stage is not None:
            on_stage(i, spec, state, time.perf_counter() - t0)
    return state
