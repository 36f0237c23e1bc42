"""Does the exported file compute what the torch model computes? Top-1 agreement of two
models' logits (ties at an INT8 file's top counted as agreeing), and a torch model's logits
on uint8 images, fed the way every runtime is fed (float in [0, 1])."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn as nn


@torch.no_grad()
def torch_predict(model: nn.Module, x_uint8: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Logits of ``model`` on uint8 images (converted to [0, 1]) as a float32 array."""
    outs = []
    for i in range(0, len(x_uint8), batch_size):
        x = x_uint8[i : i + batch_size].float().div_(255.0)
        outs.append(model(x).float().numpy())
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def parity(torch_logits: np.ndarray, artifact_logits: np.ndarray) -> dict[str, Any]:
    """Top-1 agreement (fraction) and max |logit difference| between two models' outputs.

    An INT8 file's logits are quantized, so two classes can tie exactly at the top; its
    argmax then picks the lower index, an arbitrary choice. An image agrees when the torch
    model's top-1 class is one of the artifact's top-scoring classes (ties included);
    ``tied_top1`` counts the images that agree only through such a tie.

    Args:
        torch_logits: (N, classes) logits of the torch model.
        artifact_logits: (N, classes) logits of the exported file on the same images.

    Returns:
        ``samples``, ``top1_agreement`` (fraction), ``tied_top1`` (images),
        ``max_abs_logit_diff``.
    """
    n = len(torch_logits)
    if not n:
        return {"samples": 0, "top1_agreement": 1.0, "tied_top1": 0, "max_abs_logit_diff": 0.0}
    top = torch_logits.argmax(1)
    strict = top == artifact_logits.argmax(1)
    best = artifact_logits.max(1)
    tied = artifact_logits[np.arange(n), top] >= best  # an exact tie at the artifact's top
    agree = strict | tied
    diff = float(np.abs(torch_logits - artifact_logits).max())
    return {
        "samples": n,
        "top1_agreement": float(agree.mean()),
        "tied_top1": int((agree & ~strict).sum()),
        "max_abs_logit_diff": diff,
    }
