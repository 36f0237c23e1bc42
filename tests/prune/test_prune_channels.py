"""Structured channel pruning: group scores, plans, TP surgery, replay, masks through
surgery, composition with quantize and distill, MACs targets."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from helpers import make_ctx, run_stages
from pqd.errors import RecipeError
from pqd.measurement.complexity import onnx_complexity
from pqd.models import build_model, check_output_shape
from pqd.onnx_export import export_onnx
from pqd.prune.channels import (
    apply_structure,
    carry_masks,
    channel_groups,
    count_macs,
    find_ratio,
    group_scores,
    output_layer,
    plan_channels,
    plan_records,
    rebuild_model,
)
from pqd.prune.masks import magnitude_masks, prunable_parameters
from pqd.recipe import recipe_from_dict
from pqd.train import is_graph

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
EX = torch.rand(2, 3, 32, 32)


def model(name: str = "tiny_resnet") -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, 10, MEAN, STD).eval()


def convs(m: nn.Module) -> dict[str, tuple[int, int]]:
    return {
        n: (c.in_channels, c.out_channels) for n, c in m.named_modules() if isinstance(c, nn.Conv2d)
    }


def test_group_score_is_the_sum_over_producer_rows_and_consumer_columns() -> None:
    m = model("tiny_cnn")
    dg, groups = channel_groups(m, EX)
    names = {mod: n for n, mod in m.named_modules()}
    w = {n: p.detach().abs() for n, p in m.named_parameters() if p.ndim >= 2}
    root = "net.features.1.0.0"  # conv 8 -> 8 feeding conv 8 -> 16
    s = group_scores(groups[root], w, names, dg, p=1)
    expected = w[f"{root}.weight"].sum((1, 2, 3)) + w["net.features.2.0.0.weight"].sum((0, 2, 3))
    assert torch.allclose(s.float(), expected)
    # the last conv's channels feed the classifier (columns of the linear weight)
    last = "net.features.2.0.0"
    s = group_scores(groups[last], w, names, dg, p=1)
    expected = w[f"{last}.weight"].sum((1, 2, 3)) + w["net.classifier.2.weight"].sum(0)
    assert torch.allclose(s.float(), expected)
    l2 = group_scores(groups[last], {k: v**2 for k, v in w.items()}, names, dg, p=2)
    assert torch.allclose(
        l2.float(),
        (
            w[f"{last}.weight"].pow(2).sum((1, 2, 3)) + w["net.classifier.2.weight"].pow(2).sum(0)
        ).sqrt(),
    )


def test_residual_groups_couple_every_conv_joined_by_an_add() -> None:
    m = model()
    _, groups = channel_groups(m, EX)
    names = {mod: n for n, mod in m.named_modules()}
    stem_group = {names.get(d.target.module) for d, _ in groups["net.features.0.0"]}
    # the stem's channels are added to block 1's output: both convs prune together
    assert {
        "net.features.0.0",
        "net.features.1.conv2",
        "net.features.1.conv1",
        "net.features.2.conv1",
        "net.features.2.shortcut.0",
    } <= stem_group
    assert output_layer(m, EX) is m.net.classifier[2]
    assert not any(
        names.get(d.target.module) == "net.classifier.2" and "out" in str(d.handler)
        for g in groups.values()
        for d, _ in g
    )


def test_plan_layer_global_and_round_to() -> None:
    scores = {
        "a": torch.tensor([4.0, 1.0, 3.0, 2.0]),
        "b": torch.tensor([10.0, 40.0, 30.0, 20.0, 1.0, 2.0, 3.0, 4.0]),
    }
    assert plan_channels(scores, 0.5, "layer") == {"a": [0, 2], "b": [0, 1, 2, 3]}
    # global: scores divided by the group mean (a: 1.6 .4 1.2 .8; b: .73 2.9 2.2 1.5 ...),
    # the best 6 of 12 overall; raw scores would have kept none of a
    g = plan_channels(scores, 0.5, "global", max_ratio=0.9)
    assert g == {"a": [0, 2, 3], "b": [1, 2, 3]}
    assert plan_channels(scores, 0.5, "layer", round_to=4) == {"a": [0, 1, 2, 3], "b": [0, 1, 2, 3]}
    # max_ratio floors each group in global ranking
    low = {"a": torch.tensor([0.01, 0.01, 0.02, 0.01]), "b": torch.tensor([5.0, 6.0, 7.0, 8.0])}
    assert len(plan_channels(low, 0.5, "global", max_ratio=0.5)["a"]) == 2


def test_surgery_shrinks_keeps_io_and_replays_on_a_fresh_model() -> None:
    m = model()
    scores = {n: p.detach().abs() for n, p in m.named_parameters() if p.ndim >= 2}
    spec = recipe_from_dict(
        {
            "model": {"name": "tiny_resnet"},
            "stages": [{"stage": "prune_channels", "ratio": 0.5, "round_to": None}],
        }
    ).stages[0]
    records = plan_records(m, EX, scores, 0.5, spec)
    before = convs(m)
    apply_structure(m, EX, records)
    after = convs(m)
    assert after["net.features.0.0"] == (3, 4)  # RGB input intact, outputs halved
    assert after["net.features.2.conv2"] == (8, 8)
    assert m.net.classifier[2].out_features == 10 and m.net.classifier[2].in_features == 8
    assert m.norm.mean.shape == (1, 3, 1, 1) and m.norm.std.shape == (1, 3, 1, 1)
    assert sum(c[1] for c in after.values()) == sum(c[1] for c in before.values()) // 2
    check_output_shape(m, 10)
    # JSON-able records rebuild the same architecture; the weights then load and agree
    import json

    again = rebuild_model(
        build_model("tiny_resnet", 10, MEAN, STD), json.loads(json.dumps(records)), EX
    )
    assert convs(again) == after
    again.load_state_dict(m.state_dict())
    again.eval()
    assert torch.allclose(again(EX), m(EX))
    with pytest.raises(Exception, match="expects"):
        apply_structure(again, EX, records)  # already pruned: the counts no longer match


def test_kept_channels_are_the_best_scored_ones() -> None:
    m = model("tiny_cnn")
    conv = m.net.features[1][0][0]
    original = conv.weight.detach().clone()
    with torch.no_grad():
        for c in range(8):
            conv.weight[c] = 0.01 * (c + 1) if c % 2 else 10.0 * (c + 1)  # even ones win
    scores = {n: p.detach().abs() for n, p in m.named_parameters() if p.ndim >= 2}
    spec = recipe_from_dict(
        {
            "model": {"name": "tiny_cnn"},
            "stages": [{"stage": "prune_channels", "ratio": 0.5, "round_to": None, "p": 1}],
        }
    ).stages[0]
    records = plan_records(m, EX, scores, 0.5, spec)
    rec = {r["layer"]: r for r in records}["net.features.1.0.0"]
    assert rec["kept"] == [0, 2, 4, 6] and rec["channels"] == 8
    del original


class CatNet(nn.Module):
    """Concatenation and a depthwise conv (what TP must keep consistent)."""

    def __init__(self) -> None:
        super().__init__()
        from pqd.models import Normalize

        self.norm = Normalize(MEAN, STD)
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        x = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1)
        x = torch.relu(self.pw(torch.relu(self.dw(x))))
        return self.fc(x.mean((2, 3)))


def test_concat_and_depthwise_are_pruned_consistently() -> None:
    torch.manual_seed(0)
    m = CatNet().eval()
    scores = {n: p.detach().abs() for n, p in m.named_parameters() if p.ndim >= 2}
    spec = recipe_from_dict(
        {
            "model": {"name": "tiny_cnn"},
            "stages": [{"stage": "prune_channels", "ratio": 0.5, "round_to": None}],
        }
    ).stages[0]
    records = plan_records(m, EX, scores, 0.5, spec)
    apply_structure(m, EX, records)
    assert m.a.out_channels + m.b.out_channels == m.dw.in_channels == m.dw.out_channels
    assert m.dw.groups == m.dw.in_channels == m.pw.in_channels
    assert m.pw.out_channels == m.fc.in_features == 8 and m.fc.out_features == 10
    assert m(EX).shape == (2, 10)


def test_unstructured_masks_are_sliced_exactly_through_surgery() -> None:
    m = model()
    params = prunable_parameters(m)
    masks = magnitude_masks(params, 0.5)
    with torch.no_grad():
        for n, p in params.items():
            p.mul_(masks[n])
    scores = {n: p.detach().abs() for n, p in params.items()}
    spec = recipe_from_dict(
        {
            "model": {"name": "tiny_resnet"},
            "stages": [{"stage": "prune_channels", "ratio": 0.5, "round_to": None}],
        }
    ).stages[0]
    records = plan_records(m, EX, scores, 0.5, spec)
    old_mask = masks["net.features.1.conv1.weight"].clone()
    new = carry_masks(m, masks, EX, records)
    apply_structure(m, EX, records)
    kept_out = {r["layer"]: r["kept"] for r in records}["net.features.1.conv1"]
    kept_in = {r["layer"]: r["kept"] for r in records}["net.features.0.0"]
    assert torch.equal(new["net.features.1.conv1.weight"], old_mask[kept_out][:, kept_in])
    for n, p in prunable_parameters(m).items():
        assert new[n].shape == p.shape and torch.all(p[~new[n]] == 0), n


def test_count_macs_matches_the_onnx_count(tmp_path) -> None:
    m = model()
    path, _ = export_onnx(m, tmp_path / "m.onnx", EX, quantized=False)
    assert count_macs(m, EX) == onnx_complexity(path)["macs"] == 2_318_496


def test_find_ratio_bisects_to_the_smallest_meeting_ratio() -> None:
    ratio, met, tried = find_ratio(lambda r: 100 * (1 - r), 30.0, 0.9, trials=12)
    assert met and ratio == pytest.approx(0.7, abs=0.9 / 2**10)
    assert 100 * (1 - ratio) <= 30.0 and len(tried) == 12
    assert find_ratio(lambda r: 100.0, 30.0, 0.9, 5)[:2] == (0.9, False)
    assert find_ratio(lambda r: 10.0, 30.0, 0.9, 5)[:2] == (0.0, True)


# ---------------------------------------------------------------------------- the stage


def test_prune_channels_then_distill_then_quantize_keeps_masks() -> None:
    ctx, state = make_ctx(
        [
            {"stage": "prune", "sparsity": 0.5, "epochs": 0},
            {"stage": "prune_channels", "ratio": 0.5, "round_to": 4, "epochs": 1},
            {"stage": "distill", "epochs": 1},
            {"stage": "quantize", "mode": "ptq", "epochs": 0, "calibration_batches": 1},
        ]
    )
    state = run_stages(ctx, state)
    assert state.quantized and is_graph(state.model)
    params = dict(state.model.named_parameters())
    assert params["net.features.1.conv1.weight"].shape == (4, 4, 3, 3)
    assert params["net.classifier.2.weight"].shape == (10, 8)
    assert len(state.structure) == 4 and all(r["kept"] for r in state.structure)
    # the unstructured masks survived surgery, distillation and QAT prepare
    for n, m in state.masks.items():
        assert m.shape == params[n].shape and torch.all(params[n][~m] == 0)
    kept = sum(int(m.sum()) for m in state.masks.values())
    assert 0.4 < 1 - kept / sum(m.numel() for m in state.masks.values()) < 0.6


@pytest.mark.slow
def test_prune_channels_after_quantize_requantizes_keeps_masks_and_exports(tmp_path) -> None:
    from pqd.stages.prune_channels import eager_model

    ctx, state = make_ctx(
        [
            {"stage": "distill", "epochs": 1},
            {"stage": "prune", "sparsity": 0.5, "epochs": 0},
            {"stage": "quantize", "mode": "ptq", "epochs": 0, "calibration_batches": 1},
            {
                "stage": "prune_channels",
                "target": {"macs": 0.5},
                "round_to": None,
                "epochs": 1,
                "calibration_batches": 1,
            },
        ]
    )
    state = run_stages(ctx, state)
    assert state.quantized and is_graph(state.model)
    assert state.info["requantized"]
    assert state.info["macs_after"] <= 0.5 * state.info["macs_baseline"]
    assert state.info["target"]["met"]
    params = dict(state.model.named_parameters())
    assert params["net.features.0.0.weight"].shape[0] < 8
    for n, m in state.masks.items():
        assert m.shape == params[n].shape and torch.all(params[n][~m] == 0)
    # both artifacts export: INT8 from the re-prepared graph, FP32 from its eager weights
    path, _ = export_onnx(state.model, tmp_path / "final.onnx", ctx.example_input(), quantized=True)
    comp = onnx_complexity(path)
    assert comp["sparsity"] > 0.4 and comp["macs"] == state.info["macs_after"]
    eager = eager_model(state, ctx)
    check_output_shape(eager, 10)
    fp32, _ = export_onnx(eager, tmp_path / "fp32.onnx", ctx.example_input(), quantized=False)
    assert onnx_complexity(fp32)["macs"] == comp["macs"]


def test_iterative_channel_schedule_shrinks_each_round(monkeypatch) -> None:
    from pqd.context import Context

    widths: list[int] = []
    real = Context.fit

    def fit(self, state, cfg, epochs, **kw):
        widths.append(dict(state.model.named_parameters())["net.features.0.0.weight"].shape[0])
        return real(self, state, cfg, epochs, **kw)

    monkeypatch.setattr(Context, "fit", fit)
    ctx, state = make_ctx(
        [
            {
                "stage": "prune_channels",
                "ratio": 0.75,
                "round_to": None,
                "schedule": "iterative",
                "cycles": 2,
                "epochs": 2,
            }
        ]
    )
    state = run_stages(ctx, state)
    assert widths == [4, 2]  # 8 * 0.25^(1/2), then 8 * 0.25
    assert state.info["channels"]["net.features.0.0"] == [8, 2]


def test_channel_recipe_rules() -> None:
    base = {"model": {"name": "tiny_cnn"}}
    with pytest.raises(RecipeError, match="exactly one of ratio, target or ratios"):
        recipe_from_dict({**base, "stages": [{"stage": "prune_channels"}]})
    with pytest.raises(RecipeError, match="exactly one of macs or latency_ms"):
        recipe_from_dict(
            {
                **base,
                "stages": [{"stage": "prune_channels", "target": {"macs": 0.5, "latency_ms": 1.0}}],
            }
        )
    r = recipe_from_dict(
        {**base, "stages": [{"stage": "prune_channels", "target": {"latency_ms": 1.0}}]}
    )
    assert r.stages[0].target.precision == "auto"
    copy.deepcopy(r)


def test_per_group_ratios_cut_each_named_group_alone() -> None:
    ctx, state = make_ctx(
        [
            {
                "stage": "prune_channels",
                "ratios": {"net.features.2.conv1": 0.5, "net.features.0.0": 0.25},
                "round_to": 2,
                "epochs": 0,
            }
        ]
    )
    state = run_stages(ctx, state)
    w = {n: p.shape for n, p in state.model.named_parameters()}
    assert w["net.features.2.conv1.weight"][0] == 8  # 16 * (1 - 0.5)
    assert w["net.features.0.0.weight"][0] == 6  # 8 * (1 - 0.25)
    assert w["net.features.1.conv1.weight"][:2] == (8, 6)  # own group whole, input cut
    assert w["net.features.2.shortcut.0.weight"][0] == 16  # not named: kept
    assert state.info["ratios"] == {"net.features.2.conv1": 0.5, "net.features.0.0": 0.25}
    assert "ratio" not in state.info

    ctx, state = make_ctx([{"stage": "prune_channels", "ratios": {"net.nope": 0.5}, "epochs": 0}])
    with pytest.raises(RecipeError, match="which roots no channel group"):
        run_stages(ctx, state)


def test_per_group_ratio_rules() -> None:
    base = {"model": {"name": "tiny_cnn"}}
    with pytest.raises(RecipeError, match="exactly one of ratio, target or ratios"):
        recipe_from_dict(
            {**base, "stages": [{"stage": "prune_channels", "ratio": 0.5, "ratios": {"a": 0.1}}]}
        )
    with pytest.raises(RecipeError, match="above max_ratio"):
        recipe_from_dict(
            {
                **base,
                "stages": [{"stage": "prune_channels", "ratios": {"a": 0.8}, "max_ratio": 0.5}],
            }
        )
    with pytest.raises(RecipeError, match="scope: layer"):
        recipe_from_dict(
            {
                **base,
                "stages": [{"stage": "prune_channels", "ratios": {"a": 0.1}, "scope": "global"}],
            }
        )


def test_latency_target_measures_the_exported_artifact(monkeypatch) -> None:
    import pqd.stages.prune_channels as pc

    # a generous budget: the unpruned FP32 export already meets it (one real measurement)
    ctx, state = make_ctx(
        [
            {
                "stage": "prune_channels",
                "target": {"latency_ms": 1000.0, "precision": "fp32"},
                "epochs": 0,
            }
        ]
    )
    state = run_stages(ctx, state)
    t = state.info["target"]
    assert t["met"] and state.info["ratio"] == 0.0 and t["precision"] == "fp32"
    assert len(t["trials"]) == 1 and 0 < t["trials"][0]["latency_ms"] < 1000
    assert state.structure == []

    # bisection on a model of latency (falls with the ratio); int8 since quantize follows
    seen = []

    def fake_latency(model, example, *, int8, calibration=(), threads=2, repeats=100):
        seen.append(int8)
        return 10.0 * pc.count_macs(model, example) / 2_318_496

    monkeypatch.setattr(pc, "artifact_latency_ms", fake_latency)
    ctx, state = make_ctx(
        [
            {
                "stage": "prune_channels",
                "target": {"latency_ms": 5.0, "trials": 6},
                "round_to": None,
                "epochs": 0,
            },
            {"stage": "quantize", "mode": "ptq", "epochs": 0},
        ]
    )
    from pqd.registry import STAGES

    state = STAGES["prune_channels"](state, ctx.recipe.stages[0], ctx)
    t = state.info["target"]
    assert all(seen) and t["precision"] == "int8" and t["met"] and len(t["trials"]) == 6
    assert 10.0 * state.info["macs_after"] / 2_318_496 <= 5.0
    assert 0 < state.info["ratio"] < 0.9
