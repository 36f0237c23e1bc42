"""Quantization options on tiny models: each exports a valid ONNX file that keeps the
calibrated scales, in the layout its scheme promises; calibration, sensitivity, mixed
precision; and every option composes with pruning before or after it."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch

from helpers import (
    CPU,
    context,
    label_with,
    onnx_weights,
    ort_logits,
    synthetic_data,
    tiny,
)
from pqd.errors import RecipeError
from pqd.measurement.runtime import ort_kernels
from pqd.onnx_export import export_onnx
from pqd.quant.calibration import calibrate
from pqd.quant.layers import fake_quantizers, keep_float, quantized_layers
from pqd.quant.prepare import prepare_qat
from pqd.quant.scheme import DEFAULT_SCHEME, quant_scheme
from pqd.quant.sensitivity import choose_mixed_precision, layer_sensitivity
from pqd.recipe import MixedPrecisionSpec, recipe_from_dict
from pqd.stages.quantize import apply_quantize
from pqd.state import State
from pqd.train import set_train

EXAMPLE = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
X_TEST = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)).numpy()
CONVS = 3  # tiny_cnn: three convs and one linear

VARIANTS = {
    "per_channel": {},
    "per_tensor": {"granularity": "per_tensor"},
    "asym_weights": {"weight_symmetric": False},
    "sym_activations": {"activation_symmetric": True},
    "int4": {"weight_bits": 4},
    "dynamic": {"mode": "dynamic"},
}


def calib_batches(n: int = 3, seed: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.rand(16, 3, 32, 32, generator=g), torch.zeros(16, dtype=torch.long))
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, tuple]:
    """Every variant of tiny_cnn: prepared, calibrated, exported (path, torch deploy model)."""
    out = tmp_path_factory.mktemp("variants")
    model = tiny()
    result = {}
    for name, kw in VARIANTS.items():
        scheme = {**copy.deepcopy(DEFAULT_SCHEME), "mode": "ptq", **kw}
        graph = prepare_qat(copy.deepcopy(model), EXAMPLE, scheme)
        calibrate(graph, calib_batches(), 3, CPU, scheme)
        path, deploy = export_onnx(graph, out / f"{name}.onnx", EXAMPLE, quantized=True)
        result[name] = (path, deploy, graph)
    return result


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_is_valid_onnx_matching_its_torch_model(exported, name: str) -> None:
    path, deploy, _ = exported[name]
    onnx.checker.check_model(onnx.load(str(path)))
    with torch.no_grad():
        ref = deploy(torch.from_numpy(X_TEST)).numpy()
    got = ort_logits(path, X_TEST)
    # one int8 rounding step of the logits at most (reference vs onnxruntime kernels)
    assert np.abs(got - ref).max() <= 0.05 * np.abs(ref).max() + 1e-3


def test_per_channel_and_per_tensor_scale_shapes(exported) -> None:
    pc = [w for w in onnx_weights(exported["per_channel"][0]) if w["op"] == "Conv"]
    pt = [w for w in onnx_weights(exported["per_tensor"][0]) if w["op"] == "Conv"]
    assert len(pc) == len(pt) == CONVS
    for a, b in zip(pc, pt, strict=True):
        assert a["scale"].shape == (a["weight"].shape[0],)  # one scale per output channel
        assert b["scale"].shape == ()  # one scale for the tensor
        assert a["dtype"] == b["dtype"] == onnx.TensorProto.INT8
        assert not a["zero_point"].any() and not b["zero_point"].any()  # symmetric


def test_scales_in_the_file_are_the_calibrated_ones(exported) -> None:
    _, _, graph = exported["per_channel"]
    layers = quantized_layers(graph)
    fqs = dict(fake_quantizers(graph))
    convs = [w for w in onnx_weights(exported["per_channel"][0]) if w["op"] == "Conv"]
    stem = fqs[layers["net.features.0.0"].weight_fq]
    np.testing.assert_allclose(convs[0]["scale"], stem.scale.numpy(), rtol=1e-6)


def test_asymmetric_weights_keep_zero_points_and_still_fuse(exported) -> None:
    convs = [w for w in onnx_weights(exported["asym_weights"][0]) if w["op"] == "Conv"]
    assert any(w["zero_point"].any() for w in convs)
    kernels = ort_kernels(exported["asym_weights"][0])
    assert kernels.get("QLinearConv") == CONVS and kernels.get("QGemm") == 1


def test_default_u8s8_fuses_every_conv_and_the_linear(exported) -> None:
    kernels = ort_kernels(exported["per_channel"][0])
    assert kernels.get("QLinearConv") == CONVS and kernels.get("QGemm") == 1
    assert "Conv" not in kernels and "FusedConv" not in kernels
    assert ort_kernels(exported["per_tensor"][0]).get("QLinearConv") == CONVS


def test_symmetric_activations_are_int8_with_zero_point_zero(exported) -> None:
    proto = onnx.load(str(exported["sym_activations"][0]))
    inits = {i.name: i for i in proto.graph.initializer}
    acts = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert acts
    for q in acts:
        zp = inits[q.input[2]]
        assert zp.data_type == onnx.TensorProto.INT8
        assert not onnx.numpy_helper.to_array(zp).any()


def test_int4_weights_are_stored_as_int4_in_range(exported) -> None:
    path = exported["int4"][0]
    proto = onnx.load(str(path))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 21
    weights = onnx_weights(path)
    assert len(weights) == CONVS + 1
    for w in weights:
        assert w["dtype"] == onnx.TensorProto.INT4
        assert w["weight"].min() >= -8 and w["weight"].max() <= 7
    assert path.stat().st_size < exported["per_channel"][0].stat().st_size


def test_dynamic_uses_integer_ops_on_the_trained_int8_weights(exported) -> None:
    from pqd.onnx_export import _weights_only

    path, _, graph = exported["dynamic"]
    proto = onnx.load(str(path))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("ConvInteger") == CONVS and ops.count("MatMulInteger") == 1
    assert ops.count("DynamicQuantizeLinear") == CONVS + 1
    assert "QuantizeLinear" not in ops and "DequantizeLinear" not in ops
    conv_w = [w["weight"] for w in onnx_weights(path) if w["op"] == "ConvInteger"]
    converted = _weights_only(graph)  # the int8 integers torch trained / converted
    torch_w = [
        t.numpy() for _, t in converted.named_buffers() if t.dtype == torch.int8 and t.dim() == 4
    ]
    torch_w += [
        getattr(converted, n).numpy() for n, _ in converted.named_children() if False
    ]  # (buffers hold every folded conv weight)
    assert len(conv_w) == CONVS
    for w in conv_w:
        assert w.dtype == np.int8 and np.abs(w).max() <= 127  # narrow symmetric range
        assert any(t.shape == w.shape and np.array_equal(t, w) for t in torch_w)


def _input_quantizer(graph: torch.fx.GraphModule) -> torch.nn.Module:
    """The fake-quantizer of the stem's input (the normalized image)."""
    fqs = dict(fake_quantizers(graph))
    return fqs[quantized_layers(graph)["net.features.0.0"].input_fqs[0]]


