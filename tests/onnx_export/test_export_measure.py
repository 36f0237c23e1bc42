"""Export (FP32 parity, dynamic batch, exact stem padding) and measurement of ONNX files
(MACs/BitOps/params counted by hand, sparsity, size with side files, latency statistics)."""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import pqd.onnx_export as export_mod
from helpers import random_images
from pqd.measurement.artifacts import (
    keep_ir_if_faster,
    measure_onnx,
    repeats_for,
    size_bytes,
    warmup_for,
)
from pqd.measurement.complexity import onnx_complexity
from pqd.measurement.latency import compare_latency, graph_signature, identical_graph_spread
from pqd.measurement.parity import parity
from pqd.measurement.runtime import export_openvino_ir, open_runner, openvino_ir_paths, ort_kernels
from pqd.models import build_model
from pqd.onnx_export import export_onnx
from pqd.quant.prepare import prepare_qat
from pqd.recipe import MeasureSpec
from pqd.train import set_train

# tiny_cnn, 4 classes, 32x32 (see pqd.models.tiny): conv 3->8 and 8->8 at 32x32, conv 8->16
# at 16x16 after a pool, linear 16->4
TINY_MACS = 32 * 32 * 8 * 27 + 32 * 32 * 8 * 72 + 16 * 16 * 16 * 72 + 16 * 4
TINY_WEIGHTS = 8 * 27 + 8 * 72 + 16 * 72 + 16 * 4
TINY_BIASES = 8 + 8 + 16 + 4  # BN folds into conv biases in both exports


