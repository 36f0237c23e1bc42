"""The layers a latency model times: every conv/linear of a network and its channel groups.

A candidate of ``pqd plan`` is a removed fraction per channel group, so the latency model
must know, without surgery, which groups set each layer's input and output widths and how
many channels a group keeps (:func:`kept_channels`, rounded as the ``prune_channels`` stage
rounds them). Layers alike but for their widths share one lookup table (:meth:`Layer.family`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn


@dataclass(frozen=True)
class Layer:
    """One conv/linear of the network and the groups that set its widths."""

    name: str
    kind: str  # conv | linear
    cin: int
    cout: int
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    depthwise: bool = False
    groups: int = 1  # a grouped (not depthwise) conv keeps its group count
    height: int = 1  # input size
    width: int = 1
    in_group: str | None = None  # group root setting the input width (None: fixed)
    out_group: str | None = None

    def family(self) -> str:
        """Layers that share one lookup table: everything but the two widths."""
        if self.kind == "linear":
            return "linear"
        k, s, p, d = self.kernel, self.stride, self.padding, self.dilation
        g = "dw" if self.depthwise else f"g{self.groups}"
        return (
            f"conv:k{k[0]}x{k[1]}:s{s[0]}x{s[1]}:p{p[0]}x{p[1]}:d{d[0]}x{d[1]}:{g}"
            f":{self.height}x{self.width}"
        )


def piece_key(family: str, cin: int, cout: int) -> str:
    """Cache key of one piece: its family and widths."""
    return f"{family}:{cin}->{cout}"


def network_layers(
    model: nn.Module, example: torch.Tensor, exclude: Sequence[str] = ()
) -> tuple[list[Layer], dict[str, int]]:
    """Every conv/linear of an eager ``model`` with its groups, and each group's channels.

    Args:
        model: the unpruned eager network.
        example: an input batch (batch >= 1).
        exclude: fnmatch patterns of modules whose outputs are not pruned (as the stage's).

    Returns:
        ``(layers in forward order, {group root: channel count})``.
    """
    from pqd.prune.channels import channel_groups, run_with_layer_hooks

    dg, groups = channel_groups(model, example, exclude)
    names = {m: n for n, m in model.named_modules()}
    out_of: dict[str, str] = {}
    in_of: dict[str, str] = {}
    for root, group in groups.items():
        for dep, _ in group:
            module = dep.target.module
            if not isinstance(module, (nn.Conv2d, nn.Linear)):
                continue
            if dg.is_out_channel_pruning_fn(dep.handler):
                out_of[names[module]] = root
            else:
                in_of[names[module]] = root
    sizes: dict[str, tuple[int, int]] = {}
    order: list[str] = []

    def hook(mod: nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        name = names[mod]
        order.append(name)
        x = inputs[0]
        sizes[name] = (int(x.shape[-2]), int(x.shape[-1])) if x.dim() == 4 else (1, 1)

    run_with_layer_hooks(model, example[:1], hook)
    modules = dict(model.named_modules())
    layers = [
        _as_layer(name, modules[name], sizes[name], in_of.get(name), out_of.get(name))
        for name in dict.fromkeys(order)
    ]
    return layers, {root: len(g[0].idxs) for root, g in groups.items()}


def _as_layer(
    name: str, m: nn.Module, size: tuple[int, int], in_group: str | None, out_group: str | None
) -> Layer:
    """The :class:`Layer` of conv/linear ``m`` (input ``size``) fed by ``in_group``, whose
    outputs ``out_group`` sets (a depthwise conv's input follows its output group)."""
    h, w = size
    if isinstance(m, nn.Conv2d):
        depthwise = m.groups > 1 and m.groups == m.in_channels
        return Layer(
            name,
            "conv",
            m.in_channels,
            m.out_channels,
            _pair(m.kernel_size),
            _pair(m.stride),
            _pair(m.padding),
            _pair(m.dilation),
            depthwise,
            1 if depthwise else m.groups,
            h,
            w,
            in_group if in_group is not None else (out_group if depthwise else None),
            out_group,
        )
    return Layer(
        name,
        "linear",
        m.in_features,
        m.out_features,
        in_group=in_group,
        out_group=out_group,
    )


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[-1]))
    if isinstance(v, str):  # "same"/"valid" padding: kept as a label-free 0
        return (0, 0)
    return (int(v), int(v))


def kept_channels(channels: int, ratio: float, round_to: int | None) -> int:
    """Channels a group of ``channels`` keeps when ``ratio`` of them are removed, rounded
    exactly as the ``prune_channels`` stage rounds them."""
    from pqd.prune.channels import round_keep

    return round_keep((1.0 - ratio) * channels, channels, round_to)
