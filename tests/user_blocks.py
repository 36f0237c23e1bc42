"""A user model in the held-out style, loaded as ``user_blocks:build`` (``module:callable``)
by tests/test_cli.py: written as a user would, not with pqd's zoo helpers.

Depthwise convs, a squeeze-excite gate (``torch.sigmoid`` and ``*``), SiLU, ``torch.cat``
and functional residuals (``torch.add`` and ``+``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    """Depthwise 3x3 + pointwise 1x1 (both conv-BN), squeeze-excite, ``torch.add`` residual."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(ch, ch, 3, padding=1, groups=ch, bias=False)
        self.dw_bn = nn.BatchNorm2d(ch)
        self.pw = nn.Conv2d(ch, ch, 1, bias=False)
        self.pw_bn = nn.BatchNorm2d(ch)
        self.squeeze = nn.Conv2d(ch, ch // 4, 1)
        self.excite = nn.Conv2d(ch // 4, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.silu(self.dw_bn(self.dw(x)))
        y = self.pw_bn(self.pw(y))
        gate = torch.sigmoid(self.excite(F.relu(self.squeeze(F.adaptive_avg_pool2d(y, 1)))))
        return torch.add(x, y * gate)


class UserNet(nn.Module):
    """Stem, two branches concatenated, two blocks, a ``+`` shortcut and a linear head."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.a = nn.Sequential(nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Sequential(
            nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        )
        self.block1 = Block(32)
        self.down = nn.Sequential(
            nn.Conv2d(32, 48, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(48), nn.ReLU()
        )
        self.block2 = Block(48)
        self.fc = nn.Linear(48, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = torch.cat([self.a(x), self.b(x)], dim=1)
        x = self.block1(x)
        x = self.down(x)
        x = self.block2(x) + x
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build(num_classes: int = 10) -> nn.Module:
    """The user's builder: ``model: {name: "user_blocks:build"}``."""
    return UserNet(num_classes)
