"""The chance check after each stage (``train.stop_at_chance``).

A stage that turns a model clearly above chance into a guesser (a learning rate too high
for a QAT graph with frozen BatchNorm, a sparsity too high) should stop the run where it
happened, not be exported, measured and ranked as a result. The check is a pair of exact
binomial tests on the validation split, so a tiny run that was never above chance passes.
"""

from __future__ import annotations

import math

import torch

from pqd.errors import PqdError
from pqd.stats import above_chance_p


class StageCollapsed(PqdError):
    """A stage left a model that was clearly above chance no better than guessing on the
    validation split (``train.stop_at_chance``): the run stops rather than export, measure
    and rank a broken model as a result."""


COLLAPSE_FIX = (
    "lower the stage's train.lr (after a quantize stage the model trains with its "
    "BatchNorm statistics frozen and takes a smaller rate than a float model) or ask less of "
    "it (a lower sparsity), or set the stage's train.stop_at_chance: false to keep such a "
    "model; then run again with --resume: finished steps are kept"
)


def check_above_chance(
    desc: str, before: float, predicted: torch.Tensor, labels: torch.Tensor, alpha: float
) -> None:
    """Stop a stage that turned a model clearly above chance into a guesser.

    Chance is the most common validation class's share (1/classes when they are
    balanced): a model that answers one class gets it. The check fires only when the
    accuracy before the stage was above chance and the one after is not, each by a
    one-sided exact binomial test at ``alpha`` on the same images, so a model that was never
    above chance (a tiny test run) passes.

    Args:
        desc: who is checked, e.g. ``[2/3] prune`` (the start of the error line).
        before: the validation accuracy (fraction) of the model the stage started from.
        predicted: the stage's predicted class per validation image.
        labels: the true class per validation image.
        alpha: the significance level of both tests.

    Raises:
        StageCollapsed: above chance before the stage, at chance after it.
    """
    n = int(labels.numel())
    if n == 0 or not math.isfinite(before):
        return
    chance = float(torch.bincount(labels).max()) / n
    correct = int((predicted == labels).sum())
    was_above = above_chance_p(round(before * n), n, chance) < alpha
    if was_above and above_chance_p(correct, n, chance) >= alpha:
        top = torch.bincount(predicted).max().item() / n
        raise StageCollapsed(
            f"{desc}: the stage left the model at chance: {correct / n:.1%} validation "
            f"top-1 on {n:,} images ({before:.1%} before it; answering the most common "
            f"class gets {chance:.1%}; {top:.0%} of the answers are one class)",
            COLLAPSE_FIX,
        )
