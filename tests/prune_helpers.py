"""Shared by the pruning tests: a synthetic data set, a Context and a stage runner."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from helpers import Job
from pqd.data import Dataset
from pqd.models import build_model
from pqd.recipe import recipe_from_dict
from pqd.stages.base import State


def synthetic_data(n: int = 48, classes: int = 10, seed: int = 0) -> Dataset:
    """Random uint8 32x32 RGB images with random labels (train = n, val = test = 16)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return Dataset(name="synthetic", num_classes=classes, classes=[str(i) for i in range(classes)],
                   mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), train_x=x, train_y=y,
                   val_x=x[:16], val_y=y[:16], test_x=x[:16], test_y=y[:16], root=Path("."))


def make_ctx(stages: list[dict[str, Any]], model: str = "tiny_resnet",
             **recipe: Any) -> tuple[Job, State]:
    """A job (reads like stage 0's Context) over synthetic data and a State holding a fresh
    (seeded) model."""
    data = {"model": {"name": model}, "stages": stages,
            "train": {"batch_size": 16, "lr": 0.01, "channels_last": False}, **recipe}
    r = recipe_from_dict(data)
    torch.manual_seed(0)
    ds = synthetic_data()
    net = build_model(model, ds.num_classes, ds.mean, ds.std)
    teacher = copy.deepcopy(net).eval()
    return Job(recipe=r, data=ds, teacher=teacher), State(model=net)


def run_stages(job: Job, state: State) -> State:
    """Apply the recipe's stages in order, through the pipeline's loop."""
    return job.run_stages(state)
