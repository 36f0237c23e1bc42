"""What flows between stages (:class:`State`) and what keeps pruned weights at zero
(:class:`MaskKeeper`): plain data and one hook, below every technique."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn


@dataclass
class State:
    """The model as the stages leave it.

    ``masks`` maps parameter names to boolean keep-masks (False = held at zero);
    names are the same on the eager model and on its PT2E graph.
    ``quantized`` is True once fake-quantizers are in the graph (export gives INT8).
    ``info`` collects per-stage facts for the record (e.g. achieved sparsity).
    ``structure`` lists the channel-surgery steps applied so far (JSON-able records
    ``{"layer", "channels", "kept"}``; :func:`pqd.prune.channels.rebuild_model`
    rebuilds the pruned architecture from a fresh model and them).
    ``nm_layers`` maps parameter names pruned N:M to ``[n, m]`` (checked in the export).
    """

    model: nn.Module
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    quantized: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    structure: list[dict[str, Any]] = field(default_factory=list)
    nm_layers: dict[str, list[int]] = field(default_factory=dict)


class MaskKeeper:
    """Zeroes every masked-out weight; called after every optimizer step.

    Holds the masks dict itself, not a copy, so masks a stage updates while
    training (gradual pruning) take effect at the next step.
    """

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
        self.params = dict(model.named_parameters())
        self.masks = masks
        missing = sorted(set(masks) - set(self.params))
        if missing:
            raise RuntimeError(f"pruning masks name parameters the model lacks: {missing[:5]}")

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> None:
        for name, mask in self.masks.items():
            p = self.params[name]
            if mask.device != p.device:
                mask = self.masks[name] = mask.to(p.device)
            p.mul_(mask)
