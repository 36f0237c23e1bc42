"""A multi-exit network made of segments: what the ``early_exit`` stage builds.

A model that follows the early-exit protocol (:func:`exit_parts`: ``features`` as an
``nn.Sequential`` of blocks, ``classifier``, ``forward(x) == classifier(features(x))``,
optional ``default_exit_points``; every :class:`~pqd.models.ZooNet` does, and user models
may), inside a :class:`~pqd.models.Classifier` or bare, is cut after the chosen
``features`` blocks (``positions``)::

    segments[0] = norm + features[0 .. p0]          heads[0]: exit 0 after segment 0
    segments[1] = features[p0+1 .. p1]              heads[1]: exit 1 after segment 1
    ...
    segments[K] = features[pK-1+1 ..] + classifier  (the original final head)

``forward(x)`` runs the segments back to back and returns the final logits: with exits
disabled it is the original network, op for op. With ``collect_exits`` set (training,
calibration) it also runs every head and keeps their logits in ``exit_logits``.

Names: a segment holds the original submodules under their original paths
(``net.features.3``, ``net.classifier``, ``norm``; ``features.3``, ``classifier`` for a
bare network), so parameter ``X`` of the plain
Classifier is ``segments.k.X`` here (:meth:`MultiExitNet.name_of`), and it stays so
when a segment or head becomes a PT2E QAT graph of its own (quantization is applied per
part when exits exist: each part is exported to its own ONNX file anyway).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, cast

import torch
import torch.nn as nn

from pqd.errors import ModelError
from pqd.models._common import ConvBN

CONFIDENCES = ("max_softmax", "entropy")


class _Namespace(nn.Module):
    """A module that only holds children (keeps original parameter paths)."""

    features: nn.Module  # what a Segment puts here (annotations only)
    classifier: nn.Module

    def forward(self, *args: Any) -> Any:  # pragma: no cover - never called
        raise RuntimeError("a namespace module is not callable")


class Segment(nn.Module):
    """``features[start:stop]`` of a Classifier (``norm`` first when ``start == 0``, the
    ``classifier`` last when it is the final segment), under the original names: below
    ``net.`` (``root``) for a Classifier, at the top for a bare network (``root=""``)."""

    features: nn.Module  # set in __init__ where the root is "" (annotations only)
    classifier: nn.Module

    def __init__(
        self,
        blocks: dict[int, nn.Module],
        norm: nn.Module | None = None,
        classifier: nn.Module | None = None,
        root: str = "net",
    ) -> None:
        super().__init__()
        self.has_norm = norm is not None
        self.has_classifier = classifier is not None
        self.root = root
        if norm is not None:
            self.norm = norm
        holder: Segment | _Namespace = self
        if root:
            holder = _Namespace()
            self.add_module(root, holder)
        holder.features = _Namespace()
        for i, block in blocks.items():
            holder.features.add_module(str(i), block)
        if classifier is not None:
            holder.classifier = classifier

    def _holder(self) -> Segment | _Namespace:
        return getattr(self, self.root) if self.root else self

    @property
    def block_indices(self) -> list[int]:
        """Indices into the original ``features`` held by this segment."""
        return [int(name) for name, _ in self._holder().features.named_children()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        holder = self._holder()
        if self.has_norm:
            x = self.norm(x)
        for block in holder.features.children():
            x = block(x)
        if self.has_classifier:
            x = holder.classifier(x)
        return x


class ExitHead(nn.Module):
    """``[conv-bn-relu] -> global average pool -> flatten -> linear`` (INT8-friendly)."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int = 0,
        kernel_size: int = 3,
        stride: int = 1,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_channels
        if channels > 0:
            layers.append(ConvBN(in_channels, channels, kernel_size, stride))
            width = channels
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MultiExitNet(nn.Module):
    """Segments and exit heads; ``forward`` returns the final logits (see module doc).

    Parts may be eager modules or PT2E graphs; ``train(mode)`` switches each part the
    way it needs. ``detach_heads`` stops exit-loss gradients at the head inputs
    (``mode: heads``: exits never change the backbone). ``thresholds[k]`` is the
    confidence (fraction 0-1) at or above which an input leaves at exit ``k``
    (> 1: never). ``part_macs`` holds MACs per image of each segment and head.
    """

    def __init__(
        self,
        segments: Sequence[nn.Module],
        heads: Sequence[nn.Module],
        positions: Sequence[int],
        num_classes: int,
        confidence: str = "max_softmax",
    ) -> None:
        super().__init__()
        if len(heads) != len(segments) - 1:
            raise ValueError(f"{len(segments)} segments need {len(segments) - 1} heads")
        self.segments = nn.ModuleList(segments)
        self.heads = nn.ModuleList(heads)
        self.positions = list(positions)
        self.num_classes = num_classes
        self.confidence = confidence
        self.thresholds = [float("inf")] * len(heads)
        self.collect_exits = False
        self.detach_heads = False
        self.frozen_backbone = False
        self.exit_logits: list[torch.Tensor] = []
        self.part_macs: dict[str, list[int]] = {"segments": [], "heads": []}
        self.exit_loss: dict[str, Any] = {}  # how later stages train the exits (see stage)
        self.head_config: dict[str, int] = {}  # build_multi_exit's head_* arguments

    @property
    def num_exits(self) -> int:
        """Early exits (heads), not counting the final classifier."""
        return len(self.heads)

    def parts(self) -> Iterator[tuple[str, nn.Module]]:
        """``("segments.k" | "heads.k", module)`` in run order."""
        for k, seg in enumerate(self.segments):
            yield f"segments.{k}", seg
            if k < len(self.heads):
                yield f"heads.{k}", self.heads[k]

    def set_part(self, name: str, module: nn.Module) -> None:
        """Replace the part called ``name`` (e.g. by its QAT graph)."""
        kind, k = name.split(".")
        getattr(self, kind)[int(k)] = module

    def name_of(self, plain_name: str) -> str:
        """The name here of parameter/buffer ``plain_name`` of the plain Classifier."""
        for k, seg in enumerate(self.segments):
            if plain_name in _names(seg):
                return f"segments.{k}.{plain_name}"
        raise KeyError(plain_name)

    def train(self, mode: bool = True) -> MultiExitNet:
        from pqd.train import set_train

        self.training = mode
        for name, part in self.parts():
            frozen = self.frozen_backbone and name.startswith("segments")
            set_train(part, mode and not frozen)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        exits = []
        last = len(self.segments) - 1
        for k, seg in enumerate(self.segments):
            x = seg(x)
            if self.collect_exits and k < last:
                exits.append(self.heads[k](x.detach() if self.detach_heads else x))
        if self.collect_exits:
            self.exit_logits = exits
        return x

    def forward_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every exit then the final head, for one batch."""
        was = self.collect_exits
        self.collect_exits = True
        try:
            final = self(x)
            return [*self.exit_logits, final]
        finally:
            self.collect_exits = was
            self.exit_logits = []


def _names(module: nn.Module) -> set[str]:
    return {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}


PROTOCOL = (
    "give the network (the model, or the net your builder returns) `features`, an "
    "nn.Sequential of blocks, and `classifier`, mapping the last block's output to logits, "
    "with forward(x) == classifier(features(x)), and optionally `default_exit_points` "
    "(indices into features; else give positions:): docs/stages/early_exit.md"
)
"""The fix named when a model does not follow the early-exit protocol."""


def exit_parts(model: nn.Module) -> tuple[nn.Module | None, nn.Module, str]:
    """``(norm, network, root)`` of a model that follows the early-exit protocol.

    The protocol (any ``nn.Module``, zoo nets and user models alike): the network has

    * ``features``: an ``nn.Sequential`` of at least two blocks,
    * ``classifier``: a module mapping the last block's output to logits,
    * ``forward(x) == classifier(features(x))`` (checked on a batch by
      :func:`build_multi_exit`),
    * optionally ``default_exit_points``: indices into ``features`` after which an exit
      head goes (else the stage's ``positions`` are needed).

    The network is ``model.net`` of a :class:`~pqd.models.Classifier` (``norm`` then
    ``net``; root ``"net"``) or ``model`` itself (no normalisation in front; root ``""``).
    A :class:`~pqd.models.ZooNet` follows it by construction.

    Raises:
        ModelError: naming the protocol, when ``features`` or ``classifier`` is missing.
    """
    from pqd.models import Classifier

    norm: nn.Module | None = None
    net, root = model, ""
    if isinstance(model, Classifier):
        norm, net, root = model.norm, model.net, "net"
    features = getattr(net, "features", None)
    classifier = getattr(net, "classifier", None)
    if not isinstance(features, nn.Sequential) or len(features) < 2:
        found = (
            f"a {type(features).__name__} of {len(features)} block(s)"
            if isinstance(features, nn.Sequential)
            else "no"
            if features is None
            else f"a {type(features).__name__}"
        )
        raise ModelError(
            f"early_exit: {type(net).__name__} does not follow the exit protocol: it has "
            f"{found} `features` (an nn.Sequential of two or more blocks is needed)",
            PROTOCOL,
        )
    if not isinstance(classifier, nn.Module):
        raise ModelError(
            f"early_exit: {type(net).__name__} does not follow the exit protocol: it has no "
            "`classifier` module",
            PROTOCOL,
        )
    return norm, net, root


def protocol_features(net: nn.Module) -> nn.Sequential:
    """``net.features`` of a network :func:`exit_parts` accepted (an ``nn.Sequential``)."""
    return cast(nn.Sequential, net.features)


def protocol_classifier(net: nn.Module) -> nn.Module:
    """``net.classifier`` of a network :func:`exit_parts` accepted (a module)."""
    return cast(nn.Module, net.classifier)


@torch.no_grad()
def check_protocol_forward(model: nn.Module, example: torch.Tensor) -> None:
    """Raise unless ``model(example)`` equals norm -> features -> classifier on it (eval
    mode; every module's train flag restored): segments cut from ``features`` must
    reproduce the model."""
    norm, net, _ = exit_parts(model)
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        full = model(example)
        x = norm(example) if norm is not None else example
        parts = protocol_classifier(net)(protocol_features(net)(x))
    finally:
        for m, flag in modes.items():
            m.training = flag
    same = (
        isinstance(full, torch.Tensor)
        and isinstance(parts, torch.Tensor)
        and full.shape == parts.shape
        and torch.allclose(full, parts, rtol=1e-4, atol=1e-5)
    )
    if not same:
        raise ModelError(
            f"early_exit: {type(net).__name__} does not follow the exit protocol: its forward "
            "differs from classifier(features(x)) on a batch",
            PROTOCOL,
        )


def resolve_positions(net: nn.Module, positions: Sequence[int] | None) -> list[int]:
    """Validated, sorted exit positions (indices into ``net.features``)."""
    n = len(protocol_features(net))
    defaults = getattr(net, "default_exit_points", None)
    chosen = list(defaults or []) if positions is None else list(positions)
    if not chosen:
        raise ModelError(
            "early_exit: the model has no default exit points",
            "list exit positions, e.g. positions: [1, 2], or give the network a "
            "default_exit_points list",
        )
    bad = [p for p in chosen if not 0 <= p < n - 1]
    if bad or len(set(chosen)) != len(chosen):
        raise ModelError(
            f"early_exit: positions {chosen} must be distinct indices of features blocks "
            f"0..{n - 2} (the model has {n} blocks; an exit after the last block is the "
            "final head)",
            f"use indices from 0 to {n - 2}",
        )
    return sorted(chosen)


@torch.no_grad()
def feature_shapes(
    model: nn.Module, positions: Sequence[int], example: torch.Tensor
) -> list[torch.Size]:
    """Shapes of ``features[p]``'s output for each exit position (one forward)."""
    norm, net, _ = exit_parts(model)
    shapes, x = {}, norm(example) if norm is not None else example
    for i, block in enumerate(protocol_features(net)):
        x = block(x)
        if i in positions:
            shapes[i] = x.shape
    return [shapes[p] for p in positions]


def build_multi_exit(
    model: nn.Module,
    positions: Sequence[int] | None,
    num_classes: int,
    example: torch.Tensor,
    head_channels: int = 0,
    head_kernel: int = 3,
    head_stride: int = 1,
    confidence: str = "max_softmax",
) -> MultiExitNet:
    """Cut a model that follows the exit protocol (:func:`exit_parts`: a zoo net, or a user
    model with ``features`` and ``classifier``) after ``positions`` (None: the net's
    ``default_exit_points``); the segments share its modules. ``example`` is an input batch
    (its shape matters)."""
    norm, net_in, root = exit_parts(model)
    positions = resolve_positions(net_in, positions)
    features = protocol_features(net_in)
    param = next(model.parameters())
    example = example[:2].to(param.device)
    check_protocol_forward(model, example)
    was_training = model.training
    model.eval()
    shapes = feature_shapes(model, positions, example)
    model.train(was_training)
    bounds = [-1, *positions, len(features) - 1]
    segments = []
    for k in range(len(bounds) - 1):
        blocks = {i: features[i] for i in range(bounds[k] + 1, bounds[k + 1] + 1)}
        segments.append(
            Segment(
                blocks,
                norm=norm if k == 0 else None,
                classifier=protocol_classifier(net_in) if k == len(bounds) - 2 else None,
                root=root,
            )
        )
    # a net may build its own exit heads (a ViT reads the class token: ViT.exit_head)
    make_head = getattr(net_in, "exit_head", None)
    heads = [
        make_head(s, num_classes)
        if make_head is not None
        else ExitHead(int(s[1]), num_classes, head_channels, head_kernel, head_stride)
        for s in shapes
    ]
    net = MultiExitNet(segments, heads, positions, num_classes, confidence)
    net.head_config = {
        "head_channels": head_channels,
        "head_kernel": head_kernel,
        "head_stride": head_stride,
    }
    net.to(param.device)
    net.part_macs = count_part_macs(net, example[:1])
    return net


def part_inputs(net: MultiExitNet, example: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input tensor each part sees for ``example`` (detached copies), by part name.

    Runs in evaluation mode with observers frozen: nothing in ``net`` changes."""
    from pqd.train import eval_mode

    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name, part in net.parts():

        def pre(_m: nn.Module, args: tuple, name: str = name) -> None:
            seen[name] = args[0].detach().clone().contiguous()

        handles.append(part.register_forward_pre_hook(pre))
    try:
        with torch.no_grad(), eval_mode(net):
            net.forward_all(example)
    finally:
        for h in handles:
            h.remove()
    return seen


@torch.no_grad()
def count_part_macs(net: MultiExitNet, example: torch.Tensor) -> dict[str, list[int]]:
    """MACs per image of every eager segment and head (conv and linear layers)."""
    counts: dict[nn.Module, int] = {}

    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            per_out = module.weight[0].numel()
            counts[module] = counts.get(module, 0) + per_out * output[0].numel()
        else:  # a linear: once per row (per token for a transformer's [B, N, D] input)
            rows = output[0].numel() // output.shape[-1] if output.dim() > 2 else 1
            counts[module] = counts.get(module, 0) + module.weight.numel() * rows

    mods = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    handles = [m.register_forward_hook(hook) for m in mods]
    was = net.training
    net.eval()
    try:
        net.forward_all(example)
    finally:
        for h in handles:
            h.remove()
        net.train(was)

    def total(part: nn.Module) -> int:
        return sum(counts.get(m, 0) for m in part.modules())

    return {"segments": [total(s) for s in net.segments], "heads": [total(h) for h in net.heads]}


def exit_costs(part_macs: dict[str, list[int]]) -> list[int]:
    """MACs per image of leaving at exit k (k = 0..K-1) and of the final head (last entry):
    every segment up to the exit plus every head evaluated on the way."""
    segs, heads = part_macs["segments"], part_macs["heads"]
    costs, run = [], 0
    for k, seg in enumerate(segs):
        run += seg
        if k < len(heads):
            run += heads[k]
        costs.append(run)
    return costs
