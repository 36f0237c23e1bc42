"""``pqd plan``: the most accurate model under a latency budget on this CPU.

    result = plan(load_recipe("recipes/resnet18-structured.yaml"), latency_ms=1.5,
                  out="runs/plan")
    result["pick"]["measured_ms"], result["pick"]["accuracy"]

The recipe is the template: its stages run for every trained candidate, with its
``prune_channels`` stage (one is put first, 1 epoch, when it has none) given per-group
``ratios``; a static ``quantize`` stage makes the target INT8, else FP32. Steps:

1. **Latency model** (:class:`pqd.latency_model.LatencyModel`): measured lookup tables of
   exported pieces on the chosen runtime and threads, cached per machine and runtime; its
   error on ``validate`` random whole candidates (median, worst) is reported.
2. **Honest refusals**, from whole networks timed side by side here: the dense model already
   meets the budget (nothing to prune), or even the fastest candidate (every group at the
   lowest level) misses it; each is one line naming the measured latency. Every later panel
   of whole files also times the dense network and is scaled to the dense time the budget was
   set against (:func:`~pqd.planner.latency.measure_against_dense`): a VM drifting during a
   plan moves all files alike.
3. **Candidates**: per-group keep levels (the table's levels and their midpoints): uniform
   ones (also at 0.05 steps), a greedy path (step down the group that adds least estimated
   loss per predicted ms saved) and random ones. The cheap accuracy estimate is a
   per-group **sensitivity analysis**
   (:func:`~pqd.planner.sensitivity.sensitivity_curves`): the adaptive-BN validation loss of
   the baseline with one group pruned to each level, summed over groups
   (:func:`~pqd.planner.sensitivity.sensitivity_loss`). First **the uniform reference** is
   measured: uniform pruning at the smallest ratio (0.05 steps) whose whole file meets the
   budget, what a user would do by hand; those uniform files also calibrate the latency
   model near the budget (median measured / predicted). Candidates whose prediction, so
   scaled, meets the budget (and ``size_mb``) are ranked by the estimate; the best
   ``screen`` are re-ranked by a dearer one: their joint adaptive-BN validation loss
   (:func:`~pqd.planner.sensitivity.adaptive_bn_eval`, EagleEye). The best ``max(2k, 4)`` of
   those are exported whole and timed, and the best ``k`` within the budget are trained with
   the uniform reference. When those whole files ran slower than predicted (too few within
   the budget) or faster (by more than the tolerance: the model is calibrated on uniform
   networks), the predictions are scaled by what they measured and the candidates the budget
   then admits are screened the same way (:func:`~pqd.planner.latency.recalibrated`,
   :func:`~pqd.planner.latency.widened`).
4. **Training**: the chosen are trained for real through the normal pipeline (the
   template's stages: prune_channels with explicit ratios, then e.g. QAT and KD from the
   one shared baseline) on the search executors (sequential, processes, Ray), into run
   folders keyed by their resolved recipe: running the same command again resumes.
5. **Measuring and the pick**: each run is measured as ``pqd run`` does, then all final
   files are timed once more side by side; among those within the budget (``tolerance``,
   default 5%, allows timing noise) a planned network is picked only when it beats the
   uniform reference on the validation images beyond noise (paired McNemar, Holm over the
   planned ones: :func:`choose_pick`), else the uniform reference is; the pick's test top-1
   is reported with its paired comparison against the uniform reference, and its recipe is
   written as ``pick.yaml`` (``pqd run pick.yaml`` redoes it).

Writes ``DIR/plan.json``, ``DIR/report.md``, ``DIR/report.html`` (self-contained),
``DIR/plots/*.png`` and ``DIR/pick.yaml``.
"""

from __future__ import annotations

from pqd.planner.pick import choose_pick
from pqd.planner.run import plan
from pqd.planner.template import (
    PICK_FILE,
    PLAN_FILE,
    SELECTION_FILE,
    SENSITIVITY_FILE,
    PlanError,
)

__all__ = [
    "PICK_FILE",
    "PLAN_FILE",
    "SELECTION_FILE",
    "SENSITIVITY_FILE",
    "PlanError",
    "choose_pick",
    "plan",
]
