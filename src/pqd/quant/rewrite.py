"""Graph rewrites before annotation: SiLU, hardswish and hardsigmoid spelled out as the
same functions in ops that onnxruntime runs in integer once they are quantized.

ONNX has no integer form of these activations, so onnxruntime runs them in float on a
dequantized tensor. Split into sigmoid / add / clamp / div / mul nodes (the hard gates
tagged for their fixed ranges), :mod:`pqd.quant.annotate` can put quantizers between the
pieces, and onnxruntime fuses each piece into an integer kernel.
"""

from __future__ import annotations

from typing import Any

import torch

_SILU_OPS = {torch.ops.aten.silu.default, torch.ops.aten.silu_.default}
_KEPT_META = ("val", "tensor_meta", "stack_trace")
_HARD_OPS = {
    getattr(torch.ops.aten, f"{name}{suffix}").default
    for name in ("hardswish", "hardsigmoid")
    for suffix in ("", "_")
}
HARD_GATE = "pqd_hard_gate"  # node.meta tag: "add3" / "relu6" / "div6" (split_hard_gates)


def _kept_meta(node: torch.fx.Node) -> dict[str, Any]:
    """The meta a replacement node takes over (not the module stack: no conv-bn fusion)."""
    return {k: node.meta[k] for k in _KEPT_META if k in node.meta}


def _relinted(model: torch.fx.GraphModule, done: int) -> int:
    """Check and recompile ``model`` when ``done`` nodes were rewritten; returns ``done``."""
    if done:
        model.graph.lint()
        model.recompile()
    return done


def split_silu(model: torch.fx.GraphModule) -> int:
    """Rewrite each ``silu(x)`` as ``x * sigmoid(x)`` (the same function), so that
    :func:`pqd.quant.annotate.close_float_islands` can quantize the sigmoid's output
    between the two.

    ONNX has no SiLU op: it exports as ``Sigmoid`` then ``Mul`` with no quantizer in
    between, and onnxruntime runs both in float on a dequantized tensor. With the gate
    quantized, onnxruntime runs ``QLinearSigmoid`` (a 256-entry lookup table) and
    ``QLinearMul`` on uint8 tensors instead.

    Args:
        model: the captured graph, before annotation; rewritten in place.

    Returns:
        How many SiLUs were split.
    """
    done = 0
    for node in list(model.graph.nodes):
        if node.op != "call_function" or node.target not in _SILU_OPS:
            continue
        x = node.args[0]
        with model.graph.inserting_before(node):
            gate = model.graph.call_function(torch.ops.aten.sigmoid.default, (x,))
            prod = model.graph.call_function(torch.ops.aten.mul.Tensor, (x, gate))
        for new in (gate, prod):
            new.meta = _kept_meta(node)
        node.replace_all_uses_with(prod)
        model.graph.erase_node(node)
        done += 1
    return _relinted(model, done)


def split_hard_gates(model: torch.fx.GraphModule) -> int:
    """Rewrite ``hardsigmoid(x)`` as ``relu6(x + 3) / 6`` and ``hardswish(x)`` as
    ``x * (relu6(x + 3) / 6)`` (the same functions), tagged for
    :func:`pqd.quant.annotate.close_float_islands`.

    onnxruntime has no integer HardSigmoid / HardSwish (it runs them as float HardSigmoid
    and Mul on a dequantized tensor). Quantized with fixed ranges (``x + 3`` on [0, 6], the
    gate on [0, 1], both with zero point 0) the uint8 codes of ``relu6(x + 3)`` and of the
    gate are the same integers: :func:`pqd.onnx_export.drop_requantize` then removes the
    ``/ 6`` and onnxruntime runs ``QLinearAdd`` (the saturation to uint8 is the relu6) and
    ``QLinearMul``.

    Args:
        model: the captured graph, before annotation; rewritten in place.

    Returns:
        How many hardswish / hardsigmoid nodes were split.
    """
    done = 0
    for node in list(model.graph.nodes):
        if node.op != "call_function" or node.target not in _HARD_OPS:
            continue
        x = node.args[0]
        name = f"_pqd_three_{done}"
        model.register_buffer(name, torch.tensor(3.0))
        graph = model.graph
        with graph.inserting_before(node):
            three = graph.get_attr(name)
            t = graph.call_function(torch.ops.aten.add.Tensor, (x, three))
            r = graph.call_function(torch.ops.aten.clamp.default, (t, 0.0, 6.0))
            gate = graph.call_function(torch.ops.aten.div.Tensor, (r, 6.0))
            out = gate
            if "hardswish" in str(node.target):
                out = graph.call_function(torch.ops.aten.mul.Tensor, (x, gate))
        val = node.meta.get("val")
        three.meta = (
            {"val": torch.empty((), dtype=val.dtype, device=val.device)} if val is not None else {}
        )
        roles = [(t, "add3"), (r, "relu6"), (gate, "div6")] + (
            [(out, None)] if out is not gate else []
        )
        for new, tag in roles:
            new.meta = _kept_meta(node)
            if tag is not None:
                new.meta[HARD_GATE] = tag
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        done += 1
    return _relinted(model, done)
