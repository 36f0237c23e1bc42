"""ImageNet-style zoo nets with torchvision's parameter names: ResNet-18/34/50 and MobileNetV2.

Unlike the CIFAR variants (3x3 stride-1 stems, made for 32x32), these keep torchvision's
ImageNet layout: a 7x7 stride-2 stem and a 3x3 max-pool for the ResNets, a stride-2 stem
for MobileNetV2; the network reduces its input 32 times (224 -> 7, 64 -> 2). Any input
of 32 pixels or more works (global average pooling before the classifier).

**torchvision checkpoints load as is.** A torchvision state_dict (``torch.save(
torchvision.models.resnet18().state_dict(), ...)``) loads with ``load_state_dict`` (and
through ``baseline.checkpoint``) into the zoo net of the same name and width:

* MobileNetV2's own names *are* torchvision's (``features.0.0.weight``,
  ``features.1.conv.0.0.weight``, ``classifier.1.weight``).
* A ResNet follows the zoo contract (``features`` = stem, then one child per block), so its
  own names are ``features.0.0.weight`` (stem conv), ``features.3.conv1.weight``,
  ``features.3.downsample.0.weight``, ``classifier.2.weight``; torchvision's
  ``conv1.*``, ``bn1.*``, ``layer<i>.<j>.*`` and ``fc.*`` are renamed on load
  (:meth:`ResNetImageNet.own_key_of`, used by :meth:`ZooNet._load_from_state_dict` and by
  :func:`pqd.checkpoint.load_checkpoint`). ``state_dict()`` gives the zoo names.

Differences from torchvision that leave the weights and the function unchanged: ReLUs are
separate, non-inplace modules (one per use), and the residual add is ``out + shortcut``.

Counts for 1000 classes (torchvision's own: the parameter counts are asserted in the
tests) and MACs at 224x224 / 64x64:

====================  ==========  =========  ========
name                  params      MACs 224   MACs 64
====================  ==========  =========  ========
resnet18_imagenet     11,689,512  1.814 G    148.6 M
resnet34_imagenet     21,797,672  3.664 G    299.5 M
resnet50_imagenet     25,557,032  4.089 G    335.7 M
mobilenetv2_imagenet  3,504,872   300.8 M    25.7 M
====================  ==========  =========  ========
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn as nn

from pqd.models._common import (
    ConvBN,
    InvertedResidualBlock,
    PooledHead,
    ZooNet,
    expand_depthwise,
    init_weights,
    pool_linear,
)
from pqd.models.mobilenetv2 import _IMAGENET_CFG, _divisible
from pqd.registry import register_model


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: conv3x3(stride)-bn-relu-conv3x3-bn, ``+ downsample(x)``, relu.

    ``downsample`` (1x1 conv stride s + BN, ``nn.Sequential``) exists only when the stride
    or the width changes, as in torchvision.
    """

    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(in_ch, planes, stride)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.downsample(x)
        return self.relu2(out)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (ResNet v1.5: the stride on the 3x3 conv): 1x1 -> 3x3(stride)
    -> 1x1 to ``4 * planes``, each with BN (ReLU after the first two), ``+ downsample(x)``,
    relu."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(planes, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.downsample = _downsample(in_ch, out_ch, stride)
        self.relu3 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = out + self.downsample(x)
        return self.relu3(out)


