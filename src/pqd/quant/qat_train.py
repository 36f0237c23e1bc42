"""QAT at close to float speed: what the shared training loop runs in place of a PT2E graph.

A prepared QAT graph simulates each conv-BN pair the way PT2E exports it: the conv runs on
the weight scaled by ``s = gamma / sqrt(running_var + eps)`` and fake-quantized, its output
is divided by ``s`` again and batch-normalised with the batch's statistics. On a CPU that
costs several times a float step: the division, BN and their backward passes run over every
activation, and the graph trains in fp32 because the fake-quantizers reject bf16.

Two views of the graph (new GraphModules that share its parameters, buffers and
fake-quantizers, so training a view trains the graph) make it cheap:

- **cast view**: every fake-quantizer's input is cast to fp32, so the rest of the graph can
  run under bf16 autocast (the convs) where the CPU has native bf16;
- **frozen view**, the standard QAT recipe's second phase (observers and BN statistics
  frozen after the first part of QAT): with the running statistics fixed, ``conv / s``
  followed by BN is exactly ``conv + (beta - mean * s)``, the folded conv that the INT8 file
  runs. The view computes that (same function as the graph in BN-eval mode, to the last
  bit on fp32), without the division, the batch statistics or their backward passes.

The graph itself is never changed: evaluation, ``convert_pt2e`` and export read it as
PT2E wrote it. Frozen is a state of the graph's fake-quantizers (every observer disabled),
so it survives checkpoints and resume, and every later stage trains the frozen view.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, cast

import torch
import torch.fx as fx
import torch.nn as nn

from pqd.train import StepModules, is_graph

if TYPE_CHECKING:
    from torchao.quantization.pt2e.fake_quantize import FakeQuantizeBase

_aten = torch.ops.aten
_BATCH_NORMS = (_aten.batch_norm.default, _aten._native_batch_norm_legit.default)
_RESHAPES = (_aten.reshape.default, _aten.view.default)


def _fake_quantizers(graph: nn.Module) -> list[FakeQuantizeBase]:
    return cast(
        "list[FakeQuantizeBase]", [m for m in graph.modules() if hasattr(m, "observer_enabled")]
    )


def is_frozen(graph: nn.Module) -> bool:
    """True when every fake-quantizer's observer is off (the ranges are fixed), which pqd
    takes to mean the BN statistics are frozen too (:func:`freeze`)."""
    fqs = _fake_quantizers(graph)
    return bool(fqs) and all(int(m.observer_enabled[0]) == 0 for m in fqs)


def freeze(graph: nn.Module) -> int:
    """Fix the quantization ranges (observers off, fake-quant stays on) and, from now on,
    the BN statistics (training runs the frozen view).

    Args:
        graph: a prepared QAT graph.

    Returns:
        Fake-quantizers frozen.
    """
    fqs = _fake_quantizers(graph)
    for m in fqs:
        m.observer_enabled[0] = 0
    return len(fqs)


def training_view(graph: fx.GraphModule, *, frozen_bn: bool) -> tuple[fx.GraphModule, int]:
    """A view of a prepared QAT graph for training: fake-quantizer inputs cast to fp32 and,
    with ``frozen_bn``, every conv-BN pattern replaced by the folded conv.

    Args:
        graph: the prepared QAT graph (its train/eval switch as the view should have it).
        frozen_bn: replace ``batch_norm(conv / s)`` by ``conv + (beta - mean * s)``.

    Returns:
        ``(view, folded)``: the view (sharing the graph's parameters, buffers and
        fake-quantizers) and how many conv-BN patterns it folded.
    """
    g = copy.deepcopy(graph.graph)
    fq_names = {name for name, m in graph.named_modules() if hasattr(m, "observer_enabled")}
    for node in list(g.nodes):
        if node.op == "call_module" and node.target in fq_names:
            with g.inserting_before(node):
                cast = g.call_method("float", (node.args[0],))
            node.replace_input_with(node.args[0], cast)
    folded = _fold_bn(g) if frozen_bn else 0
    view = fx.GraphModule(graph, g)
    view.graph.eliminate_dead_code()
    view.recompile()
    return view, folded


def _fold_bn(g: fx.Graph) -> int:
    folded = 0
    for bn in list(g.nodes):
        if bn.op != "call_function" or bn.target not in _BATCH_NORMS:
            continue
        div = bn.args[0]
        if not (isinstance(div, fx.Node) and div.target == _aten.div.Tensor):
            continue
        conv, shaped = div.args
        if not (isinstance(shaped, fx.Node) and shaped.target in _RESHAPES):
            continue
        scale, shape = shaped.args[0], shaped.args[1]
        beta, mean = bn.args[2], bn.args[3]
        if beta is None:
            continue
        with g.inserting_before(bn):
            moved = g.call_function(_aten.mul.Tensor, (mean, scale))
            shift = g.call_function(_aten.sub.Tensor, (beta, moved))
            shift = g.call_function(_aten.reshape.default, (shift, shape))
            out = g.call_function(_aten.add.Tensor, (conv, shift))
        if bn.target == _aten._native_batch_norm_legit.default:  # returns a tuple
            for user in list(bn.users):
                user.replace_all_uses_with(out)
                g.erase_node(user)
        else:
            bn.replace_all_uses_with(out)
        g.erase_node(bn)
        folded += 1
    # the statistics are frozen: no num_batches_tracked increments either
    for node in list(g.nodes):
        if (
            node.op == "call_function"
            and node.target == _aten.add_.Tensor
            and not node.users
            and isinstance(node.args[0], fx.Node)
            and str(node.args[0].target).endswith("num_batches_tracked")
        ):
            g.erase_node(node)
    return folded


class QatSteps:
    """What :func:`pqd.train.fit` runs at each step of training a QAT graph: the cast view,
    then the frozen view once the graph is frozen (at ``freeze_at`` of the steps, or
    before training started). Views are built when first needed."""

    def __init__(self, graph: fx.GraphModule, freeze_at: float | None) -> None:
        self.graph = graph
        self.freeze_at = freeze_at
        self.views: dict[bool, fx.GraphModule] = {}
        self.folded = 0
        self.freeze_step: int | None = None  # planned, so a resumed run records the same

    def module_at(self, step: int, total: int) -> nn.Module:
        """The module to run at optimizer step ``step`` of ``total`` (0-based)."""
        if self.freeze_at is not None:
            self.freeze_step = round(self.freeze_at * total)
            if not is_frozen(self.graph) and step >= self.freeze_step:
                freeze(self.graph)
        frozen = is_frozen(self.graph)
        if frozen not in self.views:
            self.views[frozen], folded = training_view(self.graph, frozen_bn=frozen)
            self.folded = max(self.folded, folded)
        return self.views[frozen]

    def info(self) -> dict[str, int | None]:
        """For the stage's record: the step at which this training froze the graph (None: it
        did not freeze it here) and how many conv-BN pairs the frozen view folded. Both are
        the same whether the training ran through or was resumed mid-way."""
        return {"freeze_step": self.freeze_step, "folded_conv_bn": self.folded}


def qat_steps(model: nn.Module, freeze_at: float | None) -> StepModules | None:
    """The step modules for training ``model`` when it is a prepared QAT graph, else None.

    Args:
        model: what a stage trains.
        freeze_at: fraction of this training's steps after which to freeze observers and BN
            statistics (None: only a graph frozen already trains frozen).

    Returns:
        A :class:`pqd.train.StepModules` whose modules accept bf16 activations, or None.
    """
    if not is_graph(model) or not _fake_quantizers(model):
        return None
    steps = QatSteps(model, freeze_at)  # type: ignore[arg-type]
    return StepModules(module_at=steps.module_at, autocast=True, info=steps.info)
