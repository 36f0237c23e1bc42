"""FastNet: a small, fast-to-train VGG-like net shaped after airbench94, made INT8-friendly
(3x3 conv stem instead of the whitening conv, BN directly after every conv, ReLU,
average-pool head instead of the global max-pool).

Layout: stem conv3x3(3->stem)-bn-relu; then per width ``w``: conv3x3(c->w)-bn-relu,
maxpool2, conv3x3(w->w)-bn-relu; with ``extra_conv`` a further conv3x3(w->w)-bn and a
residual add around the last two convs (``x = relu(x + conv(conv(x)))``).
``features`` = stem, then one child per block.

Counts at 32x32 for 10 classes (defaults widths 64/128/256, stem 32): 1.17 M params,
85.8 MMACs; with ``extra_conv``: 1.94 M params, 114.1 MMACs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from pqd.models._common import ConvBN, ZooNet, init_weights, pool_linear, spaced_exits
from pqd.registry import register_model


class FastBlock(nn.Module):
    """conv-bn-relu, maxpool2, conv-bn-relu [, conv-bn, + pooled input, relu]."""

    def __init__(self, in_ch: int, out_ch: int, extra_conv: bool = False) -> None:
        super().__init__()
        self.conv1 = ConvBN(in_ch, out_ch)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = ConvBN(out_ch, out_ch)
        self.extra_conv = extra_conv
        if extra_conv:
            self.conv3 = ConvBN(out_ch, out_ch, act=None)
            self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.conv1(x))
        if not self.extra_conv:  # fixed at build time, not data-dependent
            return self.conv2(x)
        out = self.conv3(self.conv2(x))
        out = out + x
        return self.relu(out)


class FastNet(ZooNet):
    """Stem then one :class:`FastBlock` per width (each halves the resolution)."""

    def __init__(
        self,
        num_classes: int = 10,
        widths: Sequence[int] = (64, 128, 256),
        stem: int = 32,
        extra_conv: bool = False,
    ) -> None:
        widths = tuple(int(w) for w in widths)
        if not widths or min(widths) < 1 or stem < 1:
            raise ValueError(f"widths {widths} and stem {stem} must be positive and non-empty")
        layers: list[nn.Module] = [ConvBN(3, stem)]
        in_ch = stem
        for w in widths:
            layers.append(FastBlock(in_ch, w, extra_conv))
            in_ch = w
        super().__init__(
            nn.Sequential(*layers), pool_linear(in_ch, num_classes), spaced_exits(len(widths))
        )
        init_weights(self)


@register_model
def fastnet(
    num_classes: int = 10,
    widths: Sequence[int] = (64, 128, 256),
    stem: int = 32,
    extra_conv: bool = False,
    **kwargs,
) -> nn.Module:
    """FastNet: 1.17 M params, 85.8 MMACs at 32x32 (defaults; see module doc)."""
    return FastNet(num_classes, widths, stem, extra_conv, **kwargs)


class FastNetQ8(ZooNet):
    """VGG-like plan shaped for INT8 CPU kernels: every conv runs before its pool, and no
    stage narrower than 8x8 (convs on 4x4 maps and 32-channel convs ran at about 2.5x
    INT8/FP32 in onnxruntime here, 128 and 256 channel convs on 16x16 / 8x8 maps at 3.6-4x).

    ``plan``: output widths, ``"M"`` for a 2x2 max-pool. The first entry is the stem;
    ``features`` = stem, then one block per pool-separated group. Wide convs on 4x4 maps
    are a different case: 256->512 and 512->512 at 4x4 ran 4.2-4.4x faster as INT8 here
    (FP32 onnxruntime is slow on such small maps, 62 GMAC/s); recipes/early-exit.yaml adds
    such a tail ``"M", 512, 512, 512`` (222 MMACs).
    """

    def __init__(
        self,
        num_classes: int = 10,
        plan: Sequence[int | str] = (24, 64, "M", 128, 128, "M", 256, 256),
    ) -> None:
        plan = list(plan)
        if (
            not plan
            or not isinstance(plan[0], int)
            or any(not (p == "M" or (isinstance(p, int) and p > 0)) for p in plan)
        ):
            raise ValueError(f"plan {plan} must start with a width and hold widths > 0 or 'M'")
        layers: list[nn.Module] = [ConvBN(3, plan[0])]
        in_ch = plan[0]
        block: list[nn.Module] = []
        for p in plan[1:]:
            if p == "M":
                layers.append(nn.Sequential(*block, nn.MaxPool2d(2)))
                block = []
            else:
                assert isinstance(p, int)  # checked above: a width unless "M"
                block.append(ConvBN(in_ch, p))
                in_ch = p
        if block:
            layers.append(nn.Sequential(*block))
        super().__init__(
            nn.Sequential(*layers), pool_linear(in_ch, num_classes), spaced_exits(len(layers) - 1)
        )
        init_weights(self)


@register_model
def fastnet_q8(
    num_classes: int = 10,
    plan: Sequence[int | str] = (24, 64, "M", 128, 128, "M", 256, 256),
    **kwargs,
) -> nn.Module:
    """FastNet-Q8: 1.12 M params, 128.1 MMACs at 32x32; about 3.1x faster as INT8 than FP32
    in onnxruntime at batch 1 on 2 cores here (fastnet: 2.7x)."""
    return FastNetQ8(num_classes, plan, **kwargs)
