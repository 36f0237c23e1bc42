"""``exits.onnx``: a multi-exit network's part files joined into ONE ONNX graph that
exits for real, with ``If`` nodes that stop at the first confident exit.

Kept apart from the part files' export (:mod:`pqd.exits.export`) because joining them is
graph surgery of its own: parts renamed apart, nested ``If`` branches, exact
QuantizeLinear / DequantizeLinear round trips removed across part boundaries, and the
nodes left unread afterwards pruned from every subgraph.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from pqd.onnx_export import INPUT_NAME, OUTPUT_NAME, keep_initializers

GRAPH_FILE = "exits.onnx"
EXIT_NAME = "exit"

_Nodes = list[onnx.NodeProto]
_Inits = list[onnx.TensorProto]


def exit_graph(
    folder: str | Path, manifest: dict[str, Any], thresholds: Sequence[float], out_path: str | Path
) -> Path:
    """The whole multi-exit network as ONE ONNX graph that exits for real: after segment
    ``k`` and head ``k`` an ``If`` node returns head ``k``'s logits when the confidence
    reaches ``thresholds[k]``, else runs the rest (nested ``If``); a threshold above 1 skips
    that head. Outputs ``logits`` [N, classes] and ``exit`` [1] (int64, ``num_exits`` = the
    final head). A batch leaves at an exit only when every input in it is confident: the
    file is made for batch-1 serving (:class:`~pqd.exits.runtime.ExitRuntime` splits
    larger batches).

    Same nodes and weights as the part files. Where a part ends with QuantizeLinear ->
    DequantizeLinear and the next part starts with a QuantizeLinear of the same scale and
    zero point, the next part reads the uint8 tensor directly (the pair is an exact
    round trip), so no float tensor crosses an exit boundary. One runtime call per image:
    the per-call and per-boundary costs of running part files in turn go away.

    Args:
        folder: the folder holding the manifest's part files.
        manifest: the manifest (``segments``, ``heads``, ``num_classes``).
        thresholds: one per head (above 1: never exits there).
        out_path: where to write the graph.

    Returns:
        ``out_path``.
    """
    folder = Path(folder)
    parts = {
        e["file"]: onnx.load(str(folder / e["file"]))
        for e in (*manifest["segments"], *manifest["heads"])
    }
    builder = _ExitGraphBuilder(parts, manifest, thresholds)
    nodes, inits, logits, idx = builder.branch(0, INPUT_NAME)
    nodes += _returning(logits, idx, OUTPUT_NAME, EXIT_NAME)
    classes = int(manifest["num_classes"])
    first = parts[manifest["segments"][0]["file"]]
    graph = helper.make_graph(
        nodes,
        "pqd_exits",
        [copy.deepcopy(first.graph.input[0])],
        [_logits_info(OUTPUT_NAME, classes), _exit_info(EXIT_NAME)],
        initializer=inits,
    )
    graph.input[0].name = INPUT_NAME
    proto = helper.make_model(graph, opset_imports=list(first.opset_import))
    proto.ir_version = first.ir_version
    _drop_unused(proto.graph)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(out_path))
    return Path(out_path)


class _ExitGraphBuilder:
    """The part graphs, renamed apart (prefix ``p{k}/``), and the nested ``If`` branches
    built from them for ``thresholds``."""

    def __init__(
        self,
        parts: dict[str, onnx.ModelProto],
        manifest: dict[str, Any],
        thresholds: Sequence[float],
    ) -> None:
        self.manifest = manifest
        self.thresholds = thresholds
        self.classes = int(manifest["num_classes"])
        self.consts: dict[str, np.ndarray] = {}
        self.loaded: dict[str, tuple[_Nodes, _Inits, list[str], str]] = {}
        for k, (fname, model) in enumerate(parts.items()):
            g = onnx.compose.add_prefix(model, f"p{k}/").graph
            self.loaded[fname] = (
                list(g.node),
                list(g.initializer),
                [o.name for o in g.output],
                g.input[0].name,
            )
            self.consts.update({i.name: numpy_helper.to_array(i) for i in g.initializer})
        self.producers: dict[str, onnx.NodeProto] = {}

    def bind(self, fname: str, source: str) -> tuple[_Nodes, _Inits, list[str]]:
        """A copy of part ``fname``'s nodes reading ``source``, skipping a leading
        QuantizeLinear that an exact DequantizeLinear round trip makes redundant:
        (nodes, initializers, output names)."""
        nodes, inits, outs, inp = self.loaded[fname]
        nodes = [copy.deepcopy(n) for n in nodes]
        for n in nodes:
            n.input[:] = [source if i == inp else i for i in n.input]
        dq = self.producers.get(source)
        if dq is not None and dq.op_type == "DequantizeLinear":
            for q in [n for n in nodes if n.op_type == "QuantizeLinear" and n.input[0] == source]:
                if _same_qparams(dq, q, self.consts):
                    nodes.remove(q)
                    for n in nodes:
                        n.input[:] = [dq.input[0] if i == q.output[0] else i for i in n.input]
        self.producers.update({o: n for n in nodes for o in n.output})
        return nodes, inits, outs

    def branch(self, k: int, source: str) -> tuple[_Nodes, _Inits, str, str]:
        """Segment ``k`` onwards reading ``source``: (nodes, initializers, logits name,
        exit index name)."""
        segments = self.manifest["segments"]
        nodes, inits, outs = self.bind(segments[k]["file"], source)
        if k == len(segments) - 1:
            idx = f"exit_index_{k}"
            n_exits = len(self.manifest["heads"])
            inits = [*inits, numpy_helper.from_array(np.array([n_exits], np.int64), idx)]
            return nodes, inits, outs[0], idx
        if self.thresholds[k] > 1.0:  # never exits here: no head, no If
            rest, rest_inits, logits, idx = self.branch(k + 1, outs[0])
            return nodes + rest, inits + rest_inits, logits, idx
        h_nodes, h_inits, (logits, conf) = self.bind(self.manifest["heads"][k]["file"], outs[0])
        thr, mn, cond = f"exit_threshold_{k}", f"exit_min_conf_{k}", f"exit_cond_{k}"
        idx_k, out_l, out_i = f"exit_index_{k}", f"exit_logits_{k}", f"exit_taken_{k}"
        nodes += [
            *h_nodes,
            helper.make_node("ReduceMin", [conf], [mn], keepdims=0),
            helper.make_node("GreaterOrEqual", [mn, thr], [cond]),
        ]
        inits = [
            *inits,
            *h_inits,
            numpy_helper.from_array(np.array(self.thresholds[k], np.float32), thr),
            numpy_helper.from_array(np.array([k], np.int64), idx_k),
        ]
        then = self._subgraph(k, "then", f"exit_{k}", [], [], logits, idx_k)
        rest, rest_inits, r_logits, r_idx = self.branch(k + 1, outs[0])
        other = self._subgraph(k, "else", f"continue_{k}", rest, rest_inits, r_logits, r_idx)
        nodes.append(
            helper.make_node(
                "If",
                [cond],
                [out_l, out_i],
                name=f"exit_if_{k}",
                then_branch=then,
                else_branch=other,
            )
        )
        return nodes, inits, out_l, out_i

    def _subgraph(
        self, k: int, tag: str, name: str, nodes: _Nodes, inits: _Inits, logits: str, idx: str
    ) -> onnx.GraphProto:
        """An ``If`` branch running ``nodes`` that returns ``logits`` and ``idx`` as
        ``{tag}_logits_{k}`` and ``{tag}_exit_{k}``."""
        out_l, out_i = f"{tag}_logits_{k}", f"{tag}_exit_{k}"
        return helper.make_graph(
            [*nodes, *_returning(logits, idx, out_l, out_i)],
            name,
            [],
            [_logits_info(out_l, self.classes), _exit_info(out_i)],
            initializer=inits,
        )


def _returning(logits: str, idx: str, out_logits: str, out_idx: str) -> _Nodes:
    """Identity nodes naming ``logits`` and ``idx`` as a graph's outputs."""
    return [
        helper.make_node("Identity", [logits], [out_logits]),
        helper.make_node("Identity", [idx], [out_idx]),
    ]


