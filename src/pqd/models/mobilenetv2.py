"""MobileNetV2 for CIFAR (as in the common kuangliu/pytorch-cifar version).

Adapted for 32x32: the stem conv and the first 24-channel stage have stride 1 (32x32 ->
4x4 overall instead of 224 -> 7). Inverted residual blocks (1x1 expand, 3x3 depthwise,
1x1 linear projection, each conv followed by BN; ReLU6 after the first two) with the
residual add only when stride is 1 and the width is unchanged (as in the paper; kuangliu
adds conv shortcuts elsewhere). The expand conv is skipped when the expansion is 1.

``features`` = stem, the 17 blocks, the 1x1 conv to 1280 channels (19 children).
Counts at 32x32 for 10 classes (width_mult 1.0): 2.24 M params, 88.0 MMACs.
"""

from __future__ import annotations

import torch.nn as nn

from pqd.models._common import (
    ConvBN,
    InvertedResidualBlock,
    ZooNet,
    expand_depthwise,
    init_weights,
    pool_linear,
    spaced_exits,
)
from pqd.registry import register_model

# (expansion, out channels, blocks, stride of the first block): torchvision's, for ImageNet
# (pqd.models.imagenet)
_IMAGENET_CFG = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
# for 32x32: the 24-channel stage keeps stride 1
_CFG = tuple((t, c, n, 1 if c == 24 else s) for t, c, n, s in _IMAGENET_CFG)


def _divisible(v: float, divisor: int = 8) -> int:
    """Round ``v`` to a multiple of ``divisor`` without going more than 10% down."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


class InvertedResidual(InvertedResidualBlock):
    """[1x1 expand-bn-relu6] -> 3x3 depthwise-bn-relu6 -> 1x1 project-bn (+ x)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int) -> None:
        hidden = in_ch * expansion
        layers = expand_depthwise(ConvBN, in_ch, hidden, 3, stride, nn.ReLU6)
        layers.append(ConvBN(hidden, out_ch, kernel_size=1, act=None))
        super().__init__("conv", layers, in_ch, out_ch, stride)


class MobileNetV2(ZooNet):
    """CIFAR MobileNetV2; ``width_mult`` scales every width (rounded to multiples of 8)."""

    def __init__(self, num_classes: int = 10, width_mult: float = 1.0) -> None:
        if width_mult <= 0:
            raise ValueError(f"width_mult must be > 0, got {width_mult}")
        in_ch = _divisible(32 * width_mult)
        last = _divisible(1280 * max(1.0, width_mult))
        layers: list[nn.Module] = [ConvBN(3, in_ch, act=nn.ReLU6)]
        for t, c, n, s in _CFG:
            out_ch = _divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t))
                in_ch = out_ch
        n_blocks = len(layers) - 1
        layers.append(ConvBN(in_ch, last, kernel_size=1, act=nn.ReLU6))
        super().__init__(
            nn.Sequential(*layers), pool_linear(last, num_classes), spaced_exits(n_blocks)
        )
        init_weights(self, linear_std=0.01)


@register_model
def mobilenetv2(num_classes: int = 10, width_mult: float = 1.0, **kwargs) -> nn.Module:
    """CIFAR MobileNetV2: 2.24 M params, 88.0 MMACs at 32x32 (width_mult 1.0)."""
    return MobileNetV2(num_classes, width_mult, **kwargs)