@pytest.mark.parametrize("observer", ["minmax", "percentile", "entropy"])
def test_calibration_sets_the_observer_range_on_the_input(observer: str) -> None:
    scheme = {
        **copy.deepcopy(DEFAULT_SCHEME),
        "mode": "ptq",
        "observer": observer,
        "percentile": 99.0,
    }
    graph = prepare_qat(tiny(), EXAMPLE, scheme)
    batches = calib_batches()
    calibrate(graph, batches, 3, CPU, scheme)
    fq = _input_quantizer(graph)
    x = torch.cat([b[0] for b in batches])
    z = (x - 0.5) / 0.25  # Normalize(MEAN, STD): the stem conv's input
    lo, hi = float(fq.activation_post_process.min_val), float(fq.activation_post_process.max_val)
    if observer == "minmax":
        assert (lo, hi) == pytest.approx((float(z.min()), float(z.max())), abs=1e-5)
    elif observer == "percentile":  # uniform input: the 1% and 99% quantiles of U[-2, 2]
        assert lo == pytest.approx(-1.96, abs=0.02) and hi == pytest.approx(1.96, abs=0.02)
    else:  # a flat density: entropy keeps (nearly) the whole span
        assert hi == pytest.approx(float(z.abs().max()), rel=0.02)
    assert float(fq.scale) == pytest.approx((hi - lo) / 255, rel=1e-4)
    assert int(fq.fake_quant_enabled[0]) == 1 and int(fq.observer_enabled[0]) == 0  # fixed