def _downsample(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    """1x1 conv (stride) + BN when the shape changes (torchvision's ``downsample.0/1``),
    else the identity."""
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    return ConvBN(in_ch, out_ch, kernel_size=1, stride=stride, act=None)


_TV_LAYER = re.compile(r"layer(\d+)\.(\d+)\.(.+)")


class ResNetImageNet(ZooNet):
    """torchvision's ResNet as a zoo net: ``features`` = stem (7x7/2 conv, BN, ReLU, 3x3/2
    max-pool), then one child per block; ``classifier`` = pool, flatten, linear.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        blocks: blocks per stage (torchvision's ``layers``), e.g. ``(2, 2, 2, 2)``.
        num_classes: outputs of the linear layer.
        width: width of the stem and the first stage (64 in torchvision; stage ``i`` has
            ``width * 2**i`` planes). Other widths are for tests and small budgets; a
            torchvision checkpoint needs 64.

    The default exit points are the ends of the second and third stages.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        blocks: Sequence[int],
        num_classes: int = 1000,
        width: int = 64,
    ) -> None:
        if not blocks or min(blocks) < 1 or width < 1:
            raise ValueError(
                f"blocks {tuple(blocks)} need at least one block per stage and width {width} "
                "must be >= 1"
            )
        stem = nn.Sequential(
            nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        layers: list[nn.Module] = [stem]
        in_ch = width
        for i, n in enumerate(blocks):
            planes = width * 2**i
            for j in range(n):
                layers.append(block(in_ch, planes, 2 if i > 0 and j == 0 else 1))
                in_ch = planes * block.expansion
        ends = [sum(blocks[: i + 1]) for i in range(len(blocks))]  # index of each stage's end
        exits = [e for e in ends[1:3] if e < sum(blocks)] or ends[:1]
        super().__init__(nn.Sequential(*layers), pool_linear(in_ch, num_classes), exits)
        self.stage_starts = [1 + sum(blocks[:i]) for i in range(len(blocks))]
        init_weights(self)

    def own_key_of(self, key: str) -> str | None:
        """The zoo name of torchvision parameter/buffer ``key`` (``conv1.weight`` ->
        ``features.0.0.weight``, ``layer2.0.downsample.0.weight`` ->
        ``features.3.downsample.0.weight`` for ResNet-18, ``fc.bias`` ->
        ``classifier.2.bias``); None for a key that is not torchvision's."""
        head, _, rest = key.partition(".")
        if head == "conv1" and rest:
            return f"features.0.0.{rest}"
        if head == "bn1" and rest:
            return f"features.0.1.{rest}"
        if head == "fc" and rest:
            return f"classifier.2.{rest}"
        found = _TV_LAYER.fullmatch(key)
        if found is None:
            return None
        stage, j, tail = int(found.group(1)), int(found.group(2)), found.group(3)
        if not 1 <= stage <= len(self.stage_starts):
            return None
        return f"features.{self.stage_starts[stage - 1] + j}.{tail}"


def _resnet(
    block: type[BasicBlock] | type[Bottleneck],
    blocks: Sequence[int],
    num_classes: int,
    width: int = 64,
) -> ResNetImageNet:
    return ResNetImageNet(block, blocks, num_classes, width)


@register_model
def resnet18_imagenet(num_classes: int = 1000, width: int = 64) -> nn.Module:
    """torchvision ResNet-18 (ImageNet stem; torchvision names): 11.69 M params for 1000
    classes, 1.81 GMACs at 224x224, 149 MMACs at 64x64."""
    return _resnet(BasicBlock, (2, 2, 2, 2), num_classes, width)


@register_model
def resnet34_imagenet(num_classes: int = 1000, width: int = 64) -> nn.Module:
    """torchvision ResNet-34 (ImageNet stem; torchvision names): 21.80 M params for 1000
    classes, 3.66 GMACs at 224x224."""
    return _resnet(BasicBlock, (3, 4, 6, 3), num_classes, width)


@register_model
def resnet50_imagenet(num_classes: int = 1000, width: int = 64) -> nn.Module:
    """torchvision ResNet-50 v1.5 (bottlenecks; torchvision names): 25.56 M params for 1000
    classes, 4.09 GMACs at 224x224."""
    return _resnet(Bottleneck, (3, 4, 6, 3), num_classes, width)


class InvertedResidualV2(InvertedResidualBlock):
    """torchvision's MobileNetV2 block: ``conv`` = [ConvBN 1x1 expand, ReLU6] -> ConvBN 3x3
    depthwise, ReLU6 -> 1x1 conv -> BN (``+ x`` at stride 1 with the width unchanged)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int) -> None:
        hidden = in_ch * expansion
        layers = expand_depthwise(ConvBN, in_ch, hidden, 3, stride, nn.ReLU6)
        layers += [nn.Conv2d(hidden, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch)]
        super().__init__("conv", layers, in_ch, out_ch, stride)


class MobileNetV2ImageNet(ZooNet):
    """torchvision's MobileNetV2 (stride-2 stem, 32x reduction), its names unchanged:
    ``features`` = stem, 17 blocks, 1x1 conv to 1280; ``classifier`` = pool, flatten, then
    torchvision's ``Dropout, Linear`` (``classifier.1``).

    Args:
        num_classes: outputs of the linear layer.
        width_mult: scales every width (multiples of 8), as torchvision's.
        dropout: dropout before the linear layer (torchvision: 0.2).
    """

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2):
        if width_mult <= 0 or not 0 <= dropout < 1:
            raise ValueError(f"width_mult {width_mult} must be > 0, dropout {dropout} in [0, 1)")
        in_ch = _divisible(32 * width_mult)
        last = _divisible(1280 * max(1.0, width_mult))
        layers: list[nn.Module] = [ConvBN(3, in_ch, stride=2, act=nn.ReLU6)]
        for t, c, n, s in _IMAGENET_CFG:
            out_ch = _divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidualV2(in_ch, out_ch, s if i == 0 else 1, t))
                in_ch = out_ch
        layers.append(ConvBN(in_ch, last, kernel_size=1, act=nn.ReLU6))
        head = PooledHead(nn.Dropout(dropout), nn.Linear(last, num_classes))
        # exits at the ends of the 32- and 96-channel stages (features 6 and 13)
        super().__init__(nn.Sequential(*layers), head, [6, 13])
        init_weights(self, linear_std=0.01)


@register_model
def mobilenetv2_imagenet(
    num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2
) -> nn.Module:
    """torchvision MobileNetV2 (torchvision names): 3.50 M params for 1000 classes,
    301 MMACs at 224x224."""
    return MobileNetV2ImageNet(num_classes, width_mult, dropout)
