"""Feature distillation: points, taps on eager and PT2E students, the loss goes down,
adapters train but never reach the export."""

from __future__ import annotations

import copy

import onnx
import pytest
import torch

from helpers import CPU, context, synthetic_data, tiny
from pqd.errors import RecipeError
from pqd.onnx_export import export_onnx
from pqd.quant.prepare import prepare_qat
from pqd.quant.scheme import DEFAULT_SCHEME
from pqd.recipe import FeatureKDSpec
from pqd.stages.distill import TAP_PREFIX, TAPS, apply_distill, capture, feature_points
from pqd.state import State
from pqd.train import eval_mode

EXAMPLE = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_default_points_are_the_exit_points_and_the_last_block() -> None:
    teacher = tiny()  # tiny_cnn: 3 blocks, default_exit_points [0, 1]
    assert feature_points(teacher, FeatureKDSpec()) == [
        "net.features.0",
        "net.features.1",
        "net.features.2",
    ]
    assert feature_points(teacher, FeatureKDSpec(points=[-1, "net.features.1"])) == [
        "net.features.2",
        "net.features.1",
    ]
    with pytest.raises(RecipeError, match="no block 7"):
        feature_points(teacher, FeatureKDSpec(points=[7]))
    with pytest.raises(RecipeError, match=r"no module 'net\.nope'"):
        feature_points(teacher, FeatureKDSpec(points=["net.nope"]))


def test_default_points_of_a_bare_network_following_the_exit_protocol() -> None:
    bare = tiny().net  # features + classifier + default_exit_points, no Classifier around
    assert feature_points(bare, FeatureKDSpec()) == ["features.0", "features.1", "features.2"]
    assert feature_points(bare, FeatureKDSpec(points=[1])) == ["features.1"]
    with pytest.raises(RecipeError, match="no features"):
        feature_points(torch.nn.Sequential(torch.nn.Flatten()), FeatureKDSpec())


def test_graph_taps_see_the_same_features_as_eager_hooks() -> None:
    model = tiny()
    points = ["net.features.0", "net.features.1", "net.features.2"]
    graph = prepare_qat(
        copy.deepcopy(model), EXAMPLE, {**copy.deepcopy(DEFAULT_SCHEME), "mode": "ptq"}
    )
    for _, m in graph.named_children():
        if hasattr(m, "fake_quant_enabled"):
            m.fake_quant_enabled[0] = 0  # float: the graph computes what the eager net does
    x = torch.rand(4, 3, 32, 32)
    with (
        capture(model, points) as eager,
        capture(graph, points) as taps,
        torch.no_grad(),
        eval_mode(graph),
    ):
        model.eval()
        model(x)
        graph(x)
        for p in points:
            assert taps[p].value.shape == eager[p].value.shape
            torch.testing.assert_close(taps[p].value, eager[p].value, atol=1e-4, rtol=1e-4)
    assert not [n for n in graph.graph.nodes if str(n.target).startswith(TAP_PREFIX)]
    assert not [n for n, _ in graph.named_children() if n.startswith(TAP_PREFIX)]
    assert not hasattr(model, TAPS)


@pytest.mark.parametrize("loss", ["fitnet", "attention"])
def test_feature_loss_decreases_on_an_eager_student(loss: str) -> None:
    data = synthetic_data(n_train=128, seed=1)
    teacher = tiny(seed=2)
    ctx = context(
        [{"stage": "distill", "epochs": 3, "features": {"loss": loss}, "train": {"lr": 0.05}}],
        data,
        teacher,
    )
    student = tiny(seed=3)  # another init: features differ at the start
    names = set(dict(student.named_parameters()))
    state = apply_distill(State(model=student), ctx.recipe.stages[0], ctx)
    info = state.info["feature_kd"]
    assert info["steps"] == 12 and info["feature_loss_last"] < 0.8 * info["feature_loss_first"]
    assert info["adapter_params"] == (8 * 8 + 8 * 8 + 16 * 16 if loss == "fitnet" else 0)
    assert set(dict(state.model.named_parameters())) == names  # adapters are gone
    assert not hasattr(state.model, TAPS)


