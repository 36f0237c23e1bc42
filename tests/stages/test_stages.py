"""Stages compose in every order: masks stay exactly zero through later training and in the
exported INT8 file, fake-quant stays on through later stages, and the file keeps the
quantization parameters learned in QAT."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import pqd.stages  # noqa: F401  (registers the stages)
from conftest import tiny_recipe
from helpers import Job
from pqd.data import Dataset
from pqd.measurement.complexity import onnx_complexity
from pqd.measurement.parity import parity
from pqd.measurement.runtime import open_runner
from pqd.models import build_model
from pqd.onnx_export import export_onnx
from pqd.prune.masks import prunable_parameters
from pqd.quant.layers import unquantized_weights
from pqd.state import State
from pqd.train import is_graph

CPU = torch.device("cpu")
SPECS = {
    "prune": {"stage": "prune", "sparsity": 0.6, "schedule": "gradual", "epochs": 1},
    "quantize": {"stage": "quantize", "mode": "qat", "epochs": 1},
    "distill": {"stage": "distill", "epochs": 1, "temperature": 2.0, "alpha": 0.7},
}
ORDERS = list(itertools.permutations(SPECS))


def fake_quantizers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "fake_quant_enabled")]


def run_stages(
    order: tuple[str, ...], data: Dataset, seed: int = 0, **train: object
) -> tuple[State, Job]:
    """Apply ``order`` to a tiny_cnn as the pipeline does, checking invariants after each
    (``train``: settings over the tiny recipe's)."""
    settings = {"batch_size": 32, "lr": 0.05, "amp": "off", **train}
    recipe = tiny_recipe([SPECS[s] for s in order], seed=seed, train=settings)
    torch.manual_seed(seed)
    model = build_model("tiny_cnn", data.num_classes, data.mean, data.std)
    job = Job(recipe=recipe, data=data, teacher=copy.deepcopy(model).eval())

    def check(i: int, spec, state: State, seconds: float) -> None:
        params = dict(state.model.named_parameters())
        for name, keep in state.masks.items():  # pruned weights are exactly zero
            assert torch.count_nonzero(params[name].detach()[~keep]) == 0, (order, i, name)
        if "quantize" in order[: i + 1]:  # fake-quant was inserted and stays on
            assert state.quantized and is_graph(state.model)
            assert unquantized_weights(state.model) == []
            fqs = fake_quantizers(state.model)
            assert fqs and all(int(fq.fake_quant_enabled[0]) == 1 for fq in fqs)
        else:
            assert not state.quantized and not is_graph(state.model)

    return job.run_stages(State(model=model), on_stage=check), job


def int8_weights(path: Path) -> list[np.ndarray]:
    """Int8 weights of every Conv/Gemm in graph order, read back through DequantizeLinear."""
    proto = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    out = []
    for node in proto.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul"):
            dq = producer.get(node.input[1])
            assert dq is not None and dq.op_type == "DequantizeLinear", node.name
            w = inits[dq.input[0]]
            assert w.dtype == np.int8
            out.append(w)
    return out


@pytest.mark.parametrize("order", ORDERS, ids="->".join)
def test_every_order_keeps_masks_fake_quant_and_learned_scales(
    order: tuple[str, ...], synth: Dataset, tmp_path: Path
) -> None:
    state, ctx = run_stages(order, synth)
    assert state.masks and state.quantized
    graph = state.model
    # the qparams QAT learned, computed before export (export must not recalibrate)
    learned = sorted(
        float(fq.calculate_qparams()[0].reshape(-1)[0])
        for fq in fake_quantizers(graph)
        if fq.calculate_qparams()[0].numel() == 1
    )  # per-tensor = activations
    path, deploy = export_onnx(graph, tmp_path / "final.onnx", ctx.example_input(), quantized=True)

    # masks: every masked weight is zero in the exported int8 tensor, layer by layer
    names = list(prunable_parameters(graph))
    weights = int8_weights(path)
    assert len(weights) == len(names)
    for name, w in zip(names, weights, strict=True):
        keep = state.masks[name].numpy()
        if w.shape != keep.shape:  # the 3-channel stem is padded with zero input channels
            assert w.shape[1] > keep.shape[1] and not w[:, keep.shape[1] :].any()
            w = w[:, : keep.shape[1]]
        assert not w[~keep].any(), name
    masked = sum(int((~m).sum()) for m in state.masks.values())
    total = sum(m.numel() for m in state.masks.values())
    assert masked == round(0.6 * total)
    assert onnx_complexity(path)["sparsity"] >= masked / total  # read back from the file

    # learned activation scales are the ones in the file
    proto = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    in_file = [
        float(inits[n.input[1]])
        for n in proto.graph.node
        if n.op_type == "QuantizeLinear" and inits[n.input[1]].size == 1
    ]
    assert in_file
    for s in in_file:
        assert min(abs(s - t) / t for t in learned) < 1e-6, (s, learned)

    # the artifact computes what the converted torch model computes
    runner = open_runner("onnxruntime", path, threads=1)
    x = synth.test_x.float() / 255
    ort_logits = np.concatenate([runner.run(x[i : i + 16].numpy()) for i in range(0, len(x), 16)])
    with torch.no_grad():
        ref = deploy(x).numpy()
    par = parity(ref, ort_logits)
    scale = np.abs(ref).max()
    assert par["max_abs_logit_diff"] <= 0.05 * scale + 1e-3, par
    assert par["top1_agreement"] >= 0.9, par


def test_a_weight_average_in_every_stage_keeps_masks_and_fake_quant(synth: Dataset) -> None:
    """``train.ema`` reaches every stage (eager and QAT graph): the checks after each stage
    hold for the averaged weights, and the average is not the plain run's last weights."""
    plain, _ = run_stages(("prune", "quantize", "distill"), synth)
    averaged, _ = run_stages(("prune", "quantize", "distill"), synth, ema=0.9)
    assert averaged.masks.keys() == plain.masks.keys()
    diff = [
        float((a - b).abs().max())
        for a, b in zip(averaged.model.parameters(), plain.model.parameters(), strict=True)
    ]
    assert max(diff) > 1e-4


def test_quantize_twice_keeps_one_set_of_quantizers(synth: Dataset) -> None:
    state, ctx = run_stages(("quantize",), synth)
    n = len(fake_quantizers(state.model))
    ctx.recipe = tiny_recipe([SPECS["quantize"], SPECS["quantize"]])
    state = ctx.run_stages(state, start=1)
    assert len(fake_quantizers(state.model)) == n
    assert "already quantized" in state.info["note"]


def test_prune_after_prune_only_adds_zeros(synth: Dataset) -> None:
    state, ctx = run_stages(("prune",), synth)
    first = {k: v.clone() for k, v in state.masks.items()}
    ctx.recipe = tiny_recipe(
        [SPECS["prune"], {**SPECS["prune"], "sparsity": 0.8, "schedule": "oneshot"}]
    )
    state = ctx.run_stages(state, start=1)
    for name, keep in first.items():
        assert not (state.masks[name] & ~keep).any()  # nothing pruned comes back
    assert state.info["mask_sparsity"] == pytest.approx(0.8, abs=1e-3)