# ---------------------------------------------------------------------------- sensitivity


SENSITIVE = "net.features.2.0.0"


@pytest.fixture(scope="module")
def sensitive_graph():
    """tiny_cnn whose third conv has a huge weight on an input channel that is always zero:
    the float model is unchanged, but quantizing that conv's weights rounds every other
    weight of it to zero. Labels = the float model's predictions."""
    model = tiny(seed=3)
    with torch.no_grad():
        model.net.features[1][0][1].bias[0] = -1e4  # channel 0 of block 1: ReLU -> 0
        model.net.features[2][0][0].weight[:, 0] = 1e3
        model.net.classifier[2].bias.zero_()  # a collapsed feature map predicts class 0
    data = synthetic_data(n_val=96, seed=4)
    label_with(model, data)
    graph = prepare_qat(model, EXAMPLE, {**copy.deepcopy(DEFAULT_SCHEME), "mode": "ptq"})
    ctx = context([], data, model)
    calibrate(graph, ctx.loader("val", 32), 3, CPU)
    return graph, ctx


def test_sensitivity_ranks_the_sensitive_layer_first(sensitive_graph) -> None:
    graph, ctx = sensitive_graph
    result = layer_sensitivity(graph, ctx.loader("val", 48), CPU)
    assert result["float_accuracy"] == pytest.approx(1.0)
    assert [r["layer"] for r in result["layers"]] == list(quantized_layers(graph))
    assert result["ranking"][0] == SENSITIVE
    drops = {r["layer"]: r["drop_points"] for r in result["layers"]}
    assert drops[SENSITIVE] > 50 and drops[SENSITIVE] > 5 * max(
        v for k, v in drops.items() if k != SENSITIVE
    )
    # flags are restored: every quantizer is on again
    assert all(int(m.fake_quant_enabled[0]) for _, m in fake_quantizers(graph))


def test_mixed_precision_keeps_exactly_the_chosen_layers_float(sensitive_graph, tmp_path) -> None:
    graph, ctx = sensitive_graph
    graph = copy.deepcopy(graph)
    chosen = choose_mixed_precision(
        graph,
        ctx.loader("val", 48),
        CPU,
        MixedPrecisionSpec(max_drop_points=0.0, max_float_layers=1),
    )
    assert chosen["float_layers"] == [SENSITIVE]
    trace = chosen["mixed_precision"]["trace"]
    assert trace[1]["drop_points"] < trace[0]["drop_points"]  # keeping it float helps
    keep_float(graph, chosen["float_layers"])
    assert quant_scheme(graph)["float_layers"] == [SENSITIVE]
    path, _ = export_onnx(graph, tmp_path / "mixed.onnx", EXAMPLE, quantized=True)
    weights = onnx_weights(path)
    float_w = [w for w in weights if w["dtype"] == onnx.TensorProto.FLOAT]
    assert len(float_w) == 1 and float_w[0]["weight"].shape == (16, 8, 3, 3)
    assert sum(w["dtype"] == onnx.TensorProto.INT8 for w in weights) == CONVS  # 2 convs + fc


# ---------------------------------------------------------------------------- the stage


def masked_weights_are_zero(path, masks: dict[str, torch.Tensor]) -> None:
    """Every masked-out weight of the eager model is exactly zero in the file (the stem's
    zero input channel that export pads in is ignored)."""
    stored = []
    for w in onnx_weights(path):
        arr = w["dequantized"]  # (q - zero point) * scale: asymmetric zeros are not q == 0
        arr = arr.T if w["op"] == "MatMulInteger" else arr  # [K, N] there
        stored.append(arr)
    assert masks
    for name, mask in masks.items():
        m = mask.numpy()
        cands = [
            a[:, : m.shape[1]]
            for a in stored
            if a.ndim == m.ndim
            and a.shape[0] == m.shape[0]
            and a.shape[2:] == m.shape[2:]
            and a.shape[1] >= m.shape[1]
        ]
        assert any(np.all(a[~m] == 0) for a in cands), name


