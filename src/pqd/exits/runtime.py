"""Deploy a multi-exit network: segment ONNX files, a manifest, and a runtime that stops
at the first confident exit.

Files (in ``exits/`` of a run folder)::

    segment_0.onnx   input: image float32 [N,C,H,W] in [0,1] (normalisation inside) -> output
    head_0.onnx      input: segment_0's output -> logits [N,classes], confidence [N]
    segment_1.onnx   input: segment_0's output -> output
    ...
    segment_K.onnx   -> logits (ends with the original classifier)
    exit_k.onnx      segment_k and head_k fused into one graph (same nodes and weights):
                     -> output, logits, confidence; the runtime's fast path (one call per
                     exit instead of two)
    exits.onnx       the whole network as one graph with ``If`` nodes that stop at the
                     first confident exit (thresholds inside; uint8 tensors across exit
                     boundaries): one call per image, the deployed batch-1 path
    manifest.json    order, thresholds, confidence kind, MACs / BitOps / bytes per file

Quantized parts are INT8 QDQ (U8S8, like ``final.onnx``), others FP32. A head's
``confidence`` is computed inside its graph: the top softmax probability
(``max_softmax``) or ``1 - entropy / ln(classes)`` (``entropy``); an input leaves at
exit ``k`` when its confidence is >= ``thresholds[k]`` (a threshold > 1 never exits).

:class:`ExitRuntime` runs the files segment by segment on onnxruntime (or OpenVINO).
:func:`chain_segments` writes the same segments as one ONNX graph without heads: the
"exits disabled" artifact of the same weights (the pipeline's ``final.onnx``).
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import helper, numpy_helper

from pqd.measurement.runtime import open_runner, static_batch
from pqd.onnx_export import INPUT_NAME, OUTPUT_NAME, export_onnx
from pqd.onnx_export.proto import keep_initializers
from pqd.progress import bar

MANIFEST = "manifest.json"
FEATURES_NAME = "output"
CONFIDENCE_NAME = "confidence"
MANIFEST_FORMAT = "pqd-early-exit/1"


# ---------------------------------------------------------------------------- export


def add_confidence_output(proto: onnx.ModelProto, kind: str, num_classes: int) -> None:
    """Append a ``confidence`` output [N] computed from the ``logits`` output (in place)."""
    g = proto.graph
    axes = "pqd_conf_axes"
    g.initializer.append(numpy_helper.from_array(np.array([1], np.int64), axes))
    if kind == "max_softmax":
        g.node.extend(
            [
                helper.make_node("Softmax", [OUTPUT_NAME], ["pqd_probs"], axis=1),
                helper.make_node("ReduceMax", ["pqd_probs", axes], [CONFIDENCE_NAME], keepdims=0),
            ]
        )
    elif kind == "entropy":
        inv_log = "pqd_conf_inv_log_classes"
        one = "pqd_conf_one"
        g.initializer.append(
            numpy_helper.from_array(np.array(1.0 / math.log(num_classes), np.float32), inv_log)
        )
        g.initializer.append(numpy_helper.from_array(np.array(1.0, np.float32), one))
        g.node.extend(
            [
                helper.make_node("LogSoftmax", [OUTPUT_NAME], ["pqd_logp"], axis=1),
                helper.make_node("Exp", ["pqd_logp"], ["pqd_p"]),
                helper.make_node("Mul", ["pqd_p", "pqd_logp"], ["pqd_plogp"]),
                helper.make_node("ReduceSum", ["pqd_plogp", axes], ["pqd_neg_entropy"], keepdims=0),
                helper.make_node("Mul", ["pqd_neg_entropy", inv_log], ["pqd_scaled"]),
                helper.make_node("Add", ["pqd_scaled", one], [CONFIDENCE_NAME]),
            ]
        )
    else:
        raise ValueError(f"unknown confidence {kind!r}")
    batch = g.output[0].type.tensor_type.shape.dim[0]
    out = helper.make_tensor_value_info(CONFIDENCE_NAME, onnx.TensorProto.FLOAT, [None])
    out.type.tensor_type.shape.dim[0].CopyFrom(batch)
    g.output.append(out)


def export_exits(
    net: nn.Module, out_dir: str | Path, example: torch.Tensor, *, quantized: bool, opset: int = 20
) -> tuple[dict[str, Any], nn.Module]:
    """Write every segment and head of ``net`` (a MultiExitNet) plus ``manifest.json``.

    Returns the manifest and the deployable torch copy of ``net`` (INT8-converted parts
    when quantized) whose ``forward_all`` the files reproduce.
    """
    from pqd.measurement.artifacts import size_bytes
    from pqd.measurement.complexity import onnx_complexity
    from pqd.models.multi_exit import part_inputs

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    inputs = part_inputs(net, example[:2])
    deploy = _copy_container(net)
    entries: dict[str, list[dict[str, Any]]] = {"segments": [], "heads": []}
    last = len(net.segments) - 1
    for name, part in net.parts():
        kind, k = name.split(".")
        k = int(k)
        fname = f"{kind[:-1]}_{k}.onnx"
        final = kind == "segments" and k == last
        out_name = OUTPUT_NAME if (kind == "heads" or final) else FEATURES_NAME
        path, torch_part = export_onnx(
            part, out / fname, inputs[name], quantized=quantized, opset=opset, output_name=out_name
        )
        if kind == "heads":
            proto = onnx.load(str(path))
            add_confidence_output(proto, net.confidence, net.num_classes)
            onnx.checker.check_model(proto)
            onnx.save(proto, str(path))
        deploy.set_part(name, torch_part)
        comp = onnx_complexity(path)
        entry = {
            "file": fname,
            "macs": comp["macs"],
            "bitops": comp["bitops"],
            "params": comp["params"],
            "nonzero_params": comp["nonzero_params"],
            "sparsity": comp["sparsity"],
            "size_bytes": size_bytes(path),
            "input_shape": list(inputs[name].shape[1:]),
        }
        if kind == "segments":
            entry["blocks"] = (
                net.segments[k].block_indices if hasattr(net.segments[k], "block_indices") else None
            )
        entries[kind].append(entry)
    fused = []
    for k, head in enumerate(entries["heads"]):
        path = fuse_exit(
            out / entries["segments"][k]["file"], out / head["file"], out / f"exit_{k}.onnx"
        )
        fused.append({"file": path.name, "size_bytes": size_bytes(path)})
    manifest = {
        "format": MANIFEST_FORMAT,
        "confidence": net.confidence,
        "num_classes": net.num_classes,
        "precision": "int8" if quantized else "fp32",
        "positions": list(net.positions),
        "thresholds": [_json_threshold(t) for t in net.thresholds],
        "input": {
            "name": INPUT_NAME,
            "shape": list(example.shape[1:]),
            "dtype": "float32",
            "range": [0.0, 1.0],
        },
        "order": [
            e["file"] for pair in _interleave(entries["segments"], entries["heads"]) for e in pair
        ],
        "segments": entries["segments"],
        "heads": entries["heads"],
        "fused": fused,
    }
    write_graph(manifest, out)
    write_manifest(manifest, out)
    return manifest, deploy


def write_graph(manifest: dict[str, Any], out_dir: str | Path) -> None:
    """(Re)write ``exits.onnx`` for the manifest's thresholds and record it in the
    manifest (in place; the caller writes the manifest)."""
    path = exit_graph(out_dir, manifest, thresholds_of(manifest), Path(out_dir) / GRAPH_FILE)
    from pqd.measurement.artifacts import size_bytes

    manifest["graph"] = {
        "file": path.name,
        "size_bytes": size_bytes(path),
        "thresholds": list(manifest["thresholds"]),
    }


def _interleave(segs: list, heads: list) -> list[list]:
    return [[s, heads[k]] if k < len(heads) else [s] for k, s in enumerate(segs)]


def _json_threshold(t: float) -> float | None:
    return None if not math.isfinite(t) else float(t)


def thresholds_of(manifest: dict[str, Any]) -> list[float]:
    """Thresholds from a manifest (``null`` = never exit)."""
    return [math.inf if t is None else float(t) for t in manifest["thresholds"]]


def write_manifest(manifest: dict[str, Any], out_dir: str | Path) -> Path:
    """Write ``manifest.json`` into ``out_dir``."""
    from pqd.checkpoint import atomic_write_text

    path = Path(out_dir) / MANIFEST
    atomic_write_text(path, json.dumps(manifest, indent=2))
    return path


def _copy_container(net: nn.Module) -> nn.Module:
    """A shallow structural copy of a MultiExitNet whose parts can be replaced freely."""
    from pqd.models.multi_exit import MultiExitNet

    clone = MultiExitNet(
        list(net.segments), list(net.heads), net.positions, net.num_classes, net.confidence
    )
    clone.thresholds = list(net.thresholds)
    clone.part_macs = copy.deepcopy(net.part_macs)
    return clone


def fuse_exit(segment: str | Path, head: str | Path, out_path: str | Path) -> Path:
    """One ONNX graph running ``segment`` then ``head`` on its output; outputs: the
    segment's ``output`` (for the next segment), the head's ``logits`` and ``confidence``.

    The nodes and weights are those of the two files: only the runtime calls change
    (one per exit instead of two)."""
    seg = onnx.load(str(segment))
    hd = onnx.compose.add_prefix(onnx.load(str(head)), "head/")
    merged = onnx.compose.merge_models(
        seg,
        hd,
        io_map=[(FEATURES_NAME, f"head/{INPUT_NAME}")],
        outputs=[FEATURES_NAME, f"head/{OUTPUT_NAME}", f"head/{CONFIDENCE_NAME}"],
    )
    for name in (OUTPUT_NAME, CONFIDENCE_NAME):
        _rename(merged.graph, f"head/{name}", name)
    by_name = {o.name: o for o in merged.graph.output}
    order = [copy.deepcopy(by_name[n]) for n in (FEATURES_NAME, OUTPUT_NAME, CONFIDENCE_NAME)]
    del merged.graph.output[:]
    merged.graph.output.extend(order)
    onnx.checker.check_model(merged)
    onnx.save(merged, str(out_path))
    return Path(out_path)


def chain_segments(paths: Sequence[str | Path], out_path: str | Path) -> Path:
    """One ONNX graph running ``paths`` back to back (input ``input``, output ``logits``)."""
    models = [onnx.load(str(p)) for p in paths]
    merged = onnx.compose.add_prefix(models[0], "s0/")
    for k, m in enumerate(models[1:], start=1):
        m = onnx.compose.add_prefix(m, f"s{k}/")
        merged = onnx.compose.merge_models(
            merged, m, io_map=[(merged.graph.output[0].name, m.graph.input[0].name)]
        )
    _rename(merged.graph, merged.graph.input[0].name, INPUT_NAME)
    _rename(merged.graph, merged.graph.output[0].name, OUTPUT_NAME)
    onnx.checker.check_model(merged)
    onnx.save(merged, str(out_path))
    return Path(out_path)


GRAPH_FILE = "exits.onnx"
EXIT_NAME = "exit"


def exit_graph(
    folder: str | Path, manifest: dict[str, Any], thresholds: Sequence[float], out_path: str | Path
) -> Path:
    """The whole multi-exit network as ONE ONNX graph that exits for real: after segment
    ``k`` and head ``k`` an ``If`` node returns head ``k``'s logits when the confidence
    reaches ``thresholds[k]``, else runs the rest (nested ``If``); a threshold above 1 skips
    that head. Outputs ``logits`` [N, classes] and ``exit`` [1] (int64, ``num_exits`` = the
    final head). A batch leaves at an exit only when every input in it is confident: the
    file is made for batch-1 serving (:class:`ExitRuntime` splits larger batches).

    Same nodes and weights as the part files. Where a part ends with QuantizeLinear ->
    DequantizeLinear and the next part starts with a QuantizeLinear of the same scale and
    zero point, the next part reads the uint8 tensor directly (the pair is an exact
    round trip), so no float tensor crosses an exit boundary. One runtime call per image:
    the per-call and per-boundary costs of running part files in turn go away.
    """
    folder = Path(folder)
    parts = {
        e["file"]: onnx.load(str(folder / e["file"]))
        for e in (*manifest["segments"], *manifest["heads"])
    }
    consts: dict[str, np.ndarray] = {}
    loaded: dict[str, tuple[list[onnx.NodeProto], list[onnx.TensorProto], list[str], str]] = {}
    for k, (fname, model) in enumerate(parts.items()):
        g = onnx.compose.add_prefix(model, f"p{k}/").graph
        loaded[fname] = (
            list(g.node),
            list(g.initializer),
            [o.name for o in g.output],
            g.input[0].name,
        )
        consts.update({i.name: numpy_helper.to_array(i) for i in g.initializer})
    producers: dict[str, onnx.NodeProto] = {}

    def bind(
        fname: str, source: str
    ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], list[str]]:
        nodes, inits, outs, inp = loaded[fname]
        nodes = [copy.deepcopy(n) for n in nodes]
        for n in nodes:
            n.input[:] = [source if i == inp else i for i in n.input]
        dq = producers.get(source)
        if dq is not None and dq.op_type == "DequantizeLinear":
            for q in [n for n in nodes if n.op_type == "QuantizeLinear" and n.input[0] == source]:
                if _same_qparams(dq, q, consts):
                    nodes.remove(q)
                    for n in nodes:
                        n.input[:] = [dq.input[0] if i == q.output[0] else i for i in n.input]
        producers.update({o: n for n in nodes for o in n.output})
        return nodes, inits, outs

    classes = int(manifest["num_classes"])
    n_exits = len(manifest["heads"])

    def branch(
        k: int, source: str
    ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], str, str]:
        nodes, inits, outs = bind(manifest["segments"][k]["file"], source)
        if k == len(manifest["segments"]) - 1:
            idx = f"exit_index_{k}"
            inits = [*inits, numpy_helper.from_array(np.array([n_exits], np.int64), idx)]
            return nodes, inits, outs[0], idx
        if thresholds[k] > 1.0:  # never exits here: no head, no If
            rest, rest_inits, logits, idx = branch(k + 1, outs[0])
            return nodes + rest, inits + rest_inits, logits, idx
        h_nodes, h_inits, (logits, conf) = bind(manifest["heads"][k]["file"], outs[0])
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
            numpy_helper.from_array(np.array(thresholds[k], np.float32), thr),
            numpy_helper.from_array(np.array([k], np.int64), idx_k),
        ]
        then = helper.make_graph(
            [
                helper.make_node("Identity", [logits], [f"then_logits_{k}"]),
                helper.make_node("Identity", [idx_k], [f"then_exit_{k}"]),
            ],
            f"exit_{k}",
            [],
            [_logits_info(f"then_logits_{k}", classes), _exit_info(f"then_exit_{k}")],
        )
        rest, rest_inits, r_logits, r_idx = branch(k + 1, outs[0])
        rest += [
            helper.make_node("Identity", [r_logits], [f"else_logits_{k}"]),
            helper.make_node("Identity", [r_idx], [f"else_exit_{k}"]),
        ]
        other = helper.make_graph(
            rest,
            f"continue_{k}",
            [],
            [_logits_info(f"else_logits_{k}", classes), _exit_info(f"else_exit_{k}")],
            initializer=rest_inits,
        )
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

    nodes, inits, logits, idx = branch(0, INPUT_NAME)
    nodes += [
        helper.make_node("Identity", [logits], [OUTPUT_NAME]),
        helper.make_node("Identity", [idx], [EXIT_NAME]),
    ]
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


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
    for v in (*graph.input, *graph.output, *graph.value_info):
        if v.name == old:
            v.name = new


# ---------------------------------------------------------------------------- runtime


class ExitRuntime:
    """Run a manifest's files segment by segment, stopping at the first confident exit.

    ``thresholds`` overrides the manifest's (a threshold above 1 never exits: that head is
    not run at all); ``batch`` fixes the batch (OpenVINO compiles it static); ``fused``
    runs each exit's segment and head as one call (``exit_k.onnx``; the same graph).
    onnxruntime sessions are opened with ``spinning`` (default off: each session has its
    own busy-waiting workers, and several sessions called in turn fight over the cores).

        rt = ExitRuntime("runs/ee/exits/manifest.json")
        logits, exit_index = rt.run(x)        # x: float32 [N,C,H,W] in [0,1]
    """

    def __init__(
        self,
        manifest: str | Path,
        runtime: str = "onnxruntime",
        threads: int = 2,
        thresholds: Sequence[float] | None = None,
        batch: int | None = None,
        fused: bool = True,
        spinning: bool = False,
        graph: bool = True,
    ) -> None:
        path = Path(manifest)
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"{path}: not a pqd early-exit manifest")
        folder = path.parent
        self.runtime = runtime
        self.segments = [
            open_runner(runtime, folder / s["file"], threads, batch, spinning=spinning).run
            for s in self.manifest["segments"]
        ]
        self.heads = [
            open_runner(
                runtime, folder / h["file"], threads, batch, all_outputs=True, spinning=spinning
            ).run
            for h in self.manifest["heads"]
        ]
        self.fused = (
            [
                open_runner(
                    runtime, folder / f["file"], threads, batch, all_outputs=True, spinning=spinning
                ).run
                for f in self.manifest["fused"]
            ]
            if fused and self.manifest.get("fused")
            else None
        )
        self.thresholds = list(thresholds_of(self.manifest) if thresholds is None else thresholds)
        if len(self.thresholds) != len(self.heads):
            raise ValueError(f"{len(self.heads)} exits need {len(self.heads)} thresholds")
        entry = self.manifest.get("graph")
        self.graph = None  # exits.onnx: run_one's path while the thresholds are its own
        self.graph_thresholds = thresholds_of(entry) if entry else None
        if graph and entry:
            self.graph = open_runner(
                runtime, folder / entry["file"], threads, batch, all_outputs=True
            ).run  # one session: spinning as final

    @property
    def uses_graph(self) -> bool:
        """Whether :meth:`run_one` runs ``exits.onnx`` (opened, and written for these
        thresholds) rather than the part files."""
        return self.graph is not None and self.thresholds == self.graph_thresholds

    @property
    def num_exits(self) -> int:
        """Early exits (heads)."""
        return len(self.heads)

    def _exit(self, k: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Segment ``k`` then head ``k``: (features, logits, confidence)."""
        if self.fused is not None:
            feats, logits, conf = self.fused[k](x)
            return feats, logits, conf
        feats = self.segments[k](x)
        logits, conf = self.heads[k](feats)
        return feats, logits, conf

    def run_one(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        """Batch-1 fast path: (logits [1, classes], exit index; ``num_exits`` = final); one
        call of ``exits.onnx`` when the runtime has it, else the part files in turn."""
        if self.uses_graph:
            logits, where = self.graph(x)
            return logits, int(where[0])
        return self.run_files(x)

    def run_files(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        """Batch 1 through the part files in turn (fused exit files where written)."""
        for k, t in enumerate(self.thresholds):
            if t > 1.0:  # never exits here: skip the head
                x = self.segments[k](x)
                continue
            x, logits, conf = self._exit(k, x)
            if conf[0] >= t:
                return logits, k
        return self.segments[-1](x), len(self.heads)

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Any batch: (logits [N, classes], exit index per input); confident inputs leave,
        the rest go on as a smaller batch."""
        if len(x) == 1:
            logits, k = self.run_one(x)
            return logits, np.array([k])
        n = len(x)
        out = np.empty((n, int(self.manifest["num_classes"])), np.float32)
        where = np.full(n, len(self.heads), np.int64)
        idx = np.arange(n)
        for k, t in enumerate(self.thresholds):
            if t > 1.0:
                x = self.segments[k](x)
                continue
            x, logits, conf = self._exit(k, x)
            done = conf >= t
            out[idx[done]] = logits[done]
            where[idx[done]] = k
            idx, x = idx[~done], x[~done]
            if not len(idx):
                return out, where
        out[idx] = self.segments[-1](x)
        return out, where

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.run(x)[0]

    def run_all(self, x: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Every exit on the whole batch: (logits per exit + final, confidence per exit)."""
        logits, confs = [], []
        for k in range(len(self.heads)):
            x, lg, conf = self._exit(k, x)
            logits.append(lg)
            confs.append(conf)
        logits.append(self.segments[-1](x))
        return logits, confs

    def run_segments(self, x: np.ndarray) -> np.ndarray:
        """The segments back to back without heads (exits disabled, one call per segment)."""
        for seg in self.segments:
            x = seg(x)
        return x


def all_exit_outputs(
    rt: ExitRuntime,
    x_uint8: torch.Tensor,
    batch_size: int = 256,
    desc: str = "exits",
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(logits [exits+1, N, classes], confidences [exits, N]) of uint8 images."""
    logits: list[list[np.ndarray]] = []
    confs: list[list[np.ndarray]] = []
    steps = range(0, len(x_uint8), batch_size)
    for i in bar(steps, desc=desc, unit="batch", show=progress, leave=False):
        x = x_uint8[i : i + batch_size].float().div_(255.0).numpy()
        lg, cf = rt.run_all(x)
        logits.append(lg)
        confs.append(cf)
    n_exits = rt.num_exits
    lg_all = np.stack([np.concatenate([b[k] for b in logits]) for k in range(n_exits + 1)])
    cf_all = (
        np.stack([np.concatenate([b[k] for b in confs]) for k in range(n_exits)])
        if n_exits
        else np.zeros((0, len(x_uint8)), np.float32)
    )
    return lg_all.astype(np.float32), cf_all.astype(np.float32)


def latency_over_split(
    runs: dict[str, Callable[[np.ndarray], Any]],
    x_uint8: torch.Tensor,
    *,
    rounds: int = 3,
    warmup: int = 50,
    progress: bool = True,
    desc: str = "exit latency",
    switch_pause_ms: float = 100.0,
) -> dict[str, dict[str, float]]:
    """Batch-1 wall time (ms) of every ``runs[name](x)`` over every image of ``x_uint8``.

    The runs take turns: each round times every run over the whole split, one image per
    call, in the same order, with ``switch_pause_ms`` of idle time after each (onnxruntime
    workers spin on after a session's last call); mean, p50, p90, min over all samples.
    """
    xs = [x_uint8[i : i + 1].float().div_(255.0).numpy() for i in range(len(x_uint8))]
    for run in runs.values():
        for i in range(min(warmup, len(xs))):
            run(xs[i])
    samples: dict[str, list[float]] = {name: [] for name in runs}
    shown = bar(
        total=rounds * len(runs) * len(xs), desc=desc, unit="run", show=progress, leave=False
    )
    for _ in range(rounds):
        for name, run in runs.items():
            times = samples[name]
            for x in xs:
                t0 = time.perf_counter()
                run(x)
                times.append(time.perf_counter() - t0)
            shown.update(len(xs))
            time.sleep(switch_pause_ms / 1e3)  # let spinning workers of this row go idle
    shown.close()
    out = {}
    for name, s in samples.items():
        ms = np.asarray(s) * 1e3
        out[name] = {
            "mean": round(float(ms.mean()), 4),
            "p50": round(float(np.percentile(ms, 50)), 4),
            "p90": round(float(np.percentile(ms, 90)), 4),
            "min": round(float(ms.min()), 4),
            "samples": len(ms),
            "rounds": rounds,
        }
    return out


# ---------------------------------------------------------------------------- measurement


def _expected(
    entries: dict[str, list[dict[str, Any]]],
    key: str,
    fractions: Sequence[float],
    thresholds: Sequence[float] | None = None,
) -> tuple[float, int]:
    """(expected per-image ``key`` under exit ``fractions``, value without exits); heads
    whose threshold is above 1 are never run (:class:`ExitRuntime` skips them)."""
    costs = _cumulative(entries, key, thresholds)
    return float(np.dot(fractions, costs)), int(sum(e[key] for e in entries["segments"]))


REFERENCE_PREFIX = "exit_"


def exit_references(
    deploy: nn.Module, data: Any, parity_samples: int | None
) -> dict[str, np.ndarray]:
    """Logits of every exit (``exit_0``...; the last is the final head) of the deployable
    torch MultiExitNet on the first ``parity_samples`` test images, for the parity check."""
    n_par = len(data.test_y) if parity_samples is None else min(parity_samples, len(data.test_y))
    batches = []
    with torch.no_grad():
        for i in range(0, n_par, 256):
            x = data.test_x[i : min(i + 256, n_par)].float().div_(255.0)
            batches.append([o.float().numpy() for o in deploy.forward_all(x)])
    if not batches:
        return {}
    return {
        f"{REFERENCE_PREFIX}{k}": np.concatenate([b[k] for b in batches])
        for k in range(len(batches[0]))
    }


def references_of(references: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The per-exit logits of :func:`exit_references` from a dict holding other keys too."""
    keys = sorted(
        (k for k in references if k.startswith(REFERENCE_PREFIX)),
        key=lambda k: int(k[len(REFERENCE_PREFIX) :]),
    )
    return [references[k] for k in keys]


def measure_exits(
    manifest_path: str | Path,
    final_path: str | Path,
    ref_logits: Sequence[np.ndarray],
    data: Any,
    spec: Any,
    target: Any,
    *,
    rounds: int = 3,
    progress: bool = True,
) -> dict[str, Any]:
    """Calibrate the manifest's thresholds on the validation split with the deployed files,
    then measure on the test split: accuracy per exit and with exits, exit fractions,
    expected MACs / BitOps, and batch-1 latency over every test image next to the same
    weights with exits disabled (``final_path``, one graph; and the segments run back to
    back without heads). ``ref_logits``: the torch model's logits per exit on the first test
    images (:func:`exit_references`), for parity. ``spec`` is the recipe's MeasureSpec with
    runtimes resolved, ``target`` an ExitTarget."""
    from pqd.exits.heads import calibrate_thresholds, exit_assignment
    from pqd.measurement.parity import parity

    manifest_path = Path(manifest_path)
    manifest = json.loads(manifest_path.read_text())
    primary = spec.runtimes[0]
    y_val, y_test = data.val_y.numpy(), data.test_y.numpy()
    entries = {"segments": manifest["segments"], "heads": manifest["heads"]}
    costs_macs = _cumulative(entries, "macs")
    full_macs = sum(e["macs"] for e in manifest["segments"])

    # thresholds: calibrated on the validation split with the primary runtime's outputs
    rt = ExitRuntime(
        manifest_path, primary, spec.threads, thresholds=[math.inf] * len(manifest["heads"])
    )
    val_logits, val_conf = all_exit_outputs(
        rt, data.val_x, spec.accuracy_batch_size, "exits val", progress
    )
    val_correct = val_logits.argmax(2) == y_val[None, :]
    found = calibrate_thresholds(val_conf, val_correct, costs_macs, target, full_macs)
    thresholds = [float(t) for t in found["thresholds"]]
    manifest["thresholds"] = [_json_threshold(t) for t in thresholds]
    manifest["calibration"] = {
        "split": "val",
        "images": len(y_val),
        "runtime": primary,
        "target": {k: v for k, v in target.model_dump().items() if v is not None},
        "target_met": found["target_met"],
        "accuracy_with_exits": found["accuracy"],
        "reference_accuracy": found["reference_accuracy"],
        "exit_fractions": found["exit_fractions"],
    }
    write_graph(manifest, manifest_path.parent)
    write_manifest(manifest, manifest_path.parent)

    n_par = len(ref_logits[0]) if len(ref_logits) else 0
    result: dict[str, Any] = {
        "positions": manifest["positions"],
        "confidence": manifest["confidence"],
        "thresholds": manifest["thresholds"],
        "target": manifest["calibration"]["target"],
        "target_met": found["target_met"],
        "val": {
            "exit_accuracy": [float(c.mean()) for c in val_correct],
            "accuracy_with_exits": found["accuracy"],
            "accuracy_no_exits": found["reference_accuracy"],
            "exit_fractions": found["exit_fractions"],
        },
        "manifest": str(manifest_path.relative_to(manifest_path.parent.parent)),
        "files": manifest["order"],
        "size_bytes": sum(e["size_bytes"] for e in (*manifest["segments"], *manifest["heads"])),
        "graph": {"file": f"exits/{GRAPH_FILE}", "size_bytes": manifest["graph"]["size_bytes"]},
        "part_macs": {k: [e["macs"] for e in v] for k, v in entries.items()},
        "runtimes": {},
    }
    for name in spec.runtimes:
        rt = ExitRuntime(manifest_path, name, spec.threads, thresholds=thresholds)
        logits, conf = all_exit_outputs(
            rt, data.test_x, spec.accuracy_batch_size, f"exits test ({name})", progress
        )
        correct = logits.argmax(2) == y_test[None, :]
        where = exit_assignment(conf, thresholds)
        chosen = logits[where, np.arange(len(y_test))]
        # the runtime's own early-exit path must give the same answers as the bulk outputs
        run_pred = np.concatenate(
            [
                rt.run(data.test_x[i : i + 64].float().div_(255.0).numpy())[0].argmax(1)
                for i in range(0, len(y_test), 64)
            ]
        )
        graph_agreement = None
        if rt.uses_graph:
            # exits.onnx, one image at a time: the same exit and the same answer
            one_by_one = [
                rt.run_one(data.test_x[i : i + 1].float().div_(255.0).numpy())
                for i in range(len(y_test))
            ]
            graph_agreement = float(
                np.mean(
                    [
                        lg.argmax() == chosen[i].argmax() and k == where[i]
                        for i, (lg, k) in enumerate(one_by_one)
                    ]
                )
            )
        fractions = (np.bincount(where, minlength=len(thresholds) + 1) / len(y_test)).tolist()
        exp_macs, _ = _expected(entries, "macs", fractions, thresholds)
        exp_bitops, full_bitops = _expected(entries, "bitops", fractions, thresholds)
        one = 1 if static_batch(name) else None
        lat_rt = (
            rt
            if one is None
            else ExitRuntime(manifest_path, name, spec.threads, thresholds=thresholds, batch=1)
        )
        unfused = ExitRuntime(
            manifest_path,
            name,
            spec.threads,
            thresholds=thresholds,
            batch=one,
            fused=False,
            graph=False,
        )
        final_run = open_runner(name, final_path, spec.threads, batch=one).run
        lat = latency_over_split(
            {
                "exits": lat_rt.run_one,
                "final": final_run,
                "files": lat_rt.run_files,
                "segments": lat_rt.run_segments,
                "unfused": unfused.run_files,
            },
            data.test_x,
            rounds=rounds,
            warmup=spec.warmup,
            progress=progress,
            desc=f"exit latency ({name})",
        )
        res = {
            "per_exit_accuracy": [float(c.mean()) for c in correct],
            "accuracy_with_exits": float((chosen.argmax(1) == y_test).mean()),
            "accuracy_no_exits": float(correct[-1].mean()),
            "runtime_agreement": float((run_pred == chosen.argmax(1)).mean()),
            "graph_agreement": graph_agreement,
            "exit_fractions": fractions,
            "expected_macs": exp_macs,
            "full_macs": full_macs,
            "expected_macs_fraction": exp_macs / full_macs,
            "expected_bitops": exp_bitops,
            "full_bitops": full_bitops,
            "latency_ms": lat["exits"],
            "no_exit_latency_ms": lat["final"],
            "files_latency_ms": lat["files"],
            "segments_no_heads_latency_ms": lat["segments"],
            "unfused_latency_ms": lat["unfused"],
            "speedup_mean": lat["final"]["mean"] / lat["exits"]["mean"],
            "speedup_p50": lat["final"]["p50"] / lat["exits"]["p50"],
            "speedup_mean_vs_segments": lat["segments"]["mean"] / lat["exits"]["mean"],
            "speedup_mean_files": lat["final"]["mean"] / lat["files"]["mean"],
            "parity": [parity(ref_logits[k], logits[k][:n_par]) for k in range(len(ref_logits))],
        }
        res["accuracy_drop_points"] = 100 * (res["accuracy_no_exits"] - res["accuracy_with_exits"])
        result["runtimes"][name] = res
    result.update({k: v for k, v in result["runtimes"][primary].items() if k != "parity"})
    result["parity"] = result["runtimes"][primary]["parity"]
    result["runtime"] = primary
    result["no_exit_reference"] = (
        "final.onnx: the same segments chained into one graph "
        "without heads, one runtime call per image"
    )
    return result


def _cumulative(
    entries: dict[str, list[dict[str, Any]]], key: str, thresholds: Sequence[float] | None = None
) -> list[float]:
    segs = [e[key] for e in entries["segments"]]
    heads = [
        0 if thresholds is not None and thresholds[k] > 1.0 else e[key]
        for k, e in enumerate(entries["heads"])
    ]
    out, run = [], 0.0
    for k, s in enumerate(segs):
        run += s + (heads[k] if k < len(heads) else 0)
        out.append(run)
    return out