def tiny(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model("tiny_cnn", 4, [0.4, 0.45, 0.5], [0.2, 0.25, 0.3])
    model.train()
    with torch.no_grad():  # BN statistics that are not the identity
        for _ in range(3):
            model(torch.rand(16, 3, 32, 32))
    return model.eval()


def qat_graph(model: torch.nn.Module) -> torch.fx.GraphModule:
    graph = prepare_qat(copy.deepcopy(model), torch.rand(2, 3, 32, 32))
    with torch.no_grad():
        for _ in range(3):
            graph(torch.rand(16, 3, 32, 32))  # observers see data
    set_train(graph, False)
    return graph


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("export")
    model = tiny()
    fp32, _ = export_onnx(model, out / "fp32.onnx", torch.rand(2, 3, 32, 32), quantized=False)
    int8, _ = export_onnx(
        qat_graph(model), out / "int8.onnx", torch.rand(2, 3, 32, 32), quantized=True
    )
    return {"fp32": fp32, "int8": int8}


def test_fp32_artifact_matches_torch_at_any_batch(files: dict[str, Path]) -> None:
    model = tiny()
    run = open_runner("onnxruntime", files["fp32"], threads=1).run
    for batch in (1, 3, 5):
        x = torch.rand(batch, 3, 32, 32)
        with torch.no_grad():
            ref = model(x).numpy()
        np.testing.assert_allclose(run(x.numpy()), ref, atol=1e-4, rtol=1e-4)
    proto = onnx.load(str(files["fp32"]))
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    assert not any(n.metadata_props for n in proto.graph.node)  # debug strings stripped


@pytest.mark.slow
def test_stem_padding_is_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    graph = qat_graph(tiny(1))
    x = torch.rand(2, 3, 32, 32)
    padded, deploy = export_onnx(graph, tmp_path / "padded.onnx", x, quantized=True)
    monkeypatch.setattr(export_mod, "pad_input_channels", lambda proto, multiple=4: 0)
    plain, _ = export_onnx(graph, tmp_path / "plain.onnx", x, quantized=True)
    stem = [
        numpy_helper.to_array(i)
        for i in onnx.load(str(padded)).graph.initializer
        if len(i.dims) == 4 and i.dims[0] == 8
    ]
    assert any(w.shape[1] == 4 and not w[:, 3].any() for w in stem)  # zero 4th channel
    batch = np.random.default_rng(0).random((16, 3, 32, 32), dtype=np.float32)
    a = open_runner("onnxruntime", padded, threads=1).run(batch)
    b = open_runner("onnxruntime", plain, threads=1).run(batch)
    np.testing.assert_array_equal(a, b)
    with torch.no_grad():
        ref = deploy(torch.from_numpy(batch)).numpy()
    assert parity(ref, a)["top1_agreement"] >= 0.9


@pytest.mark.slow
def test_mean_pool_is_a_fused_global_average_pool(
    files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for path in files.values():
        ops = [n.op_type for n in onnx.load(str(path)).graph.node]
        assert ops.count("GlobalAveragePool") == 1 and "ReduceMean" not in ops
    assert ort_kernels(files["int8"]).get("QLinearGlobalAveragePool") == 1  # fused INT8 pool
    graph = qat_graph(tiny())
    x = np.random.default_rng(1).random((16, 3, 32, 32), dtype=np.float32)
    outs = {}
    for rewrite in (True, False):
        if not rewrite:
            monkeypatch.setattr(export_mod, "global_average_pools", lambda proto: 0)
        for name, model in (("fp32", tiny()), ("int8", graph)):
            path, _ = export_onnx(
                model,
                tmp_path / f"{name}{rewrite}.onnx",
                torch.rand(2, 3, 32, 32),
                quantized=name == "int8",
            )
            ops = [n.op_type for n in onnx.load(str(path)).graph.node]
            assert ("ReduceMean" in ops) is not rewrite
            outs[name, rewrite] = open_runner("onnxruntime", path, threads=1).run(x)
    np.testing.assert_allclose(outs["fp32", True], outs["fp32", False], atol=1e-5, rtol=1e-5)
    assert parity(outs["int8", False], outs["int8", True])["top1_agreement"] >= 0.9


def test_complexity_counts_by_hand(files: dict[str, Path]) -> None:
    fp32, int8 = onnx_complexity(files["fp32"]), onnx_complexity(files["int8"])
    for comp in (fp32, int8):
        assert comp["macs"] == TINY_MACS  # the stem's padding channel is not counted
        assert comp["params"] == TINY_WEIGHTS + TINY_BIASES
        assert [layer["op"] for layer in comp["layers"]] == ["Conv", "Conv", "Conv", "Gemm"]
    assert fp32["bitops"] == TINY_MACS * 32 * 32
    assert all(layer["weight_bits"] == 8 for layer in int8["layers"])
    expected = sum(layer["macs"] * 8 * layer["activation_bits"] for layer in int8["layers"])
    assert int8["bitops"] == expected and int8["bitops"] < fp32["bitops"] / 15


def test_sparsity_is_read_from_the_weights(tmp_path: Path) -> None:
    model = tiny()
    with torch.no_grad():
        w = model.net.features[1][0][0].weight  # the 8->8 conv: zero half of it
        w.view(-1)[: w.numel() // 2] = 0
    path, _ = export_onnx(
        model, tmp_path / "sparse.onnx", torch.rand(2, 3, 32, 32), quantized=False
    )
    comp = onnx_complexity(path)
    assert comp["sparsity"] == pytest.approx((8 * 72 // 2) / TINY_WEIGHTS)
    assert comp["nonzero_params"] == comp["params"] - 8 * 72 // 2


def test_size_counts_the_external_data_file(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(b"x" * 100)
    assert size_bytes(path) == 100
    (tmp_path / "m.onnx.data").write_bytes(b"y" * 50)
    assert size_bytes(path) == 150


def test_latency_stats_are_ordered_and_interleaved() -> None:
    order: list[str] = []

    def make(name: str):
        def run(x: np.ndarray) -> None:
            order.append(name)

        return run

    stats = compare_latency(
        {"a": make("a"), "b": make("b")},
        (1, 3, 4, 4),
        warmup=2,
        repeats=10,
        rounds=5,
        progress=False,
    )
    assert order[:4] == ["a", "a", "b", "b"]  # warm-up per artifact
    timed = order[4:]
    assert timed == (["a", "a", "b", "b"] * 5)  # 5 interleaved rounds of 2 calls each
    for st in stats.values():
        assert st.samples == 10 and 0 < st.min <= st.p50 <= st.p90 and st.batch == 1


def test_files_of_one_graph_share_a_signature_whatever_their_weights(
    files: dict[str, Path], tmp_path: Path
) -> None:
    other = tiny(seed=1)  # other weights, other BN statistics, other quantization ranges
    int8, _ = export_onnx(
        qat_graph(other), tmp_path / "int8.onnx", torch.rand(2, 3, 32, 32), quantized=True
    )
    fp32, _ = export_onnx(other, tmp_path / "fp32.onnx", torch.rand(2, 3, 32, 32), quantized=False)
    assert onnx.load(str(int8)).graph.initializer != onnx.load(str(files["int8"])).graph.initializer
    assert graph_signature(int8) == graph_signature(files["int8"])
    assert graph_signature(fp32) == graph_signature(files["fp32"])
    assert graph_signature(fp32) != graph_signature(int8)
    wider = build_model("tiny_cnn", 5, [0.4, 0.45, 0.5], [0.2, 0.25, 0.3]).eval()
    five, _ = export_onnx(wider, tmp_path / "five.onnx", torch.rand(2, 3, 32, 32), quantized=False)
    assert graph_signature(five) != graph_signature(fp32)  # one more class: another shape


def test_the_noise_floor_is_the_widest_spread_within_one_graph() -> None:
    p50 = {"a": 0.170, "b": 0.198, "c": 0.180, "d": 0.374, "e": 0.380, "f": 0.5, "g": 0.0}
    graphs = {"a": "int8", "b": "int8", "c": "int8", "d": "fp32", "e": "fp32", "f": "x", "g": "x"}
    floor = identical_graph_spread(p50, graphs)
    assert floor == {
        "spread": (0.198 - 0.170) / 0.198,
        "names": ["a", "b"],
        "graphs": 2,
        "count": 5,
    }
    assert identical_graph_spread({"a": 0.1, "b": 0.2}, {"a": "x", "b": "y"}) is None
    assert identical_graph_spread({"a": 0.0, "b": 0.0}, {"a": "x", "b": "x"}) is None  # untimed


def _reshape_model(path: Path, scale: float, shape: list[int], opset: int = 17) -> Path:
    """x -> Mul(x, a Constant of value ``scale``) -> Reshape(shape, an INT64 initializer)."""
    from onnx import TensorProto, helper

    const = helper.make_node(
        "Constant", [], ["s"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [scale])
    )
    graph = helper.make_graph(
        [
            const,
            helper.make_node("Mul", ["x", "s"], ["m"]),
            helper.make_node("Reshape", ["m", "t"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [helper.make_tensor("t", TensorProto.INT64, [len(shape)], shape)],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), str(path))
    return path


def test_a_signature_ignores_weight_values_but_not_shapes_or_opsets(tmp_path: Path) -> None:
    base = graph_signature(_reshape_model(tmp_path / "a.onnx", 0.5, [3, 4]))
    assert graph_signature(_reshape_model(tmp_path / "b.onnx", 2.0, [3, 4])) == base  # a weight
    assert graph_signature(_reshape_model(tmp_path / "c.onnx", 0.5, [4, 3])) != base  # a shape
    assert graph_signature(_reshape_model(tmp_path / "d.onnx", 0.5, [3, 4], 18)) != base


def test_large_batches_get_fewer_warmup_and_timed_calls() -> None:
    assert [warmup_for(b, 50) for b in (1, 4, 64, 256)] == [50, 25, 6, 5]
    assert warmup_for(64, 0) == 0 and warmup_for(64, 3) == 3  # never more than asked
    assert [repeats_for(b, 300) for b in (1, 64, 1024)] == [300, 38, 20]


def test_switch_pause_is_idle_and_untimed(monkeypatch) -> None:
    import pqd.measurement.latency as latency

    clock = {"now": 0.0, "slept": 0.0}  # a fake clock: a call takes 1 ms, a pause its length

    def sleep(seconds: float) -> None:
        clock["now"] += seconds
        clock["slept"] += seconds

    def call(_x: object) -> None:
        clock["now"] += 1e-3

    monkeypatch.setattr(latency.time, "perf_counter", lambda: clock["now"])
    monkeypatch.setattr(latency.time, "sleep", sleep)
    stats = compare_latency(
        {"a": call, "b": call}, (1, 3, 4, 4), warmup=0, repeats=4, rounds=2,
        switch_pause_ms=50, progress=False,
    )  # fmt: skip
    assert clock["slept"] == pytest.approx(2 * 2 * 0.05)  # a pause after each block of each round
    for st in stats.values():  # every sample is one call (1 ms): no pause is in one
        assert st.samples == 4 and (st.min, st.max) == pytest.approx((1.0, 1.0))


@pytest.mark.skipif(
    importlib.util.find_spec("openvino_telemetry") is None,
    reason="openvino telemetry not installed",
)
@pytest.mark.parametrize("through_pqd", [False, True])
def test_openvino_is_imported_without_telemetry(tmp_path: Path, through_pqd: bool) -> None:
    """A plain ``import openvino`` consents to telemetry and writes ~/intel (checked, so the
    test can fail); pqd's import declines it and leaves HOME untouched."""
    code = (
        "from pqd.measurement.runtime import import_openvino; import_openvino()"
        if through_pqd
        else "import openvino"
    )
    code += "\nfrom openvino_telemetry.main import Telemetry\nprint(Telemetry().consent)"
    env = {**os.environ, "HOME": str(tmp_path)}
    env.pop("CI", None)  # openvino_telemetry declines by itself when CI=true
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.split()
    assert out[-1] == str(not through_pqd)
    assert (tmp_path / "intel").exists() is (not through_pqd)


# ops that onnxruntime 1.32 has no integer kernel for (GELU); everything else must run in
# integer in an INT8 file
ACTIVATION_ISLANDS = {"Gelu", "QuickGelu"}


def blocks_int8(tmp_path: Path, data, name: str) -> tuple[Path, torch.nn.Module]:
    """tiny_blocks (depthwise, grouped, squeeze-excite, concat, residuals, pools), prepared,
    calibrated on real images and exported as INT8."""
    from pqd.quant.calibration import calibrate

    torch.manual_seed(0)
    model = build_model("tiny_blocks", data.num_classes, data.mean, data.std).eval()
    x = data.train_x[:32].float() / 255
    graph = prepare_qat(model, x[:2])
    loader = [(x[i : i + 16], None) for i in (0, 16)]
    calibrate(graph, loader, 2, torch.device("cpu"))
    return export_onnx(graph, tmp_path / f"{name}.onnx", x[:2], quantized=True)


@pytest.mark.slow
def test_mobile_blocks_run_as_integer_kernels(
    tmp_path: Path, subset_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pqd.data import load_dataset
    from pqd.measurement.runtime import float_islands, ort_optimized

    data = load_dataset("cifar10", subset_dir, download=False, limit_train=64, limit_test=64)
    path, deploy = blocks_int8(tmp_path, data, "fixed")
    optimized = ort_optimized(path)
    kernels = ort_kernels(path, proto=optimized)
    islands = float_islands(optimized)
    float_ops = {row["op"]: row["count"] for row in islands["float_ops"]}
    assert kernels["QLinearConv"] == 10 and not {"Conv", "FusedConv"} & set(kernels)
    assert set(float_ops) <= ACTIVATION_ISLANDS, float_ops  # no float conv, pool, cat, add
    # the squeeze-excite gate, SiLU as QLinearSigmoid then QLinearMul (x * sigmoid(x)),
    # hardswish as QLinearAdd (x + 3 saturating on [0, 6]) then QLinearMul, twice
    assert kernels["QLinearMul"] == 4 and kernels["QLinearSigmoid"] == 1
    assert not {"HardSigmoid", "HardSwish", "Clip"} & set(kernels), kernels
    # the concat; the two residuals and the x + 3 of 2 hardswish and the hardsigmoid gate
    assert kernels["QLinearConcat"] == 1 and kernels["QLinearAdd"] == 2 + 3
    assert kernels["NhwcMaxPool"] == 1 and "MaxPool" not in kernels  # uint8 max pool
    assert islands["transposes"] <= 2  # the input's and the classifier's
    assert all(row["why"] for row in islands["float_ops"])
    x = data.test_x.float().numpy() / 255
    with torch.no_grad():
        ref = deploy(torch.from_numpy(x)).numpy()
    assert parity(ref, open_runner("onnxruntime", path, threads=1).run(x))["top1_agreement"] >= 0.9

    # the x86 recipe alone: the same net keeps float convs and the float gate
    monkeypatch.setattr("pqd.quant.quantizer.close_float_islands", lambda *a, **k: 0)
    before = float_islands(ort_optimized(blocks_int8(tmp_path, data, "x86")[0]))
    ops = {row["op"] for row in before["float_ops"]}
    assert {"Conv", "FusedConv"} & ops and "Mul" in ops
    assert before["transposes"] > islands["transposes"]


class HardswishHead(torch.nn.Module):
    """MobileNetV3's classifier: pooled features -> linear -> hardswish -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc1 = torch.nn.Linear(8, 16)
        self.act = torch.nn.Hardswish()
        self.fc2 = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.bn(self.conv(x))), 1)
        x = x.flatten(1)
        return self.fc2(self.act(self.fc1(x)))


def test_a_linear_hardswish_linear_classifier_runs_in_integer(tmp_path: Path) -> None:
    """The hard gate's ``x + 3`` after a linear is not a transformer's residual add: both
    linears run as QGemm, the gate as QLinearAdd + QLinearMul, nothing in float."""
    from pqd.measurement.runtime import float_islands, ort_optimized
    from pqd.quant.calibration import calibrate

    torch.manual_seed(0)
    x = torch.rand(32, 3, 8, 8)
    graph = prepare_qat(HardswishHead().eval(), x[:2])
    calibrate(graph, [(x[:16], None), (x[16:], None)], 2, torch.device("cpu"))
    path, deploy = export_onnx(graph, tmp_path / "head.onnx", x[:2], quantized=True)
    optimized = ort_optimized(path)
    kernels = ort_kernels(path, proto=optimized)
    assert kernels.get("QGemm") == 2 and "Gemm" not in kernels, kernels
    assert not {"Add", "Clip", "Div", "Mul"} & set(kernels), kernels
    assert kernels.get("QLinearAdd") == 1 and kernels.get("QLinearMul") == 1, kernels
    head = {"Gemm", "Add", "Clip", "Div", "Mul"}
    assert not head & {row["op"] for row in float_islands(optimized)["float_ops"]}
    with torch.no_grad():
        ref = deploy(x).numpy()
    got = open_runner("onnxruntime", path, threads=1).run(x.numpy())
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()


@pytest.mark.parametrize(
    ("scale_out", "clamp_hi", "dropped"),
    [(1 / 255, 6.0, True), (1 / 200, 6.0, False), (1 / 255, 3.0, False)],
)
def test_drop_requantize_removes_only_integer_identities(
    scale_out: float, clamp_hi: float, dropped: bool
) -> None:
    """``quantize(clamp(dequantize(q, 6/255)) / 6, 1/255)`` gives back ``q`` for every code,
    so it goes; a different output scale or a clamp that cuts the range changes the
    integers, so the chain stays."""
    import torchao.quantization.pt2e  # noqa: F401  (registers quantized_decomposed)

    qd = torch.ops.quantized_decomposed

    def chain(q: torch.Tensor) -> torch.Tensor:
        d = qd.dequantize_per_tensor.default(q, 6 / 255, 0, 0, 255, torch.uint8)
        g = torch.ops.aten.div.Tensor(torch.ops.aten.clamp.default(d, 0.0, clamp_hi), 6.0)
        return qd.quantize_per_tensor.default(g, scale_out, 0, 0, 255, torch.uint8)

    graph = torch.fx.symbolic_trace(chain)
    codes = torch.arange(256, dtype=torch.uint8)
    before = graph(codes)
    assert export_mod.drop_requantize(graph) == int(dropped)
    assert torch.equal(graph(codes), before)  # same integers either way
    assert torch.equal(before, codes) is dropped


@pytest.mark.slow
def test_grouped_convs_are_stored_dense_with_the_same_outputs_and_counts(
    tmp_path: Path, subset_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tiny_blocks' 4-group conv gets a block-diagonal dense weight: the same logits on
    onnxruntime, still a QLinearConv, and the same params / MACs / sparsity counted."""
    from pqd.data import load_dataset

    data = load_dataset("cifar10", subset_dir, download=False, limit_train=64, limit_test=64)
    densify = export_mod.densify_grouped_convs
    monkeypatch.setattr(export_mod, "densify_grouped_convs", lambda *a, **k: {})
    grouped, _ = blocks_int8(tmp_path, data, "grouped")
    proto = onnx.load(str(grouped))
    done = densify(proto)
    assert list(done.values()) == [4]  # the grouped conv; not the depthwise ones
    conv = next(n for n in proto.graph.node if n.name in done)
    assert next(a.i for a in conv.attribute if a.name == "group") == 1
    dense = tmp_path / "dense.onnx"
    onnx.save(proto, str(dense))
    x = data.test_x.float().numpy() / 255
    a = open_runner("onnxruntime", grouped, threads=1).run(x)
    b = open_runner("onnxruntime", dense, threads=1).run(x)
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert ort_kernels(dense)["QLinearConv"] == 10
    ca, cb = onnx_complexity(grouped), onnx_complexity(dense)
    for key in ("params", "macs", "sparsity"):
        assert ca[key] == cb[key], key


needs_openvino = pytest.mark.skipif(
    importlib.util.find_spec("openvino") is None, reason="openvino not installed"
)


@needs_openvino
def test_openvino_ir_runs_the_int8_file_it_was_converted_from(
    files: dict[str, Path], tmp_path: Path
) -> None:
    """The IR keeps INT8 weights int8 and FP32 weights fp32 (no fp16 compression), and gives
    OpenVINO's answer on the ONNX file."""
    fp32_path = tmp_path / "fp32.onnx"
    fp32_path.write_bytes(files["fp32"].read_bytes())
    assert export_openvino_ir(fp32_path).with_suffix(".bin").stat().st_size >= 4 * TINY_WEIGHTS
    onnx_path = tmp_path / "int8.onnx"
    onnx_path.write_bytes(files["int8"].read_bytes())
    xml = export_openvino_ir(onnx_path)
    assert (xml, xml.with_suffix(".bin")) == openvino_ir_paths(onnx_path)
    # int8 weights stay one byte each (dequantized to fp32 they would take 4 * TINY_WEIGHTS)
    assert xml.with_suffix(".bin").stat().st_size < 2 * TINY_WEIGHTS + 4 * 4 * TINY_BIASES + 512
    x = np.random.default_rng(0).random((4, 3, 32, 32), dtype=np.float32)
    ir = open_runner("openvino-ir", onnx_path, 1, batch=4)
    from_onnx = open_runner("openvino", onnx_path, 1, batch=4)
    assert ir.settings["file"] == xml.name
    np.testing.assert_allclose(ir.run(x), from_onnx.run(x), atol=1e-5)


def _ov_times(onnx_ms: float, ir_ms: float) -> dict[str, dict]:
    def rec(p50: float) -> dict:
        return {"latency_ms": {"batches": {"1": {"p50": p50}}}}

    return {"openvino": rec(onnx_ms), "openvino-ir": rec(ir_ms)}


@needs_openvino
@pytest.mark.parametrize(("ir_ms", "kept"), [(0.97, False), (1.2, False), (0.9, True)])
def test_ir_files_are_kept_only_where_they_run_faster(
    files: dict[str, Path], tmp_path: Path, ir_ms: float, kept: bool
) -> None:
    onnx_path = tmp_path / "int8.onnx"
    onnx_path.write_bytes(files["int8"].read_bytes())
    xml, binary = openvino_ir_paths(export_openvino_ir(onnx_path))
    got = keep_ir_if_faster(onnx_path, _ov_times(1.0, ir_ms), noise=0.05)
    assert got["kept"] is kept
    assert got["p50_ratio"] == {"1": pytest.approx(ir_ms)}
    assert xml.exists() is kept and binary.exists() is kept
    assert onnx_path.exists()


@needs_openvino
def test_a_deleted_ir_is_never_the_runtime_to_deploy_with(
    files: dict[str, Path], tmp_path: Path
) -> None:
    """Measured side by side, the IR and the ONNX file on OpenVINO: the record has both, and
    ``fastest`` names openvino-ir only where its files were kept."""
    onnx_path = tmp_path / "int8.onnx"
    onnx_path.write_bytes(files["int8"].read_bytes())
    data = random_images(classes=4)
    spec = MeasureSpec(runtimes=["openvino", "openvino-ir"], batch_sizes=[1], warmup=2, repeats=5)
    ref = ort_logits_of(files["int8"], data.test_x)
    res = measure_onnx({"int8": onnx_path}, {"int8": ref}, data, spec, progress=False)["int8"]
    rts = res["runtimes"]
    assert rts["openvino-ir"]["parity"] == rts["openvino"]["parity"]
    assert rts["openvino-ir"]["settings"]["file"] == "int8.xml"
    ir = res["openvino_ir"]
    assert openvino_ir_paths(onnx_path)[0].exists() is ir["kept"]
    assert (res["fastest"]["1"]["runtime"] == "openvino-ir") <= ir["kept"]


def ort_logits_of(path: Path, x_uint8: torch.Tensor) -> np.ndarray:
    run = open_runner("onnxruntime", path, 1).run
    return np.asarray(run(x_uint8.float().div(255.0).numpy()))


def test_parity_counts_an_exact_tie_at_the_artifacts_top_as_agreement() -> None:
    """Quantized logits can tie at the top: the artifact's argmax is then arbitrary, so the
    torch model's class among the tied ones agrees; one step below it does not."""
    ref = np.array([[1.0, 0.9, 0.0], [0.2, 0.8, 0.1], [0.3, 0.2, 0.1]], dtype=np.float32)
    art = np.array([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.4, 0.5, 0.0]], dtype=np.float32)
    got = parity(ref, art)
    assert got["top1_agreement"] == pytest.approx(2 / 3) and got["tied_top1"] == 1
    assert got["samples"] == 3 and got["max_abs_logit_diff"] == pytest.approx(0.5)
