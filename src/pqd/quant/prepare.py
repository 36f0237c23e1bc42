"""Capture a model and insert its fake-quantizers (PT2E), whole or part by part.

prepare -> calibrate (:func:`pqd.quant.calibration.calibrate`) on the validation split ->
the shared fine-tune loop -> (convert at export). The model is captured with
``torch.export(strict=True)`` (non-strict capture leaves no ``source_fn_stack`` and the
quantizer silently skips every conv), then ``prepare_qat_pt2e`` inserts the
fake-quantizers of :func:`pqd.quant.quantizer.ort_quantizer` and simulates BN folding.
Every conv/linear weight is checked to carry a fake-quantizer (unless mixed precision
keeps it float). The scheme is kept on the graph (:mod:`pqd.quant.scheme`).

PTQ and dynamic graphs are fake-quant graphs like QAT ones, so a later stage (KD,
pruning) can fine-tune them with quantization on. A multi-exit net is prepared part by
part (each segment and head its own graph and ONNX file), with the quantizers at the
segment boundaries shared.
"""

from __future__ import annotations

import copy
from typing import Any, cast

import torch
import torch.nn as nn

import pqd._pt2e_cache as _pt2e_cache
from pqd.errors import ModelError
from pqd.models.multi_exit import MultiExitNet
from pqd.quant.layers import unquantized_weights
from pqd.quant.quantizer import ort_quantizer
from pqd.quant.scheme import DEFAULT_SCHEME, META_KEY
from pqd.train import set_train


def capture(model: nn.Module, example: torch.Tensor) -> torch.fx.GraphModule:
    """``torch.export`` (strict, dynamic batch) of ``model`` as a GraphModule."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    # torch's stub of Module.to lacks memory_format (it exists at runtime)
    model = model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    try:
        ep = torch.export.export(model, (example,), dynamic_shapes=({0: batch},), strict=True)
    except Exception as exc:
        raise ModelError(
            f"quantize: torch.export could not capture the model ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})",
            "remove data-dependent control flow and padding='same' from forward()",
        ) from None
    return ep.module()


def prepare_qat(
    model: nn.Module, example: torch.Tensor, scheme: dict[str, Any] | None = None
) -> torch.fx.GraphModule:
    """Capture ``model`` and insert fake-quantizers; every conv/linear weight must get one."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    _pt2e_cache.install()
    scheme = copy.deepcopy(scheme or DEFAULT_SCHEME)
    bn_settings = {
        (m.eps, m.momentum)
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }
    set_train(model, True)
    graph = prepare_qat_pt2e(capture(model, example), ort_quantizer(True, scheme))
    _restore_bn_settings(graph, bn_settings)
    missing = unquantized_weights(graph)
    if missing:
        raise ModelError(
            f"quantize: {len(missing)} conv/linear layers got no INT8 weight quantizer "
            f"({', '.join(missing[:4])})",
            "use conv -> BatchNorm -> ReLU blocks with numeric padding (see pqd.models)",
        )
    graph.meta[META_KEY] = scheme
    return graph


@torch.no_grad()
def refresh_bn_stats(model: nn.Module, loader, batches: int, device: torch.device) -> int:
    """Re-estimate every BatchNorm's running mean and variance as the plain average over
    ``batches`` batches of ``loader`` (the rest of the model stays in eval mode).

    Why before QAT: PT2E folds each BN into its conv with the *running* variance, the
    activation ranges are calibrated with the running statistics, but QAT trains with the
    batch statistics. After a short baseline the running averages lag far behind the
    weights (momentum 0.1 remembers ~10 steps), so the train-mode activations overflow
    the calibrated ranges, the clamped convs' outputs have a tiny batch variance, and
    every BN's backward pass multiplies the gradient by gamma / that std: on a 50-conv
    depthwise net (MobileNetV2) the first QAT gradient norm reached 1e5-1e10.
    With statistics that match the weights the three agree. A well-trained baseline's
    statistics barely change.

    Args:
        model: an eager model (a captured graph has no BN modules: nothing happens).
        loader: yields ``(images, labels)`` batches.
        batches: how many batches to average over.
        device: where the model is.

    Returns:
        Images seen (0: the statistics were left as they were).
    """
    bns = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    if not bns:
        return 0
    saved = [(m, m.momentum, copy.deepcopy(m.state_dict())) for m in bns]
    was = model.training
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches seen
        m.train()
    forward = model.forward_all if isinstance(model, MultiExitNet) else model
    seen = 0
    try:
        for i, (x, _) in enumerate(loader):
            if i >= batches:
                break
            if x.shape[0] < 2:  # one image has no batch variance
                continue
            forward(x.to(device))
            seen += x.shape[0]
    finally:
        for m, momentum, state in saved:
            m.momentum = momentum
            if seen == 0:
                m.load_state_dict(state)
        model.train(was)
    return seen


