"""Wide ResNets for CIFAR, in the post-activation layout.

Zagoruyko & Komodakis use pre-activation blocks (bn-relu-conv); here every block is
conv-bn-relu(-dropout)-conv-bn, ``out = out + shortcut``, relu, so that each BatchNorm
directly follows (and folds into) its conv for INT8. Same widths and depth as the paper:
stem conv 16, three stages of ``(depth - 4) / 6`` blocks of width 16k / 32k / 64k, with a
1x1 conv+BN projection where the shape changes.

Counts at 32x32 for 10 classes: wrn28_10 36.49 M params, 5.243 GMACs;
wrn16_4 2.75 M params, 0.393 GMACs.
"""

from __future__ import annotations

import torch.nn as nn

from pqd.errors import ModelError
from pqd.models.resnet import ResNet
from pqd.registry import register_model


class WideResNet(ResNet):
    """WRN-``depth``-``widen_factor`` (post-activation, see module doc)."""

    def __init__(
        self, depth: int = 28, widen_factor: int = 10, num_classes: int = 10, dropout: float = 0.0
    ) -> None:
        if depth < 10 or (depth - 4) % 6 != 0 or widen_factor < 1:
            raise ModelError(
                f"wrn: depth={depth}, widen_factor={widen_factor} is not a Wide ResNet",
                "use depth = 6n + 4 (10, 16, 22, 28, 40, ...) and widen_factor >= 1",
            )
        n = (depth - 4) // 6
        k = widen_factor
        super().__init__(
            (n, n, n), (16 * k, 32 * k, 64 * k), num_classes, stem_width=16, dropout=dropout
        )


@register_model
def wrn(
    num_classes: int = 10, depth: int = 28, widen_factor: int = 10, dropout: float = 0.0, **kwargs
) -> nn.Module:
    """Wide ResNet of any ``depth`` (6n+4) and ``widen_factor``; dropout between the convs."""
    return WideResNet(depth, widen_factor, num_classes, dropout, **kwargs)


@register_model
def wrn28_10(num_classes: int = 10, dropout: float = 0.0, **kwargs) -> nn.Module:
    """WRN-28-10 (post-activation): 36.49 M params, 5.243 GMACs at 32x32."""
    return WideResNet(28, 10, num_classes, dropout, **kwargs)


@register_model
def wrn16_4(num_classes: int = 10, dropout: float = 0.0, **kwargs) -> nn.Module:
    """WRN-16-4 (post-activation): 2.75 M params, 0.393 GMACs at 32x32."""
    return WideResNet(16, 4, num_classes, dropout, **kwargs)