OPTIONS = {
    "ptq_per_tensor_percentile_asym": {
        "mode": "ptq",
        "epochs": 0,
        "weights": {"granularity": "per_tensor", "symmetric": False},
        "activations": {"observer": "percentile"},
    },
    "qat_int4_entropy_mixed": {
        "mode": "qat",
        "epochs": 1,
        "weights": {"bits": 4},
        "activations": {"observer": "entropy"},
        "mixed_precision": {"max_drop_points": 0.0, "max_float_layers": 1},
    },
    "dynamic": {"mode": "dynamic", "epochs": 1},
}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_each_option_composes_with_pruning_before_and_after(option: str, tmp_path) -> None:
    """prune 30% -> quantize(option) -> prune 60%: the masks of both prune stages (one on
    the eager model, one on the fake-quant graph) are exactly zero in the exported file."""
    stages = [
        {"stage": "prune", "sparsity": 0.3, "epochs": 1},
        {"stage": "quantize", **OPTIONS[option]},
        {"stage": "prune", "sparsity": 0.6, "epochs": 1},
    ]
    data = synthetic_data(seed=5)
    teacher = tiny(seed=6)
    job = context(stages, data, teacher)
    first: dict[str, torch.Tensor] = {}
    chosen: list[str] = []

    def keep_first(i: int, spec, state: State, seconds: float) -> None:
        if i == 0:
            first.update({n: m.clone() for n, m in state.masks.items()})
        if i == 1:
            chosen.extend(state.info.get("float_layers", []))

    state = job.run_stages(State(model=copy.deepcopy(teacher)), on_stage=keep_first)
    assert state.quantized
    for n, m in first.items():  # pruned before quantization: still pruned after
        assert not (state.masks[n] & ~m).any()
    path, _ = export_onnx(state.model, tmp_path / "final.onnx", EXAMPLE, quantized=True)
    onnx.checker.check_model(onnx.load(str(path)))
    masked_weights_are_zero(path, state.masks)
    scheme = quant_scheme(state.model)
    assert scheme["mode"] == OPTIONS[option]["mode"]
    if option.startswith("qat_int4"):  # the layers mixed precision kept float stay float
        # (with re-estimated BN statistics INT4 may lose nothing on these 64 val images,
        # and then no layer needs to stay float)
        assert scheme["float_layers"] == chosen and len(chosen) <= 1


def test_quantize_stage_calibrates_on_val_and_records_the_scheme() -> None:
    data = synthetic_data(seed=7)
    teacher = tiny(seed=8)
    ctx = context(
        [{"stage": "quantize", "mode": "ptq", "epochs": 0, "activations": {"observer": "entropy"}}],
        data,
        teacher,
    )
    state = apply_quantize(State(model=copy.deepcopy(teacher)), ctx.recipe.stages[0], ctx)
    assert state.info["calibration_split"] == "val"
    assert state.info["calibration_images"] == 64  # the whole val split (2 batches of 32)
    assert state.info["scheme"]["observer"] == "entropy"
    assert state.info["precision"] == "int8"
    # a repeated quantize stage may continue training, not change the scheme
    again = recipe_from_dict(
        {
            "model": {"name": "tiny_cnn"},
            "stages": [{"stage": "quantize", "mode": "ptq", "epochs": 0, "weights": {"bits": 4}}],
        }
    )
    with pytest.raises(RecipeError, match="already quantized"):
        apply_quantize(state, again.stages[0], ctx)


BAD = [
    ({"mode": "dynamic", "activations": {"observer": "entropy"}}, "dynamic"),
    ({"mode": "dynamic", "weights": {"bits": 4}}, "symmetric 8-bit"),
    ({"mode": "dynamic", "mixed_precision": {"max_drop_points": 1}}, "static"),
    ({"weights": {"granularity": "per_row"}}, "per_channel"),
    ({"weights": {"bits": 2}}, "8"),
    ({"activations": {"observer": "kl"}}, "entropy"),
    ({"activations": {"percentile": 40}}, "> 50"),
    ({"mixed_precision": {"max_drop_points": -1}}, ">= 0"),
    ({"weights": {"symetric": True}}, "allowed: granularity, symmetric, bits"),
]


