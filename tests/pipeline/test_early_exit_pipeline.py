"""Early exit in every position among prune / quantize / distill, through the pipeline:
exits attached and trained, heads INT8 when quantized, masks zero in the exported segment
files, thresholds calibrated, manifest written, and the runtime reproducing the full model
(no exit) or leaving at head k (threshold 0). Plus one run of the real CLI."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from onnx import numpy_helper

from helpers import load_benchmark, write_npz
from pqd.exits.graph import exit_graph
from pqd.exits.runtime import ExitRuntime
from pqd.measurement.runtime import open_runner

ORDERS = {
    "first": ["early_exit", "prune", "quantize", "distill"],
    "second": ["prune", "early_exit", "quantize", "distill"],
    "third": ["prune", "quantize", "early_exit", "distill"],
    "last": ["prune", "quantize", "distill", "early_exit"],
}
STAGE = {
    "prune": {"stage": "prune", "sparsity": 0.5, "scope": "layer", "epochs": 1},
    "quantize": {"stage": "quantize", "epochs": 1, "calibration_batches": 1},
    "distill": {"stage": "distill", "epochs": 1},
}
EXIT = {  # one setting per order: modes, distillation sources and confidences all run
    "first": {"positions": [1], "mode": "joint", "distill": "final", "confidence": "entropy"},
    "second": {"mode": "heads", "distill": "teacher", "head": {"channels": 8, "stride": 2}},
    "third": {"positions": [1], "mode": "joint", "target": {"max_macs_fraction": 0.9}},
    "last": {"positions": [0], "mode": "heads", "distill": "final"},
}


RUNTIMES = {"second": ["auto"]}  # every installed runtime (OpenVINO too) in one order only


def recipe_for(
    order: list[str], exit_opts: dict, data: dict, runtimes: list[str] | None = None
) -> dict:
    stages = [
        {"stage": "early_exit", "epochs": 1, **exit_opts} if s == "early_exit" else STAGE[s]
        for s in order
    ]
    return {
        "name": "ee-test",
        "model": {"name": "tiny_cnn"},
        "data": data,
        "train": {"batch_size": 64, "lr": 0.05},
        "baseline": {"epochs": 1},
        "stages": stages,
        "measure": {
            "batch_sizes": [1],
            "warmup": 2,
            "repeats": 5,
            "exit_latency_rounds": 1,
            "runtimes": runtimes or ["onnxruntime"],
        },
    }


@pytest.fixture(scope="module", params=list(ORDERS))
def run(request, tmp_path_factory) -> tuple[str, Path, dict]:
    from pqd.pipeline import run as pipeline_run
    from pqd.recipe import recipe_from_dict

    tmp = tmp_path_factory.mktemp(request.param)
    write_npz(tmp / "data.npz")
    data = {"dataset": "npz", "root": str(tmp), "val_size": 40, "download": False}
    recipe = recipe_from_dict(
        recipe_for(ORDERS[request.param], EXIT[request.param], data, RUNTIMES.get(request.param))
    )
    record = pipeline_run(recipe, tmp / "run", data_dir=str(tmp), progress=False)
    return request.param, tmp / "run", record


def int8_weights(path: Path) -> list[np.ndarray]:
    """Int8 weight initializers (QDQ) of an ONNX file."""
    proto = onnx.load(str(path))
    return [
        numpy_helper.to_array(i)
        for i in proto.graph.initializer
        if i.data_type == onnx.TensorProto.INT8 and len(i.dims) >= 2
    ]


def check_exit_run(order: list[str], out: Path, record: dict, test_x: np.ndarray) -> None:
    """Everything an early-exit run must deliver, whatever the order."""
    manifest = json.loads((out / "exits" / "manifest.json").read_text())
    ee = record["final"]["early_exit"]
    k_exits = len(manifest["heads"])
    assert k_exits >= 1 and len(manifest["segments"]) == k_exits + 1
    # thresholds calibrated on val and written to the manifest and the record
    assert len(manifest["thresholds"]) == k_exits and ee["thresholds"] == manifest["thresholds"]
    assert manifest["calibration"]["split"] == "val"
    assert math.isclose(sum(ee["exit_fractions"]), 1.0)
    assert len(ee["per_exit_accuracy"]) == k_exits + 1 and ee["runtime_agreement"] == 1.0
    assert 0 < ee["expected_macs"] <= ee["full_macs"] + sum(ee["part_macs"]["heads"])
    assert ee["latency_ms"]["samples"] == record["data"]["test"] * ee["latency_ms"]["rounds"]
    assert record["comparison"]["early_exit_speedup_mean"] > 0
    # the audit calibrates every exit head's deciding confidence on the test split
    cal = record["final"]["audit"]["exit_calibration"]
    assert [c["exit"] for c in cal] == list(range(k_exits))
    assert all(
        0 <= c["confidence_ece"] <= 1 and sum(c["bin_count"]) == record["data"]["test"] for c in cal
    )
    # every part quantized, heads included (the quantize stage came before or after)
    assert manifest["precision"] == "int8"
    for entry in (*manifest["segments"], *manifest["heads"]):
        assert int8_weights(out / "exits" / entry["file"]), entry["file"]
    # masks zero in the exported segment files (layer-wise 50%), heads too if pruned after
    heads_pruned = order.index("prune") > order.index("early_exit")
    for entry in manifest["segments"] + (manifest["heads"] if heads_pruned else []):
        for w in int8_weights(out / "exits" / entry["file"]):
            assert (w == 0).mean() >= 0.5 - 1e-6, entry["file"]
    # exits stay attached and trained after the early_exit stage: later stages' val accuracy
    # is the final head's; the runtime checks below use every head
    rt = ExitRuntime(out / "exits" / "manifest.json", thresholds=[2.0] * k_exits)
    full = open_runner("onnxruntime", out / "final.onnx", 2).run
    logits, where = rt.run(test_x)
    assert (where == k_exits).all()
    np.testing.assert_allclose(logits, full(test_x), atol=1e-4)
    one, k = rt.run_one(test_x[:1])
    assert k == k_exits and np.allclose(one, logits[:1], atol=1e-4)
    heads_logits, heads_conf = rt.run_all(test_x)
    # the fused exit files (segment + head in one graph) give what the two files give
    plain_logits, plain_conf = ExitRuntime(out / "exits" / "manifest.json", fused=False).run_all(
        test_x
    )
    for a, b in zip([*heads_logits, *heads_conf], [*plain_logits, *plain_conf], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    check_exit_graph(out, manifest, ee, test_x, heads_logits, full(test_x))
    for k in range(k_exits):
        rt.thresholds = [2.0] * k_exits
        rt.thresholds[k] = 0.0
        logits, where = rt.run(test_x)
        assert (where == k).all()
        np.testing.assert_allclose(logits, heads_logits[k], atol=1e-5)
        assert rt.run_one(test_x[:1])[1] == k


def q_nodes(graph: onnx.GraphProto) -> int:
    """QuantizeLinear nodes in ``graph`` and its subgraphs."""
    return sum(
        (n.op_type == "QuantizeLinear")
        + sum(q_nodes(a.g) for a in n.attribute if a.type == onnx.AttributeProto.GRAPH)
        for n in graph.node
    )


def check_exit_graph(
    out: Path,
    manifest: dict,
    ee: dict,
    test_x: np.ndarray,
    heads_logits: list[np.ndarray],
    final_logits: np.ndarray,
) -> None:
    """exits.onnx (one graph, If nodes) stops where the part files stop, with their logits."""
    assert (out / "exits" / manifest["graph"]["file"]).is_file()
    assert manifest["graph"]["thresholds"] == manifest["thresholds"]
    assert ee["graph_agreement"] == 1.0 and ee["graph"]["file"] == "exits/exits.onnx"
    k_exits = len(manifest["heads"])
    parts_q = sum(
        q_nodes(onnx.load(str(out / "exits" / e["file"])).graph)
        for e in (*manifest["segments"], *manifest["heads"])
    )
    for k in range(k_exits + 1):  # force every input out at exit k (k_exits: the final head)
        thresholds = [2.0] * k_exits
        if k < k_exits:
            thresholds[k] = 0.0
        path = exit_graph(out / "exits", manifest, thresholds, out / f"forced_{k}.onnx")
        run = open_runner("onnxruntime", path, 1, all_outputs=True).run
        want = heads_logits[k] if k < k_exits else final_logits
        for i in range(3):
            logits, where = run(test_x[i : i + 1])
            assert where.tolist() == [k]
            np.testing.assert_allclose(logits, want[i : i + 1], atol=1e-5)
        logits, where = run(test_x)  # a batch leaves together
        assert where.tolist() == [k]
        np.testing.assert_allclose(logits, want, atol=1e-5)
        # uint8 across the boundaries: no re-quantization of a dequantized boundary tensor
        assert q_nodes(onnx.load(str(path)).graph) < parts_q


@pytest.mark.slow
def test_early_exit_in_each_position(run) -> None:
    name, out, record = run
    order = ORDERS[name]
    assert record["order"] == order
    test_x = (np.load(out.parent / "data.npz")["x_test"][:16] / 255.0).astype(np.float32)
    check_exit_run(order, out, record, test_x)
    ee_index = order.index("early_exit")
    info = record["stages"][ee_index]["info"]
    assert info["exits"] == len(info["thresholds"])
    if order.index("quantize") < ee_index:
        assert "quantizers_carried_over" in info
    # the benchmark's table shows the one-graph artifact next to the part files and the
    # exits-disabled reference, with the record's speed-ups
    bench = load_benchmark("early_exit")
    text = bench.render(record, None)
    ee = record["final"]["early_exit"]
    assert "exits.onnx" in text and "final.onnx (reference)" in text
    assert f"{ee['speedup_mean']:.2f}x" in text and f"{ee['speedup_mean_files']:.2f}x" in text
    if name in RUNTIMES:  # exits measured on every installed runtime
        from pqd.measurement import available_runtimes

        runtimes = record["final"]["early_exit"]["runtimes"]
        assert list(runtimes) == available_runtimes()
        assert all(r["runtime_agreement"] == 1.0 for r in runtimes.values())


@pytest.mark.integration
def test_cli_runs_early_exit_last_on_the_real_subset(tmp_path: Path) -> None:
    """prune -> quantize -> distill -> early_exit through ``pqd run`` on real CIFAR-10."""
    from pqd.cli import main

    root = os.environ.get("PQD_DATA_DIR") or "/work/shared/data/cifar-10-subset"
    if not (Path(root) / "cifar-10-batches-py").is_dir():
        pytest.fail(f"the CIFAR-10 subset is missing under {root}; set PQD_DATA_DIR")
    order = ["prune", "quantize", "distill", "early_exit"]
    data = {"dataset": "cifar10", "val_size": 64, "limit_train": 256, "limit_test": 64}
    path = tmp_path / "ee.yaml"
    path.write_text(yaml.safe_dump(recipe_for(order, EXIT["last"], data)))
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out), "--data-dir", root, "--no-progress"]) == 0
    record = json.loads((out / "record.json").read_text())
    from pqd.data import load_dataset

    test_x = (
        load_dataset("cifar10", root, val_size=64, limit_train=256, limit_test=64)
        .test_x[:16]
        .numpy()
        .astype(np.float32)
        / 255.0
    )
    check_exit_run(order, out, record, test_x)
    report = (out / "report.md").read_text()
    assert "## Early exit" in report
