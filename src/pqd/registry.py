"""Explicit registries filled by decorators (timm's ``@register_model`` shape).

Nothing is discovered by name: a model or stage exists when its module has been
imported and its decorator has run. ``pqd.models`` imports every zoo module.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch.nn as nn

from pqd.errors import ModelError, did_you_mean

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


def model_names() -> list[str]:
    """Sorted names of the registered zoo models."""
    import pqd.models  # noqa: F401  (fills MODELS)

    return sorted(MODELS)


def resolve_model_fn(name: str) -> ModelFn:
    """Return the builder for a zoo name or a ``module:callable`` user model."""
    import pqd.models  # noqa: F401  (fills MODELS)

    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # an import error in user code is the user's to fix
            raise ModelError(
                f"model {name!r}: module {module_name!r} does not import "
                f"({type(exc).__name__}: {exc})",
                "check the module path and that it is importable (on PYTHONPATH)",
            ) from None
        fn = getattr(module, attr, None)
        if fn is None or not callable(fn):
            raise ModelError(
                f"model {name!r}: {module_name!r} has no callable {attr!r}",
                "name a function or class that returns an nn.Module",
            )
        return fn
    if name not in MODELS:
        raise ModelError(
            f"unknown model {name!r}{did_you_mean(name, MODELS)}",
            f"use one of {', '.join(sorted(MODELS))} or 'module:callable'",
        )
    return MODELS[name]
