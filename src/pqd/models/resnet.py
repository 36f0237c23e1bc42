"""CIFAR ResNets (BasicBlock, post-activation, 1x1 conv+BN projection shortcuts).

Counts at 32x32 for 10 classes (MACs: conv + linear multiply-accumulates per image):

========  ==========  =========
name      params      MACs
========  ==========  =========
resnet18  11,173,962  555.4 M
resnet34  21,282,122  1.159 G
resnet20  272,474     40.8 M
resnet32  466,906     69.1 M
resnet56  855,770     125.8 M
========  ==========  =========
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from pqd.models._common import ConvBN, ZooNet, init_weights, pool_linear, spaced_exits
from pqd.registry import register_model


class BasicBlock(nn.Module):
    """conv3x3-bn-relu-[dropout]-conv3x3-bn, ``out = out + shortcut``, relu.

    The shortcut is identity, or 1x1 conv+BN when the stride or width changes.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu1 = nn.ReLU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = (
            ConvBN(in_ch, out_ch, kernel_size=1, stride=stride, act=None)
            if stride != 1 or in_ch != out_ch
            else nn.Identity()
        )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dropout(self.relu1(self.bn1(self.conv1(x))))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return self.relu2(out)


class ResNet(ZooNet):
    """3x3 stem conv (stride 1, no max-pool), then stages of BasicBlocks.

    Stage ``i`` has ``blocks[i]`` blocks of width ``widths[i]``; every stage after the
    first starts with a stride-2 block. ``features`` = stem, then one child per block.
    """

    def __init__(
        self,
        blocks: Sequence[int],
        widths: Sequence[int],
        num_classes: int = 10,
        stem_width: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        if len(blocks) != len(widths) or not blocks or min(blocks) < 1:
            raise ValueError(
                f"blocks {tuple(blocks)} and widths {tuple(widths)} must be "
                "non-empty, of equal length, with at least one block per stage"
            )
        stem = widths[0] if stem_width is None else stem_width
        layers: list[nn.Module] = [ConvBN(3, stem)]
        in_ch = stem
        for i, (n, w) in enumerate(zip(blocks, widths, strict=True)):
            for j in range(n):
                layers.append(BasicBlock(in_ch, w, 2 if i > 0 and j == 0 else 1, dropout))
                in_ch = w
        super().__init__(
            nn.Sequential(*layers), pool_linear(in_ch, num_classes), spaced_exits(sum(blocks))
        )
        init_weights(self)


@register_model
def resnet18(num_classes: int = 10, **kwargs) -> nn.Module:
    """CIFAR ResNet-18 (blocks 2,2,2,2; widths 64..512): 11.17 M params, 0.555 GMACs at 32x32."""
    return ResNet((2, 2, 2, 2), (64, 128, 256, 512), num_classes, **kwargs)


@register_model
def resnet34(num_classes: int = 10, **kwargs) -> nn.Module:
    """CIFAR ResNet-34 (blocks 3,4,6,3; widths 64..512): 21.28 M params, 1.159 GMACs at 32x32."""
    return ResNet((3, 4, 6, 3), (64, 128, 256, 512), num_classes, **kwargs)


def _he_resnet(depth: int, num_classes: int, **kwargs) -> ResNet:
    """He et al. CIFAR ResNet-``depth`` (6n+2): 3 stages of n blocks, widths 16/32/64,
    1x1 conv+BN projection shortcuts (option B) where the shape changes."""
    n = (depth - 2) // 6
    return ResNet((n, n, n), (16, 32, 64), num_classes, **kwargs)


@register_model
def resnet20(num_classes: int = 10, **kwargs) -> nn.Module:
    """He et al. CIFAR ResNet-20 (option B shortcuts): 272 k params, 40.8 MMACs at 32x32."""
    return _he_resnet(20, num_classes, **kwargs)


@register_model
def resnet32(num_classes: int = 10, **kwargs) -> nn.Module:
    """He et al. CIFAR ResNet-32 (option B shortcuts): 467 k params, 69.1 MMACs at 32x32."""
    return _he_resnet(32, num_classes, **kwargs)


@register_model
def resnet56(num_classes: int = 10, **kwargs) -> nn.Module:
    """He et al. CIFAR ResNet-56 (option B shortcuts): 856 k params, 125.8 MMACs at 32x32."""
    return _he_resnet(56, num_classes, **kwargs)


@register_model
def tiny_resnet(num_classes: int = 10, **kwargs) -> nn.Module:
    """Test net: 8-wide stem, an identity block (8), a stride-2 projection block (16):
    5.3 k params, 2.3 MMACs at 32x32."""
    net = ResNet((1, 1), (8, 16), num_classes, **kwargs)
    net.default_exit_points = [0, 1]
    return net