def _same_qparams(dq: onnx.NodeProto, q: onnx.NodeProto, consts: dict[str, np.ndarray]) -> bool:
    """Whether QuantizeLinear ``q`` undoes DequantizeLinear ``dq`` exactly (same constant
    scale and zero point, per tensor)."""
    if len(dq.input) < 3 or len(q.input) < 3:  # (axis is ignored for a scalar scale)
        return False
    pairs = [(consts.get(dq.input[i]), consts.get(q.input[i])) for i in (1, 2)]
    return all(
        a is not None
        and b is not None
        and a.size == 1
        and a.dtype == b.dtype
        and np.array_equal(a, b)
        for a, b in pairs
    )


def _logits_info(name: str, classes: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, ["batch", classes])


def _exit_info(name: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, onnx.TensorProto.INT64, [1])


def _drop_unused(graph: onnx.GraphProto) -> None:
    """Remove nodes (and initializers) whose outputs nothing reads, in every subgraph
    (the float DequantizeLinear left behind where a boundary now passes uint8)."""

    def reads(g: onnx.GraphProto) -> set[str]:
        used = {o.name for o in g.output}
        for n in g.node:
            used.update(n.input)
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    used |= reads(a.g)
        return used

    def prune(g: onnx.GraphProto, used: set[str]) -> None:
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    prune(a.g, used)
        keep = [n for n in g.node if any(o in used for o in n.output)]
        del g.node[:]
        g.node.extend(keep)
        keep_initializers(g, used)

    while True:
        used = reads(graph)
        before = _count_nodes(graph)
        prune(graph, used)
        if _count_nodes(graph) == before:
            return


def _count_nodes(g: onnx.GraphProto) -> int:
    return len(g.node) + sum(
        _count_nodes(a.g)
        for n in g.node
        for a in n.attribute
        if a.type == onnx.AttributeProto.GRAPH
    )
