"""Tiny nets for unit tests (forward+backward on 8x3x32x32 in milliseconds).

``tiny_resnet`` lives in :mod:`pqd.models.resnet` (it is a 2-block ResNet).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from pqd.models._common import ConvBN, ZooNet, init_weights, pool_linear
from pqd.registry import register_model


@register_model
def tiny_cnn(num_classes: int = 10, **kwargs) -> nn.Module:
    """Stem conv 3->8, conv-bn-relu-maxpool blocks of 8 and 16: 2.2 k params, 1.1 MMACs."""
    if kwargs:
        raise TypeError(f"tiny_cnn() got unexpected keyword arguments {sorted(kwargs)}")
    features = nn.Sequential(
        ConvBN(3, 8),
        nn.Sequential(ConvBN(8, 8), nn.MaxPool2d(2)),
        nn.Sequential(ConvBN(8, 16), nn.MaxPool2d(2)),
    )
    net = ZooNet(features, pool_linear(16, num_classes), [0, 1])
    init_weights(net)
    return net


class _SqueezeExcite(nn.Module):
    """Global average pool -> 1x1 conv -> ReLU -> 1x1 conv -> hardsigmoid -> x * gate."""

    def __init__(self, ch: int, squeezed: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(ch, squeezed, 1)
        self.relu = nn.ReLU()
        self.expand = nn.Conv2d(squeezed, ch, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.expand(self.relu(self.reduce(self.pool(x)))))


class _BlocksNet(nn.Module):
    """Every block a mobile / user net brings (see :func:`tiny_blocks`)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.stem = ConvBN(3, 16, stride=2, act=nn.Hardswish)
        self.dw = ConvBN(16, 16, groups=16, act=nn.SiLU)
        self.grouped = ConvBN(16, 32, groups=4, act=nn.ReLU)
        self.se = _SqueezeExcite(32, 8)
        self.left = ConvBN(32, 16, kernel_size=1, act=nn.ReLU6)
        self.right = ConvBN(32, 16, act=nn.GELU)
        self.pool = nn.MaxPool2d(2)
        self.dw2 = ConvBN(32, 32, groups=32, act=nn.Hardswish)
        self.project = ConvBN(32, 32, kernel_size=1, act=None)
        self.avg = nn.AvgPool2d(2)
        self.head = ConvBN(32, 64, kernel_size=1, act=nn.ReLU)
        self.classifier = pool_linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.grouped(self.dw(self.stem(x)))
        x = self.se(x)
        x = torch.cat([self.left(x), self.right(x)], dim=1) + x  # concat, module-style add
        x = self.pool(x)
        x = torch.add(self.project(self.dw2(x)), x)  # functional residual
        return self.classifier(self.head(self.avg(x)))


@register_model
def tiny_blocks(num_classes: int = 10, **kwargs) -> nn.Module:
    """Depthwise and grouped convs, squeeze-excite (hardsigmoid gate), hardswish / SiLU /
    GELU / ReLU6, concatenation, ``+`` and ``torch.add`` residuals, max / average pooling
    and the pool-linear classifier: the INT8 export's block test net (11.9 k params)."""
    if kwargs:
        raise TypeError(f"tiny_blocks() got unexpected keyword arguments {sorted(kwargs)}")
    net = _BlocksNet(num_classes)
    init_weights(net)
    return net
