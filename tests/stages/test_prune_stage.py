"""The prune stage on tiny models: criteria, N:M through the real INT8 export, the
iterative schedule's sparsity sequence, and lottery-ticket rewinding."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from helpers import make_ctx, run_stages
from pqd.context import Context, score_batches, scoring_loss
from pqd.errors import RecipeError
from pqd.prune import importance
from pqd.prune.masks import iterative_sparsities, prunable_parameters, sparsity_of
from pqd.recipe import recipe_from_dict
from pqd.state import State


def spy_fit(ctx: Context, monkeypatch: pytest.MonkeyPatch, calls: list[dict]) -> None:
    """Record the model's weights and mask sparsity at the start of every ctx.fit call,
    and the weights at every epoch boundary inside it."""
    real = Context.fit

    def fit(self, state: State, cfg, epochs, **kw):
        entry = {
            "weights": copy.deepcopy(state.model.state_dict()),
            "masks": {n: m.clone() for n, m in state.masks.items()},
            "sparsity": sparsity_of(state.masks),
            "epochs": epochs,
            "epoch_ends": {},
        }
        calls.append(entry)
        inner = kw.get("on_step")

        def on_step(step: int, total: int) -> None:
            if inner is not None:
                inner(step, total)
            if epochs and step % (total // epochs) == 0:
                entry["epoch_ends"][step // (total // epochs)] = copy.deepcopy(
                    state.model.state_dict()
                )

        kw["on_step"] = on_step
        return real(self, state, cfg, epochs, **kw)

    monkeypatch.setattr(Context, "fit", fit)


@pytest.mark.parametrize("criterion", importance.CRITERIA)
def test_every_criterion_prunes_to_the_exact_sparsity_with_its_own_scores(
    criterion: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx, state = make_ctx(
        [
            {
                "stage": "prune",
                "sparsity": 0.6,
                "criterion": criterion,
                "scope": "layer",
                "epochs": 0,
                "score_batches": 2,
            }
        ],
        model="tiny_cnn",
    )
    params = prunable_parameters(state.model)
    expected = importance.score(
        criterion, state.model, score_batches(ctx, 2), importance.cross_entropy, list(params)
    )
    state = run_stages(ctx, state)
    for name, mask in state.masks.items():
        k = round(0.6 * mask.numel())
        cut = expected[name].flatten().sort().values[k - 1]
        # every pruned weight scored <= every kept one
        assert expected[name][~mask].max() <= expected[name][mask].min()
        assert int((~mask).sum()) == k and expected[name][~mask].max() == cut
    assert state.info["criterion"] == criterion


def test_teacher_guided_scores_come_from_the_kd_loss() -> None:
    # student == teacher: the KD term has zero gradient, so Taylor-KD = 0.1 * Taylor-CE
    ctx, state = make_ctx(
        [
            {
                "stage": "prune",
                "sparsity": 0.5,
                "criterion": "taylor",
                "criterion_loss": "kd",
                "epochs": 0,
            }
        ],
        model="tiny_cnn",
    )
    batches = score_batches(ctx, 2)
    kd = importance.taylor(state.model, batches, scoring_loss("kd", ctx))
    ce = importance.taylor(state.model, batches, scoring_loss("ce", ctx))
    for n in ce:
        assert torch.allclose(kd[n], 0.1 * ce[n], atol=1e-7, rtol=1e-4)
    with torch.no_grad():  # a different student: the KD term now contributes
        for p in state.model.parameters():
            p.mul_(0.5)
    kd2 = importance.taylor(state.model, batches, scoring_loss("kd", ctx))
    ce2 = importance.taylor(state.model, batches, scoring_loss("ce", ctx))
    assert not torch.allclose(kd2["net.features.0.0.weight"], 0.1 * ce2["net.features.0.0.weight"])


def test_iterative_schedule_hits_the_sparsity_sequence(monkeypatch) -> None:
    ctx, state = make_ctx(
        [{"stage": "prune", "sparsity": 0.875, "schedule": "iterative", "cycles": 3, "epochs": 3}],
        model="tiny_cnn",
    )
    calls: list[dict] = []
    spy_fit(ctx, monkeypatch, calls)
    state = run_stages(ctx, state)
    n = sum(m.numel() for m in state.masks.values())
    expected = [round(s * n) / n for s in iterative_sparsities(0.875, 3)]
    assert [c["sparsity"] for c in calls] == pytest.approx(expected, abs=1e-12)
    assert [c["epochs"] for c in calls] == [1, 1, 1]
    # each round keeps what the previous pruned
    for a, b in itertools.pairwise(calls):
        assert all(torch.all(b["masks"][k] <= a["masks"][k]) for k in a["masks"])


def test_pruned_weights_never_come_back_whatever_later_scores_say(monkeypatch) -> None:
    # round 2's scores rank the zeros of round 1 (score 0) above every surviving weight
    rounds = []

    def flipping(criterion, model, batches, loss_fn, names):
        rounds.append(1)
        ps = dict(model.named_parameters())
        sign = 1.0 if len(rounds) == 1 else -1.0
        return {n: sign * ps[n].detach().abs() for n in names}

    monkeypatch.setattr(importance, "score", flipping)
    ctx, state = make_ctx(
        [
            {
                "stage": "prune",
                "sparsity": 0.75,
                "schedule": "iterative",
                "cycles": 2,
                "epochs": 2,
                "criterion": "taylor",
            }
        ],
        model="tiny_cnn",
    )
    calls: list[dict] = []
    spy_fit(ctx, monkeypatch, calls)
    state = run_stages(ctx, state)
    assert len(rounds) == 2
    for k, first in calls[0]["masks"].items():
        assert torch.all(state.masks[k] <= first), k
    assert sparsity_of(state.masks) == pytest.approx(0.75, abs=1e-3)


@pytest.mark.parametrize("rewind", ["stage_start", "epoch"])
def test_rewind_resets_survivors_to_the_rewind_point_and_zeroes_the_pruned(
    rewind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx, state = make_ctx(
        [{"stage": "prune", "sparsity": 0.7, "rewind": rewind, "rewind_epoch": 1, "epochs": 2}],
        model="tiny_cnn",
    )
    start = copy.deepcopy(state.model.state_dict())
    calls: list[dict] = []
    spy_fit(ctx, monkeypatch, calls)
    state = run_stages(ctx, state)
    assert len(calls) == 2 and calls[0]["sparsity"] == 0.0
    point = start if rewind == "stage_start" else calls[0]["epoch_ends"][1]
    rewound, masks = calls[1]["weights"], calls[1]["masks"]
    assert sparsity_of(masks) == pytest.approx(0.7, abs=1e-3)
    trained = calls[0]["epoch_ends"][1]
    for k, v in rewound.items():
        if k in masks:
            assert torch.equal(v[masks[k]], point[k][masks[k]]), k
            assert torch.all(v[~masks[k]] == 0), k
        elif "running" in k or k.endswith(".bias") or k.endswith(".weight"):
            assert torch.equal(v, point[k]), k
    # the two rewind points differ: one epoch of training lies between them
    w = "net.features.1.0.0.weight"
    assert not torch.equal(start[w], trained[w])
    assert state.info["rewind"] == ("stage_start" if rewind == "stage_start" else "epoch 1")


def test_gradual_movement_accumulates_during_training(monkeypatch) -> None:
    seen: list[int] = []
    real = importance.MovementTracker.__call__

    def call(self, model):
        real(self, model)
        seen.append(self.steps)

    monkeypatch.setattr(importance.MovementTracker, "__call__", call)
    ctx, state = make_ctx(
        [
            {
                "stage": "prune",
                "sparsity": 0.5,
                "schedule": "gradual",
                "criterion": "movement",
                "epochs": 2,
            }
        ],
        model="tiny_cnn",
    )
    state = run_stages(ctx, state)
    assert seen and seen[-1] == 2 * 3  # 48 images / batch 16, 2 epochs
    assert state.info["mask_sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_at_init_reinitialises_then_prunes() -> None:
    ctx, state = make_ctx(
        [{"stage": "prune", "sparsity": 0.5, "criterion": "snip", "at_init": True, "epochs": 0}],
        model="tiny_cnn",
    )
    before = copy.deepcopy(state.model.state_dict())
    state = run_stages(ctx, state)
    w = "net.features.1.0.0.weight"
    kept = state.masks[w]
    assert not torch.equal(state.model.state_dict()[w][kept], before[w][kept])
    assert sparsity_of(state.masks) == pytest.approx(0.5, abs=1e-3)


def test_nm_2_4_survives_qat_and_the_int8_export_has_exactly_2_zeros_per_group(tmp_path) -> None:
    from pqd.measurement.sparsity import nm_report, onnx_weights
    from pqd.onnx_export import export_onnx

    ctx, state = make_ctx(
        [
            {"stage": "prune", "structure": "nm", "n": 2, "m": 4, "epochs": 0},
            {"stage": "quantize", "mode": "qat", "epochs": 1, "calibration_batches": 2},
        ]
    )
    state = run_stages(ctx, state)
    assert "net.features.0.0.weight" not in state.nm_layers  # the 3-channel stem
    assert set(state.nm_layers) == {
        n for n in prunable_parameters(state.model) if n != "net.features.0.0.weight"
    }
    path, _ = export_onnx(state.model, tmp_path / "final.onnx", ctx.example_input(), quantized=True)
    report = nm_report(path, state.nm_layers)
    assert report["ok"] and report["layers"] == len(state.nm_layers)
    assert report["exact"] == report["groups"] > 0 and report["extra_zeros"] == 0
    # the check is not vacuous: a dense layer fails it
    weights = onnx_weights(path)
    assert weights["net.features.1.conv1.weight"].dtype.name == "int8"
    dense = nm_report(path, {"net.features.0.0.weight": [2, 4]})
    assert not dense["ok"]
    # what the pipeline adds to record.json's final
    from pqd.pipeline import sparsity_extras

    recipe = ctx.recipe.model_copy(
        update={"export": ctx.recipe.export.model_copy(update={"compress": True})}
    )
    extras = sparsity_extras(state, path, recipe)
    assert extras["nm_pattern"]["ok"] and extras["compression_ratio"] > 1.0
    assert (tmp_path / "final.onnx.xz").stat().st_size == extras["compressed_size_bytes"]


def test_nm_recipe_rules() -> None:
    base = {"model": {"name": "tiny_cnn"}}
    with pytest.raises(RecipeError, match="n < m"):
        recipe_from_dict({**base, "stages": [{"stage": "prune", "structure": "nm", "n": 4}]})
    with pytest.raises(RecipeError, match="sparsity"):
        recipe_from_dict(
            {**base, "stages": [{"stage": "prune", "structure": "nm", "sparsity": 0.7}]}
        )
    with pytest.raises(RecipeError, match="needs a sparsity"):
        recipe_from_dict({**base, "stages": [{"stage": "prune"}]})
    with pytest.raises(RecipeError, match="rewind_epoch"):
        recipe_from_dict(
            {
                **base,
                "stages": [
                    {
                        "stage": "prune",
                        "sparsity": 0.5,
                        "epochs": 2,
                        "rewind": "epoch",
                        "rewind_epoch": 3,
                    }
                ],
            }
        )
    with pytest.raises(RecipeError, match="epochs >= cycles"):
        recipe_from_dict(
            {
                **base,
                "stages": [
                    {
                        "stage": "prune",
                        "sparsity": 0.5,
                        "epochs": 2,
                        "schedule": "iterative",
                        "cycles": 3,
                    }
                ],
            }
        )
