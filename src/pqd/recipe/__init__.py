"""Recipe: the whole job as plain, validated data (no torch import here).

A recipe names a model, a data set, how to get the baseline, an ordered list of
compression stages (any order, any subset, repeats allowed), how to export and
how to measure. Unknown keys, wrong types and impossible values are rejected
with one line naming the key path and the fix (:class:`pqd.errors.RecipeError`).

    recipe = load_recipe("recipes/quickstart.yaml", overrides=["stages.0.sparsity=0.7"])
    text = dump_recipe(recipe)          # load(dump(r)) == r

``pqd.recipe`` is the recipe's public face: import from here. The package:
:mod:`~pqd.recipe.base` (:class:`Strict`, one-line errors of sections built in Python),
:mod:`~pqd.recipe.sections` (model, data, train, baseline, export, measure),
:mod:`~pqd.recipe.stage_specs` (the stage specs and :data:`StageSpec`, the stage set),
:mod:`~pqd.recipe.schema` (:class:`Recipe` and its ``search:`` section),
:mod:`~pqd.recipe.validate` (:func:`recipe_from_dict` and its error lines),
:mod:`~pqd.recipe.overrides` (``key.path=value``) and :mod:`~pqd.recipe.loader`
(:func:`load_recipe`, :func:`dump_recipe`, :func:`stable_dump`).
"""

from __future__ import annotations

from pqd.recipe.base import Fraction, Strict
from pqd.recipe.loader import RECIPE_PATHS, anchor_paths, dump_recipe, load_recipe, stable_dump
from pqd.recipe.overrides import apply_overrides, parse_overrides
from pqd.recipe.schema import Recipe, SearchSpec
from pqd.recipe.sections import (
    AugmentSpec,
    BaselineSpec,
    DataSpec,
    ExportSpec,
    MeasureSpec,
    ModelSpec,
    TrainOverride,
    TrainSpec,
    merge_train,
)
from pqd.recipe.stage_specs import (
    STAGE_NAMES,
    STAGE_SPECS,
    ActivationQuantSpec,
    ChannelTarget,
    Criterion,
    DistillSpec,
    EarlyExitSpec,
    ExitHeadSpec,
    ExitTarget,
    FeatureKDSpec,
    MixedPrecisionSpec,
    PruneChannelsSpec,
    PruneSpec,
    QuantizeSpec,
    StageBase,
    StageSpec,
    WeightQuantSpec,
)
from pqd.recipe.validate import recipe_from_dict

__all__ = [
    "RECIPE_PATHS",
    "STAGE_NAMES",
    "STAGE_SPECS",
    "ActivationQuantSpec",
    "AugmentSpec",
    "BaselineSpec",
    "ChannelTarget",
    "Criterion",
    "DataSpec",
    "DistillSpec",
    "EarlyExitSpec",
    "ExitHeadSpec",
    "ExitTarget",
    "ExportSpec",
    "FeatureKDSpec",
    "Fraction",
    "MeasureSpec",
    "MixedPrecisionSpec",
    "ModelSpec",
    "PruneChannelsSpec",
    "PruneSpec",
    "QuantizeSpec",
    "Recipe",
    "SearchSpec",
    "StageBase",
    "StageSpec",
    "Strict",
    "TrainOverride",
    "TrainSpec",
    "WeightQuantSpec",
    "anchor_paths",
    "apply_overrides",
    "dump_recipe",
    "load_recipe",
    "merge_train",
    "parse_overrides",
    "recipe_from_dict",
    "stable_dump",
]
