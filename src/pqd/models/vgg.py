"""CIFAR VGG with BatchNorm: conv-bn-relu groups, a 2x2 max-pool closing each of the 5
groups, then global average pool + one Linear(512, num_classes).

``features`` has one child per group (5), so exits fall after groups 2 and 3.
Counts at 32x32 for 10 classes: vgg16_bn 14.73 M params, 0.313 GMACs;
vgg19_bn 20.04 M params, 0.398 GMACs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn

from pqd.models._common import ConvBN, ZooNet, init_weights, pool_linear, spaced_exits
from pqd.registry import register_model

_CFGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


class VGG(ZooNet):
    """Groups of conv-bn-relu, each group closed by MaxPool2d(2); ``features`` = groups."""

    def __init__(self, groups: Sequence[Sequence[int]], num_classes: int = 10) -> None:
        layers: list[nn.Module] = []
        in_ch = 3
        for widths in groups:
            group: list[nn.Module] = []
            for w in widths:
                group.append(ConvBN(in_ch, w))
                in_ch = w
            group.append(nn.MaxPool2d(2))
            layers.append(nn.Sequential(*group))
        super().__init__(
            nn.Sequential(*layers),
            pool_linear(in_ch, num_classes),
            spaced_exits(len(layers), offset=0),
        )
        init_weights(self)


@register_model
def vgg16_bn(num_classes: int = 10, **kwargs) -> nn.Module:
    """CIFAR VGG-16-BN: 14.73 M params, 0.313 GMACs at 32x32."""
    return VGG(_CFGS["vgg16"], num_classes, **kwargs)


@register_model
def vgg19_bn(num_classes: int = 10, **kwargs) -> nn.Module:
    """CIFAR VGG-19-BN: 20.04 M params, 0.398 GMACs at 32x32."""
    return VGG(_CFGS["vgg19"], num_classes, **kwargs)
