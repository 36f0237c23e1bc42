"""The chance check that stops a run whose stage left the model guessing."""

from __future__ import annotations

import math

import pytest
import torch

from pqd.pipeline.collapse import StageCollapsed, check_above_chance


def test_chance_check_fires_only_on_a_fall_to_chance() -> None:
    """Above chance before and a one-class answer after: StageCollapsed naming the numbers.
    A model never above chance, one still above it, or an empty split passes; chance is
    the most common class's share where classes are unbalanced."""
    labels = torch.arange(1000) % 10  # balanced: chance 10%
    one_class = torch.zeros(1000, dtype=torch.long)
    with pytest.raises(
        StageCollapsed,
        match=r"\[2/3\] prune: .* 10\.0% validation top-1 on 1,000 "
        r"images \(84\.0% before it; .* gets 10\.0%; 100% of the answers",
    ):
        check_above_chance("[2/3] prune", 0.84, one_class, labels, 0.05)
    check_above_chance("[2/3] prune", 0.11, one_class, labels, 0.05)  # never above chance
    still = labels.clone()
    still[:800] = 0  # 28% right: above chance, however far it fell
    check_above_chance("[2/3] prune", 0.84, still, labels, 0.05)
    empty = torch.zeros(0, dtype=torch.long)
    check_above_chance("[2/3] prune", 0.84, empty, empty, 0.05)
    check_above_chance("[2/3] prune", math.nan, one_class, labels, 0.05)
    # 60% of the images are class 0: answering 0 everywhere is chance, not 60% skill ...
    skewed = torch.cat([torch.zeros(600, dtype=torch.long), torch.arange(400) % 9 + 1])
    with pytest.raises(StageCollapsed, match=r"gets 60\.0%"):
        check_above_chance("q", 0.9, one_class, skewed, 0.05)
    # ... and a model at 62% on it was never clearly above that chance
    check_above_chance("q", 0.62, one_class, skewed, 0.05)
