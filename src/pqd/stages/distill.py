"""Logit knowledge distillation from the baseline into the student as it stands.

The student is whatever earlier stages left (pruned, fake-quantized, both or
neither); KD only changes its weights, never its deployed form. The teacher is
the uncompressed baseline, frozen in eval mode (Hinton et al., 2015).
"""

from __future__ import annotations

from pqd.recipe import DistillSpec
from pqd.registry import register_stage
from pqd.stages.base import Context, State
from pqd.train import kd_loss


@register_stage("distill")
def apply_distill(state: State, spec: DistillSpec, ctx: Context) -> State:
    """Fine-tune the student on ``alpha * KD + (1 - alpha) * CE`` for ``spec.epochs``."""
    cfg = ctx.stage_train()
    loss = kd_loss(ctx.teacher, spec.temperature, spec.alpha, cfg.label_smoothing,
                   device=ctx.device, amp=cfg.amp)
    ctx.fit(state, cfg, spec.epochs, seed=ctx.stage_seed, loss_fn=loss, desc=ctx.stage_desc)
    return state
