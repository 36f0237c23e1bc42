"""An exponential moving average of the weights, for ``train.ema`` (torch's ``AveragedModel``).

The average is what a float fit ends with: it smooths the last epochs' noise, which is
worth most when a fit ends at a high learning rate or a small batch. The decay warms up, so
a short fit is not dominated by the weights it started from. The training loop
(:func:`pqd.train.fit`) updates it after every optimizer step and loads it at the end; the
epoch checkpoints keep it, so a resumed fit continues the same average.
"""

from __future__ import annotations

import torch
import torch.nn as nn

EMA_WARMUP = 10
"""The average's decay at update ``n`` is ``min(ema, (1 + n) / (EMA_WARMUP + n))``: early
updates weigh more, so a short fit is not dominated by the weights it started from."""


def ema_model(
    model: nn.Module, decay: float, *, buffers: bool
) -> torch.optim.swa_utils.AveragedModel:
    """An exponential moving average of ``model``'s weights (torch's ``AveragedModel``).

    Args:
        model: the model being trained.
        decay: the weight of the old average per update, in (0, 1) (``train.ema``).
        buffers: average the buffers too (an eager model's BatchNorm statistics); False
            for an exported graph, whose fake-quantizers' observed ranges and BatchNorm
            statistics stay the live model's.

    Returns:
        The average; ``update_parameters(model)`` after every optimizer step.
    """

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n: torch.Tensor) -> None:
        if not averaged[0].is_floating_point():  # counters (BatchNorm's batches seen)
            torch._foreach_copy_(averaged, current)
            return
        d = min(decay, (1.0 + float(n)) / (EMA_WARMUP + float(n)))  # (one sync on a GPU)
        torch._foreach_lerp_(averaged, current, 1.0 - d)

    return torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=update, use_buffers=buffers)


@torch.no_grad()
def load_average(model: nn.Module, averaged: torch.optim.swa_utils.AveragedModel) -> None:
    """Copy the average into ``model`` (in place): its parameters and, when the average
    kept them (``buffers=True``), its buffers.

    Args:
        model: the trained model (receives the average).
        averaged: :func:`ema_model`'s average of it.
    """
    for param, avg in zip(model.parameters(), averaged.module.parameters(), strict=True):
        param.copy_(avg)
    if averaged.use_buffers:
        for buf, avg_buf in zip(model.buffers(), averaged.module.buffers(), strict=True):
            buf.copy_(avg_buf)