def test_feature_kd_on_a_quantized_graph_leaves_the_export_unchanged(tmp_path) -> None:
    data = synthetic_data(n_train=64, seed=4)
    teacher = tiny(seed=5)
    ctx = context(
        [{"stage": "distill", "epochs": 1, "features": {"points": [1, 2]}}], data, teacher
    )
    graph = prepare_qat(
        copy.deepcopy(teacher), EXAMPLE, {**copy.deepcopy(DEFAULT_SCHEME), "mode": "ptq"}
    )
    plain, _ = export_onnx(graph, tmp_path / "plain.onnx", EXAMPLE, quantized=True)
    state = apply_distill(State(model=graph, quantized=True), ctx.recipe.stages[0], ctx)
    info = state.info["feature_kd"]
    assert info["student_graph"] and info["adapter_params"] == 8 * 8 + 16 * 16
    assert info["steps"] == 2
    assert not any("_pqd" in n for n, _ in state.model.named_modules())
    kd, _ = export_onnx(state.model, tmp_path / "kd.onnx", EXAMPLE, quantized=True)
    a, b = onnx.load(str(plain)), onnx.load(str(kd))
    assert len(a.graph.node) == len(b.graph.node)
    assert sorted(n.op_type for n in a.graph.node) == sorted(n.op_type for n in b.graph.node)

    def weights(p: onnx.ModelProto) -> list:  # (equal scalar scales may be deduplicated)
        return sorted(tuple(i.dims) for i in p.graph.initializer if len(i.dims) >= 2)

    assert weights(a) == weights(b)
    assert not [i.name for i in b.graph.initializer if "_pqd" in i.name or "adapter" in i.name]


def test_spatial_mismatch_is_a_recipe_error() -> None:
    from pqd.stages.distill import make_adapters

    with pytest.raises(RecipeError, match="spatial sizes must match"):
        make_adapters({"p": torch.Size([1, 8, 16, 16])}, {"p": torch.Size([1, 8, 8, 8])}, "fitnet")
    adapters = make_adapters(
        {"p": torch.Size([1, 4, 8, 8])}, {"p": torch.Size([1, 8, 8, 8])}, "fitnet"
    )
    assert adapters["p"].weight.shape == (8, 4, 1, 1)
    same = make_adapters({"p": torch.Size([1, 8, 8, 8])}, {"p": torch.Size([1, 8, 8, 8])}, "fitnet")
    x = torch.randn(2, 8, 8, 8)
    torch.testing.assert_close(same["p"](x), x)  # identity start
    assert CPU.type == "cpu"


@pytest.mark.parametrize("loss", ["fitnet", "attention"])
def test_feature_kd_per_block_on_a_vit(loss: str) -> None:
    """Transformer blocks give [N, tokens, dim]: a linear adapter over dim, the loss falls."""
    data = synthetic_data(n_train=128, seed=1)
    teacher = tiny("vit_tiny", seed=2)
    points = feature_points(teacher, FeatureKDSpec())
    ctx = context(
        [{"stage": "distill", "epochs": 3, "features": {"loss": loss}, "train": {"lr": 0.01}}],
        data,
        teacher,
        model="vit_tiny",
    )
    student = tiny("vit_tiny", seed=3)
    names = set(dict(student.named_parameters()))
    state = apply_distill(State(model=student), ctx.recipe.stages[0], ctx)
    info = state.info["feature_kd"]
    assert info["feature_loss_last"] < 0.8 * info["feature_loss_first"]
    dim = teacher.net.features[1].norm1.normalized_shape[0]
    assert info["adapter_params"] == (len(points) * dim * dim if loss == "fitnet" else 0)
    assert set(dict(state.model.named_parameters())) == names


def test_token_count_mismatch_is_a_recipe_error() -> None:
    from pqd.stages.distill import make_adapters

    with pytest.raises(RecipeError, match="token counts must match"):
        make_adapters({"p": torch.Size([1, 17, 32])}, {"p": torch.Size([1, 65, 32])}, "fitnet")
    adapters = make_adapters(
        {"p": torch.Size([1, 17, 24])}, {"p": torch.Size([1, 17, 32])}, "fitnet"
    )
    assert adapters["p"].weight.shape == (32, 24)
