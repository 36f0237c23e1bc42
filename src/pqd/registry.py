"""Explicit registries filled by decorators (timm's ``@register_model`` shape).

Nothing is discovered by name: a model or stage exists when its module has been
imported and its decorator has run. ``pqd.models`` imports every zoo module and looks
names up (:func:`pqd.models.resolve_model_fn`); ``pqd.stages`` imports every stage. This
module imports neither: the zoo and the stages import it, not the other way round.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn as nn

ModelFn = Callable[..., nn.Module]
MODELS: dict[str, ModelFn] = {}
STAGES: dict[str, Callable[..., Any]] = {}


def register_model(fn: ModelFn) -> ModelFn:
    """Register ``fn(num_classes: int, **kwargs) -> nn.Module`` under its function name."""
    if fn.__name__ in MODELS:
        raise ValueError(f"model {fn.__name__!r} registered twice")
    MODELS[fn.__name__] = fn
    return fn


def register_stage(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a stage's ``apply(state, spec, ctx) -> state`` function under ``name``."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in STAGES:
            raise ValueError(f"stage {name!r} registered twice")
        STAGES[name] = fn
        return fn

    return deco
