"""torchvision's state_dict layouts, written out from torchvision's model source
(torchvision/models/resnet.py, mobilenetv2.py, mobilenetv3.py) because torchvision is not
installed here: key -> shape, in torchvision's order, and a functional ResNet forward over
such a state_dict (torchvision's ``ResNet._forward_impl`` in torch.nn.functional)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

Layout = dict[str, tuple[int, ...]]


def _conv(out: Layout, name: str, o: int, i: int, k: int, bias: bool = False) -> None:
    out[f"{name}.weight"] = (o, i, k, k)
    if bias:
        out[f"{name}.bias"] = (o,)


def _bn(out: Layout, name: str, c: int) -> None:
    for p in ("weight", "bias", "running_mean", "running_var"):
        out[f"{name}.{p}"] = (c,)
    out[f"{name}.num_batches_tracked"] = ()


def _divisible(v: float, d: int = 8) -> int:
    new = max(d, int(v + d / 2) // d * d)
    return new + d if new < 0.9 * v else new


def resnet_layout(layers: tuple[int, ...], bottleneck: bool, num_classes: int = 1000) -> Layout:
    """torchvision ``resnet18/34`` (BasicBlock) or ``resnet50`` (Bottleneck) keys."""
    out: Layout = {}
    _conv(out, "conv1", 64, 3, 7)
    _bn(out, "bn1", 64)
    exp = 4 if bottleneck else 1
    inplanes = 64
    for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
        stride = 1 if i == 0 else 2
        for j in range(n):
            p = f"layer{i + 1}.{j}"
            if bottleneck:
                _conv(out, f"{p}.conv1", planes, inplanes, 1)
                _bn(out, f"{p}.bn1", planes)
                _conv(out, f"{p}.conv2", planes, planes, 3)
                _bn(out, f"{p}.bn2", planes)
                _conv(out, f"{p}.conv3", planes * exp, planes, 1)
                _bn(out, f"{p}.bn3", planes * exp)
            else:
                _conv(out, f"{p}.conv1", planes, inplanes, 3)
                _bn(out, f"{p}.bn1", planes)
                _conv(out, f"{p}.conv2", planes, planes, 3)
                _bn(out, f"{p}.bn2", planes)
            if j == 0 and (stride != 1 or inplanes != planes * exp):
                _conv(out, f"{p}.downsample.0", planes * exp, inplanes, 1)
                _bn(out, f"{p}.downsample.1", planes * exp)
            inplanes = planes * exp
    out["fc.weight"] = (num_classes, 512 * exp)
    out["fc.bias"] = (num_classes,)
    return out


def mobilenet_v2_layout(num_classes: int = 1000) -> Layout:
    """torchvision ``mobilenet_v2`` keys (width_mult 1)."""
    cfg = [(1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3), (6, 160, 3), (6, 320, 1)]
    out: Layout = {}
    _conv(out, "features.0.0", 32, 3, 3)
    _bn(out, "features.0.1", 32)
    inp, f = 32, 1
    for t, c, n in cfg:
        for _ in range(n):
            hidden, p, k = inp * t, f"features.{f}.conv", 0
            if t != 1:
                _conv(out, f"{p}.0.0", hidden, inp, 1)
                _bn(out, f"{p}.0.1", hidden)
                k = 1
            out[f"{p}.{k}.0.weight"] = (hidden, 1, 3, 3)  # depthwise
            _bn(out, f"{p}.{k}.1", hidden)
            _conv(out, f"{p}.{k + 1}", c, hidden, 1)
            _bn(out, f"{p}.{k + 2}", c)
            inp, f = c, f + 1
    _conv(out, f"features.{f}.0", 1280, inp, 1)
    _bn(out, f"features.{f}.1", 1280)
    out["classifier.1.weight"] = (num_classes, 1280)
    out["classifier.1.bias"] = (num_classes,)
    return out


def mobilenet_v3_small_layout(num_classes: int = 1000) -> Layout:
    """torchvision ``mobilenet_v3_small`` keys (width_mult 1)."""
    # input, kernel, expanded, out, use_se (torchvision's bneck_conf rows)
    cfg = [
        (16, 3, 16, 16, True),
        (16, 3, 72, 24, False),
        (24, 3, 88, 24, False),
        (24, 5, 96, 40, True),
        (40, 5, 240, 40, True),
        (40, 5, 240, 40, True),
        (40, 5, 120, 48, True),
        (48, 5, 144, 48, True),
        (48, 5, 288, 96, True),
        (96, 5, 576, 96, True),
        (96, 5, 576, 96, True),
    ]
    out: Layout = {}
    _conv(out, "features.0.0", 16, 3, 3)
    _bn(out, "features.0.1", 16)
    for f, (inp, k, exp, o, se) in enumerate(cfg, start=1):
        p, i = f"features.{f}.block", 0
        if exp != inp:
            _conv(out, f"{p}.0.0", exp, inp, 1)
            _bn(out, f"{p}.0.1", exp)
            i = 1
        out[f"{p}.{i}.0.weight"] = (exp, 1, k, k)
        _bn(out, f"{p}.{i}.1", exp)
        i += 1
        if se:
            sq = _divisible(exp // 4)
            _conv(out, f"{p}.{i}.fc1", sq, exp, 1, bias=True)
            _conv(out, f"{p}.{i}.fc2", exp, sq, 1, bias=True)
            i += 1
        _conv(out, f"{p}.{i}.0", o, exp, 1)
        _bn(out, f"{p}.{i}.1", o)
    _conv(out, "features.12.0", 576, 96, 1)
    _bn(out, "features.12.1", 576)
    out["classifier.0.weight"] = (1024, 576)
    out["classifier.0.bias"] = (1024,)
    out["classifier.3.weight"] = (num_classes, 1024)
    out["classifier.3.bias"] = (num_classes,)
    return out


def random_state(layout: Layout, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state_dict of ``layout`` with random values (BN variances positive)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, shape in layout.items():
        if k.endswith("num_batches_tracked"):
            state[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            state[k] = torch.rand(shape, generator=g) + 0.5
        else:
            state[k] = torch.randn(shape, generator=g) * 0.1
    return state


def resnet_forward(
    state: dict[str, torch.Tensor], x: torch.Tensor, bottleneck: bool
) -> torch.Tensor:
    """torchvision's ResNet forward (eval mode) over a torchvision state_dict."""

    def bn(t: torch.Tensor, p: str) -> torch.Tensor:
        return F.batch_norm(
            t,
            state[f"{p}.running_mean"],
            state[f"{p}.running_var"],
            state[f"{p}.weight"],
            state[f"{p}.bias"],
            False,
            0.0,
            1e-5,
        )

    x = F.relu(bn(F.conv2d(x, state["conv1.weight"], stride=2, padding=3), "bn1"))
    x = F.max_pool2d(x, 3, 2, 1)
    for stage in range(1, 5):
        j = 0
        while f"layer{stage}.{j}.conv1.weight" in state:
            p = f"layer{stage}.{j}"
            stride = 2 if stage > 1 and j == 0 else 1
            if bottleneck:  # v1.5: the stride sits on the 3x3 conv
                out = F.relu(bn(F.conv2d(x, state[f"{p}.conv1.weight"]), f"{p}.bn1"))
                out = F.conv2d(out, state[f"{p}.conv2.weight"], stride=stride, padding=1)
                out = F.relu(bn(out, f"{p}.bn2"))
                out = bn(F.conv2d(out, state[f"{p}.conv3.weight"]), f"{p}.bn3")
            else:
                out = F.conv2d(x, state[f"{p}.conv1.weight"], stride=stride, padding=1)
                out = F.relu(bn(out, f"{p}.bn1"))
                out = bn(F.conv2d(out, state[f"{p}.conv2.weight"], padding=1), f"{p}.bn2")
            if f"{p}.downsample.0.weight" in state:
                short = F.conv2d(x, state[f"{p}.downsample.0.weight"], stride=stride)
                short = bn(short, f"{p}.downsample.1")
            else:
                short = x
            x = F.relu(out + short)
            j += 1
    x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
    return F.linear(x, state["fc.weight"], state["fc.bias"])
