"""What a run reads before it trains: the recipe's data (loaded, or checked without loading),
its device and runtimes, and the preflight check of ``pqd validate``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pqd.errors import PqdError
from pqd.recipe import MeasureSpec, Recipe

if TYPE_CHECKING:
    from pqd.data.roots import DataRoot
    from pqd.dataset import Dataset


def recipe_root(recipe: Recipe, data_dir: str | Path | None = None) -> DataRoot:
    """The recipe's data folder (``pqd.data.DataRoot``): ``data_dir`` (``--data-dir``), else
    ``data.root`` (from the command line or the recipe), else ``PQD_DATA_DIR``, else ``./data``.
    """
    from pqd.data import data_root

    return data_root(data_dir, recipe.data.root, recipe.data._root_from)


def check_recipe_data(recipe: Recipe, data_dir: str | Path | None = None) -> DataRoot:
    """Check the recipe's data without loading it (files present and readable, or a
    download allowed) before work is handed out; returns its ``pqd.data.DataRoot``. An error
    names where the folder was named, as :func:`recipe_data`'s do."""
    from pqd.data import check_data
    from pqd.errors import DataRootError

    root = recipe_root(recipe, data_dir)
    try:
        check_data(
            recipe.data.dataset,
            root.path,
            download=root.download(recipe.data.download),
            explicit=False,
            on_bad_image=recipe.data.on_bad_image,
        )
    except DataRootError as exc:
        raise root.explain(exc) from None
    return root


def recipe_data(recipe: Recipe, data_dir: str | None = None, progress: bool = False) -> Dataset:
    """The recipe's data set (``pqd.data.Dataset``), from the folder :func:`recipe_root`
    picks, split and limited as the recipe says. An error about the folder names where it
    was named (flag, command line, recipe, environment) and the fix that fits there.

    Args:
        recipe: the job (its ``data`` section; ``data.split_seed`` carves the splits).
        data_dir: a folder given on the command line, or None.
        progress: show a progress bar while an image folder is decoded (on a terminal).

    Returns:
        The loaded data set.
    """
    from pqd.data import load_dataset
    from pqd.errors import DataRootError

    root = recipe_root(recipe, data_dir)
    try:
        return load_dataset(
            recipe.data.dataset,
            root.path,
            val_size=recipe.data.val_size,
            seed=recipe.data.split_seed,
            download=root.download(recipe.data.download),
            limit_train=recipe.data.limit_train,
            limit_test=recipe.data.limit_test,
            image_size=recipe.data.image_size,
            test_size=recipe.data.test_size,
            on_bad_image=recipe.data.on_bad_image,
            progress=progress,
        )
    except DataRootError as exc:
        raise root.explain(exc) from None


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise PqdError(
            "device 'cuda' was asked for but no CUDA GPU is visible", "set device: auto or cpu"
        )
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_runtimes(recipe: Recipe) -> list[str]:
    """The runtimes to measure on (``auto``: every installed one); fails before any training
    if a requested runtime is not installed."""
    from pqd.measurement.runtime import resolve_runtimes

    return resolve_runtimes(recipe.measure.runtimes)


def preflight(recipe: Recipe, data_dir: str | None = None) -> tuple[list[str], list[PqdError]]:
    """What ``pqd validate`` checks beyond the schema, without training: the data (present
    and readable, or allowed to download), the model (imports, builds, gives one logit per
    class), the baseline checkpoint (present, and loads into that model) and the runtimes.

    Args:
        recipe: the validated recipe.
        data_dir: ``--data-dir`` (else the recipe's ``data.root``, else ``$PQD_DATA_DIR``).

    Returns:
        One line per check that passed, and the errors of those that failed.
    """
    from pqd.data import NUM_CLASSES, check_data
    from pqd.errors import DataRootError
    from pqd.folder import DEFAULT_IMAGE_SIZE
    from pqd.models import build_model, check_output_shape

    passed: list[str] = []
    failed: list[PqdError] = []
    root = recipe_root(recipe, data_dir)
    classes = NUM_CLASSES.get(recipe.data.dataset)
    try:
        classes, found = check_data(
            recipe.data.dataset,
            root.path,
            download=root.download(recipe.data.download),
            # a named folder that does not exist is created for a download only when one was
            # asked for (else download is off there anyway)
            explicit=False,
            on_bad_image=recipe.data.on_bad_image,
        )
        passed.append(f"data: {found}")
    except DataRootError as exc:
        failed.append(root.explain(exc))
    except PqdError as exc:
        failed.append(exc)
    model = None
    if classes is not None:
        try:
            model = build_model(
                recipe.model.name, classes, (0.5,) * 3, (0.25,) * 3, **recipe.model.kwargs
            )
            size = recipe.data.image_size or (
                DEFAULT_IMAGE_SIZE if recipe.data.dataset == "folder" else 32
            )
            check_output_shape(model, classes, size)
            params = sum(p.numel() for p in model.parameters())
            passed.append(
                f"model: {recipe.model.name} builds ({params:,} parameters) and "
                f"gives {classes} logits per image"
            )
        except PqdError as exc:
            failed.append(exc)
            model = None
    ckpt = recipe.baseline.checkpoint
    if ckpt:
        from pqd.checkpoint import load_checkpoint, read_state_dict

        try:
            if model is not None:
                load_checkpoint(model, ckpt)
                passed.append(f"checkpoint: {ckpt} loads into the model")
            else:
                read_state_dict(ckpt)
                passed.append(f"checkpoint: {ckpt} is readable (not matched: no model)")
        except PqdError as exc:
            failed.append(exc)
    try:
        passed.append(f"runtimes: {', '.join(check_runtimes(recipe))}")
    except PqdError as exc:
        failed.append(exc)
    return passed, failed


def measure_spec(recipe: Recipe) -> MeasureSpec:
    """The recipe's measure settings with ``runtimes`` resolved (``auto``: every installed
    runtime, onnxruntime first); fails if a requested runtime is missing."""
    return recipe.measure.model_copy(update={"runtimes": check_runtimes(recipe)})
