"""The conv/linear layers of prepared PT2E graphs and their fake-quantizers.

Calibration, sensitivity, mixed precision, the export and the record all name a layer by
its eager module path (``net.features.1.0.0``); this module maps those names to the
graph nodes and fake-quantizer modules that quantize each layer's weight and input, and
removes a chosen layer's quantizers to keep it in float.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from pqd.errors import RecipeError
from pqd.quant.scheme import DEFAULT_SCHEME, META_KEY, graphs_in

# the ops whose weight gets a fake-quantizer
WEIGHT_OPS = {
    torch.ops.aten.conv2d.default,
    torch.ops.aten.conv1d.default,
    torch.ops.aten.linear.default,
}


def _is_fake_quant(graph: torch.fx.GraphModule, node: Any) -> bool:
    return (
        isinstance(node, torch.fx.Node)
        and node.op == "call_module"
        and hasattr(graph.get_submodule(str(node.target)), "fake_quant_enabled")
    )


def unquantized_weights(graph: torch.fx.GraphModule) -> list[str]:
    """Names of conv/linear nodes whose weight does not pass through a fake-quantizer."""
    return [
        node.name
        for node in graph.graph.nodes
        if node.op == "call_function"
        and node.target in WEIGHT_OPS
        and not _is_fake_quant(graph, node.args[1])
    ]


@dataclass
class LayerQuant:
    """The fake-quantizers of one conv/linear layer in a prepared graph.

    ``weight_fq`` / ``input_fqs`` are model-qualified fake-quantizer names (as
    :func:`fake_quantizers` yields them); ``*_node`` are their call_module nodes.
    """

    name: str  # eager module path, e.g. net.features.1.0.0
    op: str  # conv | linear
    graph: torch.fx.GraphModule
    node: torch.fx.Node
    weight_node: torch.fx.Node | None
    input_nodes: list[torch.fx.Node] = field(default_factory=list)
    prefix: str = ""

    def qualified(self, node: torch.fx.Node) -> str:
        return f"{self.prefix}.{node.target}" if self.prefix else str(node.target)

    @property
    def weight_fq(self) -> str | None:
        return None if self.weight_node is None else self.qualified(self.weight_node)

    @property
    def input_fqs(self) -> list[str]:
        return [self.qualified(n) for n in self.input_nodes]


def _module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return node.name
    return str(list(stack.values())[-1][0])


def quantized_layers(model: nn.Module) -> dict[str, LayerQuant]:
    """Every conv/linear layer of the model's graphs, by eager module path (in graph order)."""
    layers: dict[str, LayerQuant] = {}
    for prefix, graph in graphs_in(model):
        for node in graph.graph.nodes:
            if node.op != "call_function" or node.target not in WEIGHT_OPS:
                continue
            name = _module_path(node)
            w, x = node.args[1], node.args[0]
            layers[f"{prefix}.{name}" if prefix else name] = LayerQuant(
                name=f"{prefix}.{name}" if prefix else name,
                op="linear" if node.target == torch.ops.aten.linear.default else "conv",
                graph=graph,
                node=node,
                weight_node=w if _is_fake_quant(graph, w) else None,
                input_nodes=[x] if _is_fake_quant(graph, x) else [],
                prefix=prefix,
            )
    return layers


def fake_quantizers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(model-qualified name, module)`` for every fake-quantizer in the model's graphs."""
    for prefix, graph in graphs_in(model):
        for name, mod in graph.named_children():
            if hasattr(mod, "fake_quant_enabled"):
                yield (f"{prefix}.{name}" if prefix else name), mod


def float_layer_quantizers(model: nn.Module, names: list[str]) -> set[str]:
    """The fake-quantizers that keeping ``names`` in float removes: their weights', and
    their inputs' where every consumer of that input is kept float too."""
    layers = quantized_layers(model)
    chosen = {layers[n].node for n in names}
    out: set[str] = set()
    for n in names:
        lq = layers[n]
        if lq.weight_node is not None:
            out.add(lq.qualified(lq.weight_node))
        for fq in lq.input_nodes:
            if all(u in chosen for u in fq.users):
                out.add(lq.qualified(fq))
    return out


def keep_float(model: nn.Module, names: list[str]) -> None:
    """Remove the fake-quantizers of layers ``names`` (see :func:`float_layer_quantizers`)
    from the graphs, so those layers train and export in float."""
    unknown = sorted(set(names) - set(quantized_layers(model)))
    if unknown:
        raise RecipeError(
            f"quantize: no conv/linear layer named {unknown[0]!r}",
            "name layers as `pqd sensitivity` lists them",
        )
    layers = quantized_layers(model)
    drop = float_layer_quantizers(model, names)
    for prefix, graph in graphs_in(model):
        for node in list(graph.graph.nodes):
            qual = f"{prefix}.{node.target}" if prefix else str(node.target)
            if node.op == "call_module" and qual in drop:
                node.replace_all_uses_with(node.args[0])
                graph.graph.erase_node(node)
                graph.delete_submodule(str(node.target))
        graph.recompile()
        scheme = graph.meta.setdefault(META_KEY, copy.deepcopy(DEFAULT_SCHEME))
        chosen = set(scheme.get("float_layers", [])) | set(names)
        scheme["float_layers"] = [n for n in layers if n in chosen and layers[n].graph is graph]