def prepare_qat_parts(
    net: MultiExitNet, example: torch.Tensor, scheme: dict[str, Any] | None = None
) -> MultiExitNet:
    """Per-part QAT for a multi-exit net: every segment and head becomes its own PT2E graph
    with its own fake-quantizers (each part is exported to its own ONNX file). Parameter
    names do not change (a part keeps its internal names)."""
    from pqd.models.multi_exit import part_inputs

    inputs = part_inputs(net, example)
    for name, part in list(net.parts()):
        net.set_part(name, prepare_qat(part, inputs[name], scheme))
    tie_boundary_quantizers(net)
    return net


def _fq_target(graph: torch.fx.GraphModule, node: Any) -> str | None:
    if (
        isinstance(node, torch.fx.Node)
        and node.op == "call_module"
        and hasattr(graph.get_submodule(str(node.target)), "observer_enabled")
    ):
        return str(node.target)
    return None


def tie_boundary_quantizers(net: MultiExitNet) -> int:
    """Make the next segment and the head read a segment's output with the segment's own
    output fake-quantizer (one shared module): at a boundary the INT8 files then
    dequantize and re-quantize with the same scale, which is exact, so the segments run
    one by one give the same numbers as the same segments chained into one graph.
    Returns how many input quantizers now share their producer's."""
    tied = 0
    # every part is a prepared PT2E graph by now
    segments = cast(list[torch.fx.GraphModule], list(net.segments))
    heads = cast(list[torch.fx.GraphModule], list(net.heads))
    for k in range(len(segments) - 1):
        seg = segments[k]
        output = next(n for n in seg.graph.nodes if n.op == "output")
        produced = output.args[0]
        src = _fq_target(seg, produced[0] if isinstance(produced, (tuple, list)) else produced)
        if src is None:
            continue  # the segment ends in float: the next parts keep their own quantizers
        shared = seg.get_submodule(src)
        for reader in (segments[k + 1], heads[k]):
            placeholder = next(n for n in reader.graph.nodes if n.op == "placeholder")
            fqs = [t for u in placeholder.users if (t := _fq_target(reader, u))]
            if len(fqs) == 1:
                reader.set_submodule(fqs[0], shared)
                tied += 1
    return tied


def _restore_bn_settings(graph: torch.fx.GraphModule, settings: set[tuple[float, float]]) -> None:
    """prepare_qat_pt2e's conv-BN fusion resets BN momentum/eps to 0.1/1e-5: put them back."""
    if len(settings) != 1:
        return  # mixed settings cannot be mapped back node by node; keep torchao's
    eps, momentum = next(iter(settings))
    if (eps, momentum) == (1e-5, 0.1):
        return
    for node in graph.graph.nodes:
        if node.op == "call_function" and "batch_norm" in str(node.target):
            args = list(node.args)
            # aten.batch_norm / _native_batch_norm_legit: (..., training, momentum, eps)
            if len(args) >= 3 and isinstance(args[-1], float) and isinstance(args[-2], float):
                args[-2], args[-1] = momentum, eps
                node.args = tuple(args)
    graph.recompile()
