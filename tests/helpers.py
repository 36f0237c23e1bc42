"""Shared by the tests: a job (recipe + data + teacher) whose stages run through the one
stage loop (:func:`pqd.engine.apply_stages`), and the Context a single stage gets there."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from pqd.engine import apply_stages, stage_context
from pqd.models import build_model
from pqd.recipe import Recipe
from pqd.stages.base import Context, State


@dataclass
class Job:
    """A recipe's stages on ``data`` with ``teacher``; reads like the Context of stage
    ``index`` (``job.loader``, ``job.example_input``, ``job.fit``), so a stage function can
    be called with it directly: ``apply_prune(state, job.recipe.stages[0], job)``."""

    recipe: Recipe
    data: Any
    teacher: nn.Module
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    run: Any = None
    index: int = 0

    def fresh_model(self) -> nn.Module:
        r, d = self.recipe, self.data
        return build_model(r.model.name, d.num_classes, d.mean, d.std, **r.model.kwargs)

    def settings(self) -> dict[str, Any]:
        r = self.recipe
        return {"train": r.train, "seed": r.seed, "augment": r.data.augment,
                "device": self.device, "threads": r.measure.threads, "progress": False,
                "fresh_model": self.fresh_model, "run": self.run}

    @property
    def ctx(self) -> Context:
        if self.index >= len(self.recipe.stages):  # no such stage: the run's settings
            r = self.recipe
            return Context(data=self.data, device=self.device, teacher=self.teacher,
                           train=r.train, seed=r.seed, augment=r.data.augment,
                           fresh_model=self.fresh_model, progress=False)
        return stage_context(self.recipe.stages, self.index, self.data, self.teacher,
                             **self.settings())

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.ctx, name)

    def run_stages(self, state: State, start: int = 0,
                   on_stage: Callable[[int, Any, State, float], None] | None = None) -> State:
        """Apply the recipe's stages from ``start`` to ``state`` (the pipeline's loop)."""
        return apply_stages(state.model, self.recipe.stages, self.data, self.teacher,
                            state=state, start=start, on_stage=on_stage, **self.settings())