@pytest.mark.parametrize(("patch", "fix"), BAD, ids=[str(b[0]) for b in BAD])
def test_bad_quantize_options_give_one_line(patch: dict, fix: str) -> None:
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(
            {"model": {"name": "tiny_cnn"}, "stages": [{"stage": "quantize", **patch}]}
        )
    assert fix in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_mobilenetv2_qat_after_a_short_baseline_trains() -> None:
    """A 5-step baseline leaves BN running statistics far from the weights: the QAT graph's
    first gradient norm was 1e8-1e10 (or 0: every activation clamped), so
    train.max_grad_norm stopped QAT at step 1, until the quantize stage re-estimated the
    statistics (refresh_bn_stats)."""
    from helpers import MEAN, STD
    from pqd.models import build_model

    data = synthetic_data(n_train=160, n_val=64, n_test=32)
    torch.manual_seed(0)
    model = build_model("mobilenetv2", 10, MEAN, STD, width_mult=0.25)
    ctx = context([{"stage": "quantize", "mode": "qat", "epochs": 0}], data, model)
    state = State(model=model)
    ctx.fit(state, ctx.recipe.train.model_copy(update={"lr": 0.1}), 1, seed=0)  # baseline
    # the stem BN's input variance on the train split (as refresh_bn_stats averages it)
    stem_bn, feats = model.net.features[0][1], []
    hook = stem_bn.register_forward_pre_hook(lambda _m, a: feats.append(a[0].var((0, 2, 3))))
    model.eval()
    with torch.no_grad():
        for x, _ in ctx.loader("train", 32, seed=ctx.seed, shuffle=True):
            model(x)
    hook.remove()
    data_var = torch.stack(feats).mean(0)
    state = apply_quantize(state, ctx.recipe.stages[0], ctx)
    assert state.info["bn_stats_images"] == 160
    running_var = next(
        b
        for n, b in state.model.named_buffers()
        if "features_0_1_running_var" in n.replace(".", "_")
    )
    assert torch.allclose(running_var, data_var, rtol=1e-3)  # not the 5-step moving average
    set_train(state.model, True)
    x, y = next(iter(ctx.loader("train", 32)))
    torch.nn.functional.cross_entropy(state.model(x), y).backward()
    grads = [p.grad for p in state.model.parameters() if p.grad is not None]
    norm = float(torch.nn.utils.get_total_norm(grads))
    assert 1e-3 < norm < ctx.recipe.train.max_grad_norm
    state.model.zero_grad()
    result = ctx.fit(state, ctx.train, 1, seed=1)  # the QAT epoch: no divergence
    assert result.steps == 5 and np.isfinite(result.losses).all()


def test_refresh_bn_stats_sets_the_data_statistics() -> None:
    from pqd.quant.prepare import refresh_bn_stats

    model = tiny(seed=3)
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    feats: list[torch.Tensor] = []
    hook = bn.register_forward_pre_hook(lambda _m, args: feats.append(args[0].detach()))
    x = torch.rand(24, 3, 32, 32)
    batches = [(x[:12], None), (x[12:], None), (torch.rand(12, 3, 32, 32), None)]
    assert refresh_bn_stats(model, batches, 2, CPU) == 24
    hook.remove()
    f = torch.cat(feats)
    assert torch.allclose(bn.running_mean, f.mean((0, 2, 3)), atol=1e-5)
    per_batch = torch.stack([t.var((0, 2, 3), unbiased=True) for t in feats])
    assert torch.allclose(bn.running_var, per_batch.mean(0), rtol=1e-4)
    assert bn.momentum == 0.1 and not model.training
    before = bn.running_var.clone()
    assert refresh_bn_stats(model, [(x[:1], None)], 2, CPU) == 0  # nothing usable: unchanged
    assert torch.equal(bn.running_var, before)
