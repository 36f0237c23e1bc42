"""The top-level :class:`Recipe` (a whole pqd job) and its ``search:`` section, with the
checks that span sections: the search's stages and budget, one early_exit stage."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from pqd.recipe.base import Strict
from pqd.recipe.sections import (
    BaselineSpec,
    DataSpec,
    ExportSpec,
    MeasureSpec,
    ModelSpec,
    TrainSpec,
    merge_train,
)
from pqd.recipe.stage_specs import EarlyExitSpec, StageSpec


class SearchSpec(Strict):
    """``pqd search``: run the recipe's stages in every order (and pairwise), then rank them.

    ``budget`` gives each POSITION in an order a percentage of ``total_epochs`` (the first
    stage of every order gets ``budget[0]`` %, whatever stage it is); ``None`` splits evenly.
    ``total_epochs`` ``None`` means the sum of the stages' own ``epochs``. Every trial uses
    the one shared baseline, data and seed; ``seeds`` repeats every trial (mean and spread).
    ``criterion``: higher test top-1 wins when the paired comparison of the two orders on
    the same test images is significant at ``alpha`` (exact McNemar pooled over seeds,
    Holm-corrected over the pairs; :mod:`pqd.stats`) and at least ``min_effect_points``
    (the smallest difference worth reporting); otherwise batch-1 p50 latency decides when
    it differs by more than ``tie_latency`` (a fraction) and by more than results whose
    files share one graph differ in the same latency panel (its noise floor), else the
    pair is a tie.
    """

    mode: Literal["permutations", "pairwise", "both"] = "both"
    total_epochs: int | None = Field(default=None, ge=0, le=10_000)
    budget: list[Annotated[float, Field(ge=0.0, le=100.0)]] | None = None
    seeds: list[Annotated[int, Field(ge=0, le=2**31 - 1)]] = Field(
        default_factory=lambda: [0], min_length=1
    )
    references: bool = True
    criterion: Literal["accuracy"] = "accuracy"
    alpha: float = Field(default=0.05, gt=0.0, lt=1.0)
    min_effect_points: float = Field(default=0.0, ge=0.0, le=100.0)
    tie_latency: float = Field(default=0.10, ge=0.0, lt=1.0)
    # flag a Pareto-front point whose worst class drops by more than this many points
    # against the baseline (the audit's largest per-class drop); None: no flag
    flag_class_drop: float | None = Field(default=None, ge=0.0, le=100.0)

    @model_validator(mode="before")
    @classmethod
    def _tie_points_gone(cls, data: Any) -> Any:
        if isinstance(data, dict) and "tie_points" in data:
            raise ValueError(
                "search.tie_points is gone: two orders now tie unless a paired test on the "
                "same test images says otherwise; fix: delete tie_points (set "
                "min_effect_points for the smallest difference worth reporting, alpha for "
                "the test's level)"
            )
        return data

    @model_validator(mode="after")
    def _seeds_unique(self) -> SearchSpec:
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("search.seeds lists a seed twice; fix: list each seed once")
        return self


class Recipe(Strict):
    """A whole pqd job."""

    name: str = Field(default="run", min_length=1)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    model: ModelSpec
    data: DataSpec = Field(default_factory=DataSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    baseline: BaselineSpec = Field(default_factory=BaselineSpec)
    stages: list[StageSpec] = Field(default_factory=list)
    export: ExportSpec = Field(default_factory=ExportSpec)
    measure: MeasureSpec = Field(default_factory=MeasureSpec)
    search: SearchSpec | None = None  # only ``pqd search`` reads it

    @model_validator(mode="after")
    def _search_fits_stages(self) -> Recipe:
        if self.search is None:
            return self
        names = [s.stage for s in self.stages]
        if len(names) < 2:
            raise ValueError(
                f"search needs at least 2 stages to order (the recipe has "
                f"{len(names)}); fix: list 2 or more stages under stages:"
            )
        if len(set(names)) != len(names):
            raise ValueError(
                f"search orders distinct stages, but {' -> '.join(names)} repeats "
                "one; fix: list each stage once (set its epochs via the budget)"
            )
        budget = self.search.budget
        if budget is not None:
            if len(budget) != len(names):
                raise ValueError(
                    f"search.budget has {len(budget)} entries for {len(names)} stages; fix: "
                    f"give one percentage per position, e.g. {_even_budget(len(names))}"
                )
            if abs(sum(budget) - 100.0) > 0.1:
                raise ValueError(
                    f"search.budget sums to {sum(budget):g}, not 100; fix: give "
                    "percentages of search.total_epochs that add up to 100"
                )
        return self

    @model_validator(mode="after")
    def _one_early_exit(self) -> Recipe:
        if sum(s.stage == "early_exit" for s in self.stages) > 1:
            raise ValueError(
                "early_exit appears more than once; fix: keep one early_exit stage "
                "(later stages keep training its exits)"
            )
        return self

    def early_exit(self) -> EarlyExitSpec | None:
        """The recipe's early_exit stage, if it has one."""
        return next((s for s in self.stages if isinstance(s, EarlyExitSpec)), None)

    def stage_train(self, index: int) -> TrainSpec:
        """Training settings of stage ``index``: recipe ``train`` with the stage's overrides."""
        return merge_train(self.train, self.stages[index].train)

    def baseline_train(self) -> TrainSpec:
        """Training settings of the baseline."""
        return merge_train(self.train, self.baseline.train)

    def order(self) -> str:
        """The stage order as text, e.g. ``prune -> quantize -> distill``."""
        return " -> ".join(s.stage for s in self.stages) or "(no stages)"


def _even_budget(n: int) -> list[float]:
    return [round(100 / n, 2)] * n
