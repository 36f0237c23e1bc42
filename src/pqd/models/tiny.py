"""Tiny nets for unit tests (forward+backward on 8x3x32x32 in milliseconds).

``tiny_resnet`` lives in :mod:`pqd.models.resnet` (it is a 2-block ResNet).
"""

from __future__ import annotations

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
