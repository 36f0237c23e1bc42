"""Write a multi-exit network as deployable files: segment and head ONNX files, fused
exit files, the one-graph ``exits.onnx`` and a manifest.

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
                     (built by :mod:`pqd.exits.graph`)
    manifest.json    order, thresholds, confidence kind, MACs / BitOps / bytes per file

Quantized parts are INT8 QDQ (U8S8, like ``final.onnx``), others FP32. A head's
``confidence`` is computed inside its graph: the top softmax probability
(``max_softmax``) or ``1 - entropy / ln(classes)`` (``entropy``); an input leaves at
exit ``k`` when its confidence is >= ``thresholds[k]`` (a threshold > 1 never exits).

:func:`chain_segments` writes the same segments as one ONNX graph without heads: the
"exits disabled" artifact of the same weights (the pipeline's ``final.onnx``). The files
are run by :class:`pqd.exits.runtime.ExitRuntime`.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import helper, numpy_helper

from pqd.exits.graph import GRAPH_FILE, exit_graph
from pqd.onnx_export import INPUT_NAME, OUTPUT_NAME, export_onnx

if TYPE_CHECKING:
    from pqd.models.multi_exit import MultiExitNet

MANIFEST = "manifest.json"
FEATURES_NAME = "output"
CONFIDENCE_NAME = "confidence"
MANIFEST_FORMAT = "pqd-early-exit/1"


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
    net: MultiExitNet,
    out_dir: str | Path,
    example: torch.Tensor,
    *,
    quantized: bool,
    opset: int = 20,
) -> tuple[dict[str, Any], MultiExitNet]:
    """Write every segment and head of ``net`` (a MultiExitNet) plus ``manifest.json``.

    Returns the manifest and the deployable torch copy of ``net`` (INT8-converted parts
    when quantized) whose ``forward_all`` the files reproduce.
    """
    from pqd.measurement.artifacts import size_bytes
    from pqd.models.multi_exit import part_inputs

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    inputs = part_inputs(net, example[:2])
    deploy = _copy_container(net)
    entries: dict[str, list[dict[str, Any]]] = {"segments": [], "heads": []}
    for name, part in net.parts():
        kind = name.split(".")[0]
        entry, torch_part = _export_part(
            net, name, part, out, inputs[name], quantized=quantized, opset=opset
        )
        deploy.set_part(name, torch_part)
        entries[kind].append(entry)
    fused = []
    for k, head in enumerate(entries["heads"]):
        path = fuse_exit(
            out / entries["segments"][k]["file"], out / head["file"], out / f"exit_{k}.onnx"
        )
        fused.append({"file": path.name, "size_bytes": size_bytes(path)})
    manifest = _manifest(net, example, entries, fused, quantized=quantized)
    write_graph(manifest, out)
    write_manifest(manifest, out)
    return manifest, deploy


def _export_part(
    net: MultiExitNet,
    name: str,
    part: nn.Module,
    out: Path,
    example: torch.Tensor,
    *,
    quantized: bool,
    opset: int,
) -> tuple[dict[str, Any], nn.Module]:
    """Write part ``name`` (``segments.k`` / ``heads.k``) of ``net``: (its manifest entry,
    the deployable torch part)."""
    from pqd.measurement.artifacts import size_bytes
    from pqd.measurement.complexity import onnx_complexity

    kind, k_text = name.split(".")
    k = int(k_text)
    fname = f"{kind[:-1]}_{k}.onnx"
    final = kind == "segments" and k == len(net.segments) - 1
    out_name = OUTPUT_NAME if (kind == "heads" or final) else FEATURES_NAME
    path, torch_part = export_onnx(
        part, out / fname, example, quantized=quantized, opset=opset, output_name=out_name
    )
    if kind == "heads":
        proto = onnx.load(str(path))
        add_confidence_output(proto, net.confidence, net.num_classes)
        onnx.checker.check_model(proto)
        onnx.save(proto, str(path))
    comp = onnx_complexity(path)
    entry = {
        "file": fname,
        "macs": comp["macs"],
        "bitops": comp["bitops"],
        "params": comp["params"],
        "nonzero_params": comp["nonzero_params"],
        "sparsity": comp["sparsity"],
        "size_bytes": size_bytes(path),
        "input_shape": list(example.shape[1:]),
    }
    if kind == "segments":
        entry["blocks"] = getattr(net.segments[k], "block_indices", None)  # not in a graph
    return entry, torch_part


def _manifest(
    net: MultiExitNet,
    example: torch.Tensor,
    entries: dict[str, list[dict[str, Any]]],
    fused: list[dict[str, Any]],
    *,
    quantized: bool,
) -> dict[str, Any]:
    """The manifest of the written part files (without ``graph``: see :func:`write_graph`)."""
    return {
        "format": MANIFEST_FORMAT,
        "confidence": net.confidence,
        "num_classes": net.num_classes,
        "precision": "int8" if quantized else "fp32",
        "positions": list(net.positions),
        "thresholds": [json_threshold(t) for t in net.thresholds],
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


def json_threshold(t: float) -> float | None:
    """A threshold as the manifest stores it (``null`` = never exit)."""
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


def _copy_container(net: MultiExitNet) -> MultiExitNet:
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


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
    for v in (*graph.input, *graph.output, *graph.value_info):
        if v.name == old:
            v.name = new
