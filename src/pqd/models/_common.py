"""Building blocks shared by the zoo nets, and the structural contract they follow.

Every zoo net is a :class:`ZooNet`: ``features`` (an ``nn.Sequential`` of blocks: stem,
then one child per residual / VGG / inverted-residual block), ``classifier`` (global
average pool, flatten, linear) and ``default_exit_points`` (indices into ``features``
after which an early-exit head makes sense). ``forward(x) = classifier(features(x))``.

INT8 rules (torch.export + torchao X86InductorQuantizer + onnxruntime): every conv is
directly followed by its BatchNorm2d (conv has ``bias=False``), numeric padding only,
ReLU modules (ReLU6 only in MobileNetV2), residual adds as ``out = out + shortcut``
followed by a ReLU, no data-dependent control flow in ``forward``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn


class ZooNet(nn.Module):
    """``features`` then ``classifier``; ``default_exit_points`` index into ``features``."""

    def __init__(
        self, features: nn.Sequential, classifier: nn.Module, default_exit_points: list[int]
    ) -> None:
        super().__init__()
        self.features = features
        self.classifier = classifier
        self.default_exit_points = list(default_exit_points)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def own_key_of(self, key: str) -> str | None:
        """This net's name for parameter/buffer ``key`` of another layout (e.g. torchvision's
        ``layer1.0.conv1.weight``), or None when ``key`` is not such a name. The zoo nets
        whose own names differ from torchvision's override this; the default knows none."""
        return None

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # rename keys of the other layout (own_key_of) before nn.Module loads: so that
        # load_state_dict takes a torchvision state_dict as is (the children load after this)
        for key in [k for k in state_dict if k.startswith(prefix)]:
            own = self.own_key_of(key[len(prefix) :])
            if own is not None and prefix + own not in state_dict:
                state_dict[prefix + own] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args)


class ConvBN(nn.Sequential):
    """conv (bias=False) -> BatchNorm2d -> optional activation module."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        act: type[nn.Module] | None = nn.ReLU,
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(
                in_ch,
                out_ch,
                kernel_size,
                stride=stride,
                padding=(kernel_size - 1) // 2,
                groups=groups,
                bias=False,
            ),
            nn.BatchNorm2d(out_ch),
        ]
        if act is not None:
            layers.append(act())
        super().__init__(*layers)


def expand_depthwise(
    conv_bn: Callable[..., nn.Module],
    in_ch: int,
    hidden: int,
    kernel_size: int,
    stride: int,
    act: type[nn.Module],
) -> list[nn.Module]:
    """The first layers of an inverted-residual block: a 1x1 expand ``conv_bn`` to ``hidden``
    channels (only when that widens ``in_ch``), then the depthwise ``kernel_size`` conv, both
    with ``act``. ``conv_bn(in, out, kernel, stride, groups=, act=)`` is :class:`ConvBN` or a
    net's own variant (other BatchNorm settings)."""
    layers: list[nn.Module] = []
    if hidden != in_ch:
        layers.append(conv_bn(in_ch, hidden, 1, act=act))
    layers.append(conv_bn(hidden, hidden, kernel_size, stride, groups=hidden, act=act))
    return layers


class InvertedResidualBlock(nn.Module):
    """A MobileNet block: ``layers`` in one ``nn.Sequential`` held under ``body_name`` (the
    name the state_dict keys carry: torchvision's ``conv`` in MobileNetV2, ``block`` in
    MobileNetV3), plus ``x`` when the block keeps the shape (stride 1, width unchanged;
    fixed at build time)."""

    def __init__(
        self, body_name: str, layers: list[nn.Module], in_ch: int, out_ch: int, stride: int
    ) -> None:
        super().__init__()
        self.body_name = body_name
        self.add_module(body_name, nn.Sequential(*layers))
        self.use_residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = getattr(self, self.body_name)(x)
        if self.use_residual:
            out = out + x
        return out


def pool_linear(in_features: int, num_classes: int) -> nn.Sequential:
    """Global average pool -> flatten -> linear (the classifier of every zoo net)."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_features, num_classes))


class PooledHead(nn.Sequential):
    """Global average pool and flatten, then the given layers (a classifier whose layers keep
    torchvision's indices: ``PooledHead(nn.Dropout(0.2), nn.Linear(...))`` has
    ``1.weight`` as torchvision's MobileNet ``classifier.1.weight``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def spaced_exits(n_blocks: int, offset: int = 1) -> list[int]:
    """Indices about 1/3 and 2/3 through ``n_blocks`` blocks, block ``k`` (1-based) at
    ``features[k - 1 + offset]``; never after the last block."""
    if n_blocks < 2:
        return []
    blocks = {min(max(round(n_blocks * k / 3), 1), n_blocks - 1) for k in (1, 2)}
    return sorted(b - 1 + offset for b in blocks)


def init_weights(model: nn.Module, linear_std: float | None = None) -> None:
    """Kaiming-normal (fan_out) convs, unit/zero BatchNorm; then, with ``linear_std`` (the
    MobileNets': 0.01), normal linears with zero bias, else linears keep PyTorch's default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if linear_std is None:
        return
    for m in model.modules():  # after every conv: the order of the random draws is fixed
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, linear_std)
            nn.init.zeros_(m.bias)
