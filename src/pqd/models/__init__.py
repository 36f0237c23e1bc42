"""The model zoo and the wrapper pqd trains and exports.

Importing this package registers every zoo net (see :mod:`pqd.registry`). A zoo net is
built for raw inputs by :func:`build_model`, which wraps it in :class:`Classifier`
(float32 NCHW RGB in [0, 1] -> normalize -> net -> logits).

Zoo (params / MACs at 32x32, 10 classes): resnet18 11.17 M / 555 M, resnet34 21.28 M /
1.16 G, resnet20 0.27 M / 41 M, resnet32 0.47 M / 69 M, resnet56 0.86 M / 126 M,
wrn28_10 36.5 M / 5.24 G, wrn16_4 2.75 M / 393 M (``wrn`` takes depth, widen_factor),
vgg16_bn 14.7 M / 313 M, vgg19_bn 20.0 M / 398 M, mobilenetv2 2.24 M / 88 M,
fastnet 1.17 M / 86 M, tiny_cnn 2.2 k / 1.1 M, tiny_resnet 5.3 k / 2.3 M; vision
transformers (pqd.models.vit): vit_small 1.91 M / 145 M, vit_tiny 24 k / 1.1 M.

ImageNet-style, torchvision's layout and names (params for 1000 classes / MACs at
224x224): resnet18_imagenet 11.69 M / 1.81 G, resnet34_imagenet 21.80 M / 3.66 G,
resnet50_imagenet 25.56 M / 4.09 G, mobilenetv2_imagenet 3.50 M / 301 M,
mobilenetv3_small 2.54 M / 57 M, mobilenetv3_large 5.48 M / 217 M.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from pqd.errors import ModelError, did_you_mean
from pqd.models import (  # noqa: F401  (registers)
    fastnet,
    imagenet,
    mobilenetv2,
    mobilenetv3,
    resnet,
    tiny,
    vgg,
    vit,
    wrn,
)
from pqd.models._common import ZooNet
from pqd.registry import MODELS, ModelFn

__all__ = [
    "Classifier",
    "Normalize",
    "ZooNet",
    "build_model",
    "check_output_shape",
    "model_names",
    "resolve_model_fn",
]


def model_names() -> list[str]:
    """Sorted names of the registered zoo models."""
    return sorted(MODELS)


def resolve_model_fn(name: str) -> ModelFn:
    """Return the builder for a zoo name or a ``module:callable`` user model."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # an import error in user code is the user's to fix
            raise ModelError(
                f"model {name!r}: module {module_name!r} does not import "
                f"({type(exc).__name__}: {exc})",
                "check the module path and that it is importable (on PYTHONPATH)",
            ) from None
        fn = getattr(module, attr, None)
        if fn is None or not callable(fn):
            raise ModelError(
                f"model {name!r}: {module_name!r} has no callable {attr!r}",
                "name a function or class that returns an nn.Module",
            )
        return fn
    if name not in MODELS:
        raise ModelError(
            f"unknown model {name!r}{did_you_mean(name, MODELS)}",
            f"use one of {', '.join(sorted(MODELS))} or 'module:callable'",
        )
    return MODELS[name]


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel (``inverse``: ``x * std + mean``, back to [0, 1]);
    ``mean`` and ``std`` are buffers shaped [1, C, 1, 1]."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float], inverse: bool = False) -> None:
        super().__init__()
        self.inverse = inverse
        mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std_t = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean_t.numel() == 0 or mean_t.numel() != std_t.numel():
            raise ModelError(
                f"normalization mean {list(mean)} and std {list(std)} differ in length",
                "give one mean and one std per input channel",
            )
        if not bool((std_t > 0).all()):
            raise ModelError(
                f"normalization std {list(std)} has a value <= 0",
                "give a positive std per input channel",
            )
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1))
        self.register_buffer("std", std_t.view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inverse:
            return x * self.std + self.mean
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """What pqd trains and exports: input float32 NCHW RGB in [0,1]; output logits."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.norm = Normalize(mean, std)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.norm(x))


def build_model(
    name: str, num_classes: int, mean: Sequence[float], std: Sequence[float], **kwargs: Any
) -> Classifier:
    """Build zoo model ``name`` (or a ``module:callable`` user model) wrapped in a Classifier.

    The builder is called as ``fn(num_classes=num_classes, **kwargs)``; a ``TypeError`` or
    ``ValueError`` from it (rejected kwargs or values) and a result that is not an
    ``nn.Module`` become :class:`~pqd.errors.ModelError`.
    """
    fn = resolve_model_fn(name)
    try:
        net = fn(num_classes=num_classes, **kwargs)
    except (TypeError, ValueError) as exc:
        given = ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "no kwargs"
        raise ModelError(
            f"model {name!r} could not be built with num_classes={num_classes}, {given} "
            f"({type(exc).__name__}: {exc})",
            "check model.kwargs against the builder's signature and allowed values",
        ) from None
    if not isinstance(net, nn.Module):
        raise ModelError(
            f"model {name!r} returned a {type(net).__name__}, not an nn.Module",
            "make the builder return a torch.nn.Module",
        )
    return Classifier(net, mean, std)


def check_output_shape(model: nn.Module, num_classes: int, image_size: int = 32) -> None:
    """One forward on zeros [2, C, S, S] (eval mode, no grad); the output must be
    [2, num_classes]. C is the Classifier's channel count (3 otherwise). Every module's
    train/eval flag is restored afterwards."""
    norm = getattr(model, "norm", None)
    channels = int(norm.mean.shape[1]) if isinstance(norm, Normalize) else 3
    expected = (2, num_classes)
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.zeros(2, channels, image_size, image_size, device=device)
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            out = model(x)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ModelError(
            f"model forward failed on a {list(x.shape)} input ({type(exc).__name__}: {first})",
            f"make the model accept {channels}x{image_size}x{image_size} images",
        ) from None
    finally:
        for m, training in modes.items():
            m.training = training
    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if got != expected:
        raise ModelError(
            f"model output is {list(got) if isinstance(got, tuple) else got} for a "
            f"{list(x.shape)} input, expected {list(expected)} (batch, num_classes)",
            f"make the model return one logits tensor with {num_classes} classes",
        )
