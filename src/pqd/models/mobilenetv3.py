"""MobileNetV3 (small and large), ImageNet layout, torchvision's parameter names.

Squeeze-and-excitation blocks (``fc1``/``fc2`` 1x1 convs with bias, ReLU, hardsigmoid,
``scale * x``) and hardswish activations, as in torchvision; BatchNorm with ``eps=0.001``,
``momentum=0.01``. The names are torchvision's (``features.1.block.0.0.weight``,
``features.1.block.1.fc1.weight``, ``classifier.0.weight``, ``classifier.3.weight``), so a
torchvision state_dict loads as is. ``features`` = stem, the blocks, the last 1x1 conv;
``classifier`` = pool, flatten, then torchvision's ``Linear, Hardswish, Dropout, Linear``.

Not INT8-friendly by the zoo's rules (see :mod:`pqd.models._common`): the SE convs have a
bias and no BatchNorm, and hardswish/hardsigmoid and the SE product are not fused by the
x86 INT8 kernels, so its INT8 speed-up is smaller than MobileNetV2's; every stage runs.

Counts for 1000 classes (asserted in the tests): small 2,542,856 params, 56.5 MMACs at
224x224; large 5,483,032 params, 217 MMACs.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from pqd.models._common import (
    InvertedResidualBlock,
    PooledHead,
    ZooNet,
    expand_depthwise,
    init_weights,
)
from pqd.models.mobilenetv2 import _divisible
from pqd.registry import register_model

# (in, kernel, expanded, out, squeeze-excite, hardswish, stride): torchvision's tables
_SMALL = (
    (16, 3, 16, 16, True, False, 2),
    (16, 3, 72, 24, False, False, 2),
    (24, 3, 88, 24, False, False, 1),
    (24, 5, 96, 40, True, True, 2),
    (40, 5, 240, 40, True, True, 1),
    (40, 5, 240, 40, True, True, 1),
    (40, 5, 120, 48, True, True, 1),
    (48, 5, 144, 48, True, True, 1),
    (48, 5, 288, 96, True, True, 2),
    (96, 5, 576, 96, True, True, 1),
    (96, 5, 576, 96, True, True, 1),
)
_LARGE = (
    (16, 3, 16, 16, False, False, 1),
    (16, 3, 64, 24, False, False, 2),
    (24, 3, 72, 24, False, False, 1),
    (24, 5, 72, 40, True, False, 2),
    (40, 5, 120, 40, True, False, 1),
    (40, 5, 120, 40, True, False, 1),
    (40, 3, 240, 80, False, True, 2),
    (80, 3, 200, 80, False, True, 1),
    (80, 3, 184, 80, False, True, 1),
    (80, 3, 184, 80, False, True, 1),
    (80, 3, 480, 112, True, True, 1),
    (112, 3, 672, 112, True, True, 1),
    (112, 5, 672, 160, True, True, 2),
    (160, 5, 960, 160, True, True, 1),
    (160, 5, 960, 160, True, True, 1),
)


def _conv_bn(
    in_ch: int,
    out_ch: int,
    kernel_size: int = 1,
    stride: int = 1,
    groups: int = 1,
    act: type[nn.Module] | None = None,
) -> nn.Sequential:
    """torchvision's Conv2dNormActivation with MobileNetV3's BatchNorm (eps 1e-3, momentum
    0.01): conv (bias=False) -> BN -> optional activation."""
    layers: list[nn.Module] = [
        nn.Conv2d(
            in_ch, out_ch, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False
        ),
        nn.BatchNorm2d(out_ch, eps=0.001, momentum=0.01),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    """torchvision's SqueezeExcitation: ``x * hardsigmoid(fc2(relu(fc1(avgpool(x)))))``."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.fc2(self.activation(self.fc1(self.avgpool(x))))
        return self.scale_activation(scale) * x


class InvertedResidualV3(InvertedResidualBlock):
    """``block`` = [1x1 expand] -> depthwise -> [squeeze-excite] -> 1x1 project (no
    activation); ``+ x`` at stride 1 with the width unchanged."""

    def __init__(
        self, in_ch: int, kernel: int, hidden: int, out_ch: int, se: bool, hs: bool, stride: int
    ) -> None:
        act = nn.Hardswish if hs else nn.ReLU
        layers = expand_depthwise(_conv_bn, in_ch, hidden, kernel, stride, act)
        if se:
            layers.append(SqueezeExcitation(hidden, _divisible(hidden // 4, 8)))
        layers.append(_conv_bn(hidden, out_ch))
        super().__init__("block", layers, in_ch, out_ch, stride)


class MobileNetV3(ZooNet):
    """torchvision's MobileNetV3 as a zoo net (see the module doc).

    Args:
        cfg: the block table (``_SMALL`` or ``_LARGE``).
        last_channel: width of the classifier's hidden linear layer (1024 small, 1280 large).
        num_classes: outputs of the last linear layer.
        width_mult: scales every width (multiples of 8), as torchvision's ``_width_mult``.
        dropout: dropout before the last linear layer (torchvision: 0.2).
        exits: default exit points (indices into ``features``).
    """

    def __init__(
        self,
        cfg: tuple[tuple[int, int, int, int, bool, bool, int], ...],
        last_channel: int,
        num_classes: int,
        width_mult: float,
        dropout: float,
        exits: list[int],
    ) -> None:
        if width_mult <= 0 or not 0 <= dropout < 1:
            raise ValueError(f"width_mult {width_mult} must be > 0, dropout {dropout} in [0, 1)")

        def w(c: int) -> int:
            return _divisible(c * width_mult, 8)

        layers: list[nn.Module] = [_conv_bn(3, w(cfg[0][0]), 3, 2, act=nn.Hardswish)]
        for in_ch, k, hidden, out_ch, se, hs, s in cfg:
            layers.append(InvertedResidualV3(w(in_ch), k, w(hidden), w(out_ch), se, hs, s))
        last_in = w(cfg[-1][3])
        layers.append(_conv_bn(last_in, 6 * last_in, act=nn.Hardswish))
        hidden = w(last_channel)
        head = PooledHead(
            nn.Linear(6 * last_in, hidden),
            nn.Hardswish(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        super().__init__(nn.Sequential(*layers), head, exits)
        init_weights(self, linear_std=0.01)


@register_model
def mobilenetv3_small(
    num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2
) -> nn.Module:
    """torchvision MobileNetV3-Small: 2.54 M params for 1000 classes, 56.5 MMACs at 224x224.
    Exits after the 24- and 48-channel stages (features 3 and 8)."""
    return MobileNetV3(_SMALL, 1024, num_classes, width_mult, dropout, [3, 8])


@register_model
def mobilenetv3_large(
    num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2
) -> nn.Module:
    """torchvision MobileNetV3-Large: 5.48 M params for 1000 classes, 217 MMACs at 224x224.
    Exits after the 40- and 112-channel stages (features 6 and 12)."""
    return MobileNetV3(_LARGE, 1280, num_classes, width_mult, dropout, [6, 12])
