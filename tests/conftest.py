"""Shared fixtures: a small learnable synthetic data set and a stage Context on tiny nets."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from pqd.data import Dataset
from pqd.recipe import Recipe, recipe_from_dict

ROOT = Path(__file__).resolve().parents[1]
SUBSET_CANDIDATES = [
    ROOT.parent / "shared" / "data" / "cifar-10-subset",
    Path("/work/shared/data/cifar-10-subset"),
]


def synthetic_dataset(
    n_train: int = 96,
    n_val: int = 32,
    n_test: int = 48,
    classes: int = 4,
    size: int = 32,
    seed: int = 0,
) -> Dataset:
    """uint8 images whose class sets the mean colour of one quadrant (learnable in a few steps)."""
    g = torch.Generator().manual_seed(seed)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % classes
        x = torch.randint(0, 96, (n, 3, size, size), generator=g)
        half = size // 2
        for c in range(classes):
            r, q = divmod(c, 2)
            x[y == c, c % 3, r * half : (r + 1) * half, q * half : (q + 1) * half] += 150
        return x.clamp(0, 255).to(torch.uint8), y

    tx, ty = split(n_train)
    vx, vy = split(n_val)
    sx, sy = split(n_test)
    return Dataset(
        name="synthetic",
        num_classes=classes,
        classes=[str(c) for c in range(classes)],
        mean=(0.3, 0.3, 0.3),
        std=(0.25, 0.25, 0.25),
        train_x=tx,
        train_y=ty,
        val_x=vx,
        val_y=vy,
        test_x=sx,
        test_y=sy,
        root=Path("."),
    )


def tiny_recipe(stages: list[dict[str, Any]], model: str = "tiny_cnn", **extra: Any) -> Recipe:
    """A recipe for unit tests: tiny net, small batches, fp32, given stages."""
    data = {
        "model": {"name": model},
        "train": {"batch_size": 32, "lr": 0.05, "amp": "off"},
        "baseline": {"epochs": 1},
        "stages": stages,
        "measure": {"warmup": 1, "repeats": 5, "batch_sizes": [1]},
    }
    data.update(extra)
    return recipe_from_dict(data)


@pytest.fixture(scope="session")
def synth() -> Dataset:
    return synthetic_dataset()


@pytest.fixture(scope="session")
def subset_dir() -> Path:
    """The real CIFAR-10 subset: ``$PQD_DATA_DIR`` or the shared copy beside the checkout."""
    env = os.environ.get("PQD_DATA_DIR")
    for root in [Path(env)] if env else SUBSET_CANDIDATES:
        if (root / "cifar-10-batches-py").is_dir():
            return root
    pytest.fail(
        "the real CIFAR-10 subset is missing; set PQD_DATA_DIR to the folder holding "
        "cifar-10-batches-py/"
    )


# ---------------------------------------------------------------------------- test sets


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--integration",
        action="store_true",
        default=False,
        help="also run the integration and slow tests (the real CLI on the real data subset, "
        "tests over about 5 s; CI runs them): the default is the fast set",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The default run leaves the integration and slow tests out (deselected, so a run says
    how many); ``--integration`` (or ``PQD_TESTS=all``) runs everything."""
    if config.getoption("--integration") or os.environ.get("PQD_TESTS") == "all":
        return

    def left_out(item: pytest.Item) -> bool:
        return any(item.get_closest_marker(m) is not None for m in ("integration", "slow"))

    slow = [item for item in items if left_out(item)]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not left_out(item)]
