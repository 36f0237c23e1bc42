"""Shared by the pruning tests: a synthetic data set, a Context and a stage runner."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

import pqd.stages  # noqa: F401  (fills the stage registry)
from pqd.data import Dataset
from pqd.models import build_model
from pqd.recipe import recipe_from_dict
from pqd.registry import STAGES
from pqd.stages.base import Context, State
from pqd.train import is_graph, prepare_model


def synthetic_data(n: int = 48, classes: int = 10, seed: int = 0) -> Dataset:
    """Random uint8 32x32 RGB images with random labels (train = n, val = test = 16)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return Dataset(name="synthetic", num_classes=classes, classes=[str(i) for i in range(classes)],
                   mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), train_x=x, train_y=y,
                   val_x=x[:16], val_y=y[:16], test_x=x[:16], test_y=y[:16], root=Path("."))


def make_ctx(stages: list[dict[str, Any]], model: str = "tiny_resnet",
             **recipe: Any) -> tuple[Context, State]:
    """A Context over synthetic data and a State holding a fresh (seeded) model."""
    data = {"model": {"name": model}, "stages": stages,
            "train": {"batch_size": 16, "lr": 0.01, "channels_last": False}, **recipe}
    r = recipe_from_dict(data)
    torch.manual_seed(0)
    ds = synthetic_data()
    net = build_model(model, ds.num_classes, ds.mean, ds.std)
    teacher = copy.deepcopy(net).eval()
    ctx = Context(recipe=r, data=ds, device=torch.device("cpu"), teacher=teacher, progress=False)
    return ctx, State(model=net)


def run_stages(ctx: Context, state: State) -> State:
    """Apply the recipe's stages in order, as the pipeline does."""
    for i, spec in enumerate(ctx.recipe.stages):
        ctx.stage_index = i
        state.info = {}
        if not is_graph(state.model):
            prepare_model(state.model, ctx.stage_train(), ctx.device)
        state = STAGES[spec.stage](state, spec, ctx)
    return state
